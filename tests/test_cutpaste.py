"""Cut-paste composites: only the returned mask changes, pasted pixels are the seed's, deterministic."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgeinspect.data.cutpaste import cut_paste


def scene(seed: int = 0):
    rng = np.random.default_rng(seed)
    normal = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    seed_image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    seed_mask = np.zeros((64, 80), bool)
    seed_mask[20:30, 30:45] = True
    seed_mask[25:35, 40:44] = True  # an L shape: not symmetric, so a wrong transform shows
    fg = np.zeros((64, 80), bool)
    fg[8:56, 10:70] = True
    return normal, seed_image, seed_mask, fg


@pytest.mark.parametrize("feather", [0.0, 1.5])
def test_only_pixels_inside_the_mask_change(feather):
    normal, seed_image, seed_mask, fg = scene()
    rng = np.random.default_rng(0)
    for _ in range(10):
        cp = cut_paste(normal, seed_image, seed_mask, fg, rng, feather=feather)
        assert cp.image.dtype == np.uint8 and cp.image.shape == normal.shape
        assert np.array_equal(cp.mask, cp.placement.mask)
        assert not (cp.mask & ~fg).any()
        changed = (cp.image != normal).any(axis=2)
        assert not (changed & ~cp.mask).any()
        assert changed[cp.mask].mean() > 0.5  # random seed pixels differ from the normal's


def test_axis_aligned_paste_copies_the_seed_pixels():
    normal, seed_image, seed_mask, fg = scene()
    cp = cut_paste(normal, seed_image, seed_mask, fg, np.random.default_rng(3), rotation=(0, 0), scale=(1, 1))
    p = cp.placement
    assert p.angle == 0 and p.scale == 1 and p.shrink == 1
    dy, dx = p.offset[0] - 20, p.offset[1] - 30  # the seed's bounding box starts at (20, 30)
    expected = np.zeros_like(cp.mask)
    expected[20 + dy:35 + dy, 30 + dx:45 + dx] = seed_mask[20:35, 30:45]
    assert np.array_equal(cp.mask, expected)
    ys, xs = np.nonzero(seed_mask)
    np.testing.assert_array_equal(cp.image[ys + dy, xs + dx], seed_image[ys, xs])


def test_rotated_paste_keeps_seed_colours():
    normal = np.zeros((64, 64, 3), np.uint8)
    seed_image = np.zeros((64, 64, 3), np.uint8)
    seed_image[...] = (200, 40, 90)
    seed_mask = np.zeros((64, 64), bool)
    seed_mask[10:20, 10:40] = True
    cp = cut_paste(normal, seed_image, seed_mask, np.ones((64, 64), bool), np.random.default_rng(0))
    assert abs(cp.placement.angle % 90) > 1  # really rotated off-axis
    np.testing.assert_array_equal(cp.image[cp.mask], np.tile([200, 40, 90], (int(cp.mask.sum()), 1)))


def test_cut_paste_is_deterministic():
    normal, seed_image, seed_mask, fg = scene()
    a = cut_paste(normal, seed_image, seed_mask, fg, np.random.default_rng(11))
    b = cut_paste(normal, seed_image, seed_mask, fg, np.random.default_rng(11))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.placement.to_json() == b.placement.to_json()


def test_shape_errors():
    normal, seed_image, seed_mask, fg = scene()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same size"):
        cut_paste(normal, seed_image[:32], seed_mask, fg, rng)
    with pytest.raises(ValueError, match="foreground"):
        cut_paste(normal, seed_image, seed_mask, fg[:32], rng)
    with pytest.raises(ValueError, match="feather"):
        cut_paste(normal, seed_image, seed_mask, fg, rng, feather=-1)


def test_mirrored_edge_paste_moves_pixels_with_the_mask():
    """An edge seed is turned by multiples of 90 degrees and maybe mirrored: its pixels follow exactly."""
    from edgeinspect.data.trimap import warp_patch

    rng = np.random.default_rng(1)
    normal = np.zeros((64, 64, 3), np.uint8)
    seed_image = rng.integers(1, 256, (64, 64, 3), dtype=np.uint8)
    seed_mask = np.zeros((64, 64), bool)
    seed_mask[0:8, 20:40] = True
    seed_mask[8:14, 20:26] = True  # an L-shaped chip from the top edge
    flips = set()
    for _ in range(12):
        cp = cut_paste(normal, seed_image, seed_mask, np.ones((64, 64), bool), rng, scale=(1, 1), edge_band=2,
                       edge_turns="quarter")
        p = cp.placement
        flips.add(p.flip)
        t, l, h, w = p.seed_box
        pixels = warp_patch(seed_image[t:t + h, l:l + w], p.angle, 1.0, cv2.INTER_NEAREST, p.flip)
        ct, cl, ch, cw = p.canvas_box
        expected = np.zeros_like(normal)
        expected[p.offset[0]:p.offset[0] + ch, p.offset[1]:p.offset[1] + cw] = pixels[ct:ct + ch, cl:cl + cw]
        np.testing.assert_array_equal(cp.image[cp.mask], expected[cp.mask])  # 90-degree turns: exact pixels
        assert not cp.image[~cp.mask].any()
    assert flips == {False, True}
