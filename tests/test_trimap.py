"""AdaBLDM trimaps: foreground estimation, seed-mask placement wholly inside the foreground, trimap values."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgeinspect.data.trimap import (SIDES, MaskDoesNotFit, affine_canvas, dilate_mask, edge_band_of,
                                     estimate_foreground, fitting_offsets, frame_contact, make_trimap, moved_side,
                                     place_mask, warp_patch)


def crack_seed(shape=(64, 64)) -> np.ndarray:
    """An irregular seed: a thick diagonal line with a blob at one end."""
    m = np.zeros(shape, np.uint8)
    cv2.line(m, (8, 10), (40, 30), 1, 3)
    cv2.circle(m, (42, 32), 4, 1, -1)
    return m > 0


def ring_foreground(shape=(128, 128)) -> np.ndarray:
    """A thin annulus: a small, irregular foreground where most placements fail."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    return (r > 30) & (r < 44)


@pytest.fixture(scope="module")
def stride8_extractor():
    from edgeinspect.models.features import build_feature_extractor

    return build_feature_extractor("efficientnet_lite0", "default", (8,))


# --------------------------------------------------------------------------- placement


@pytest.mark.parametrize("foreground", [np.ones((96, 128), bool), ring_foreground()], ids=["whole", "ring"])
def test_placed_mask_lies_wholly_inside_the_foreground(foreground):
    seed = crack_seed()
    rng = np.random.default_rng(0)
    angles = []
    for _ in range(40):
        p = place_mask(seed, foreground, rng)
        assert p.mask.shape == foreground.shape and p.mask.dtype == bool
        assert p.mask.any()
        assert not (p.mask & ~foreground).any()
        assert 0 <= p.angle <= 360 and 0.85 <= p.scale <= 1.15 and 0.25 <= p.shrink <= 1.0
        # the mask sits at the recorded offset with the recorded tight size
        ys, xs = np.nonzero(p.mask)
        assert (ys.min(), xs.min()) == p.offset
        assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == p.canvas_box[2:]
        angles.append(p.angle)
    assert np.ptp(angles) > 180  # the rotation range is really used


def test_area_follows_the_recorded_scale():
    seed = np.zeros((80, 80), bool)
    seed[20:60, 20:60] = True  # 1600 px: nearest-neighbour scaling keeps the area close to s^2
    rng = np.random.default_rng(1)
    for _ in range(10):
        p = place_mask(seed, np.ones((128, 128), bool), rng, rotation=(0, 0))
        assert p.shrink == 1.0 and p.angle == 0.0
        assert p.mask.sum() == pytest.approx(1600 * p.scale**2, rel=0.08)


def test_mask_that_only_fits_shrunk_is_shrunk():
    seed = np.zeros((40, 40), bool)
    seed[5:35, 5:35] = True  # 30x30
    fg = np.zeros((64, 64), bool)
    fg[10:30, 10:30] = True  # 20x20: needs a shrink below 0.85 * 20/30 even unrotated
    p = place_mask(seed, fg, np.random.default_rng(0), rotation=(0, 0), scale=(1, 1))
    assert p.shrink < 20 / 30 + 1e-9
    assert not (p.mask & ~fg).any()
    assert p.to_json()["shrink"] == p.shrink


def test_impossible_placement_raises_with_sizes_in_the_message():
    seed = crack_seed()
    fg = np.zeros((64, 64), bool)
    fg[30:33, 30:33] = True
    with pytest.raises(MaskDoesNotFit, match=r"does not fit wholly inside the foreground \(9 px of 64x64\)"):
        place_mask(seed, fg, np.random.default_rng(0), tries=5)
    assert issubclass(MaskDoesNotFit, ValueError)


def test_bad_inputs_are_rejected():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="seed mask is empty"):
        place_mask(np.zeros((8, 8), bool), np.ones((8, 8), bool), rng)
    with pytest.raises(ValueError, match="foreground is empty"):
        place_mask(crack_seed(), np.zeros((8, 8), bool), rng)
    with pytest.raises(ValueError, match="2-D"):
        place_mask(crack_seed(), np.ones((8, 8, 3), bool), rng)


def test_placement_is_deterministic_under_the_generator():
    seed, fg = crack_seed(), ring_foreground()
    a = place_mask(seed, fg, np.random.default_rng(7))
    b = place_mask(seed, fg, np.random.default_rng(7))
    c = place_mask(seed, fg, np.random.default_rng(8))
    assert np.array_equal(a.mask, b.mask) and a.to_json() == b.to_json()
    assert not np.array_equal(a.mask, c.mask)


def test_fitting_offsets_match_a_brute_force_check():
    rng = np.random.default_rng(3)
    fg = cv2.dilate((rng.random((30, 34)) > 0.7).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    patch = np.array([[1, 1, 0], [0, 1, 1], [0, 1, 0]], bool)
    brute = [(y, x) for y in range(30 - 2) for x in range(34 - 2) if not (patch & ~fg[y:y + 3, x:x + 3]).any()]
    assert sorted(map(tuple, fitting_offsets(patch, fg).tolist())) == brute
    assert len(brute) > 0


def test_identity_affine_keeps_the_patch():
    m, shape = affine_canvas((10, 35), 0.0, 1.0)
    assert shape == (10, 35)
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    _, shape90 = affine_canvas((10, 35), 90.0, 1.0)
    assert shape90 == (35, 10)


# --------------------------------------------------------------------------- edge defects


def chip_seed(shape=(64, 64)) -> np.ndarray:
    """A chipped edge: a lopsided notch cut into the top edge (wide and shallow, longer on the left)."""
    m = np.zeros(shape, bool)
    m[0:6, 10:40] = True
    m[6:12, 10:22] = True
    return m


@pytest.mark.parametrize("angle", [0, 90, 180, 270])
@pytest.mark.parametrize("flip", [False, True])
def test_moved_side_matches_the_warp(angle, flip):
    """A patch's marked side lands where moved_side says, for every 90-degree turn and mirror."""
    for side in SIDES:
        patch = np.zeros((7, 11), np.uint8)
        {"top": patch[0], "bottom": patch[-1], "left": patch[:, 0], "right": patch[:, -1]}[side][:] = 1
        patch[3, 2] = 1  # an off-centre pixel so a mirror is visible in the patch too
        moved = warp_patch(patch, angle, 1.0, cv2.INTER_NEAREST, flip) > 0
        lines = {"top": moved[0], "bottom": moved[-1], "left": moved[:, 0], "right": moved[:, -1]}
        assert lines[moved_side(side, angle, flip)].all(), (side, angle, flip)


def test_edge_band_of_a_tile_and_of_an_object():
    tile = np.ones((10, 12), bool)
    top = edge_band_of(tile, 2, "top")
    assert top[:2].all() and not top[2:].any()
    obj = np.zeros((20, 20), bool)
    obj[5:15, 4:16] = True
    left = edge_band_of(obj, 3, "left")
    assert np.array_equal(np.nonzero(left.any(axis=0))[0], [4, 5, 6]) and not (left & ~obj).any()


@pytest.mark.parametrize("turns, expected_sides", [("half", {"top", "bottom"}), ("quarter", set(SIDES))])
@pytest.mark.parametrize("foreground", ["tile", "object"])
def test_edge_defect_stays_on_the_edge_with_its_contact_side(foreground, turns, expected_sides):
    """A seed cut into the top edge is placed with the pixels that touched the frame on the target's
    edge, on the side the turn (and mirror) moved them to, and off every other edge; half turns keep
    it on the top or bottom edge, quarter turns use all four."""
    seed = chip_seed()
    assert set(frame_contact(seed, 3)) == {"top"}
    if foreground == "tile":
        fg = np.ones((96, 128), bool)
    else:
        fg = np.zeros((96, 128), bool)
        fg[10:86, 12:116] = True
    rng = np.random.default_rng(0)
    sides = set()
    for _ in range(30):
        p = place_mask(seed, fg, rng, edge_band=3, edge_turns=turns)
        assert p.edge and p.angle in ((0.0, 180.0) if turns == "half" else (0.0, 90.0, 180.0, 270.0))
        assert not (p.mask & ~fg).any()
        side = moved_side("top", p.angle, p.flip)
        sides.add(side)
        on_edge = edge_band_of(fg, 3, side) & p.mask
        # the 30-px-wide notch mouth (scaled 0.85-1.15) lies on that edge band
        assert on_edge.sum() >= 0.5 * 30 * 0.85 * 3
        for other in set(SIDES) - {side}:
            assert not (edge_band_of(fg, 3, other) & p.mask).any()
        # the mouth is the notch's wide end: it hugs the edge, the narrow part points inward
        ys, xs = np.nonzero(p.mask)
        depth = {"top": ys - ys.min(), "bottom": ys.max() - ys, "left": xs - xs.min(), "right": xs.max() - xs}[side]
        assert (depth < 3).sum() > (depth > 8).sum()
    assert sides == expected_sides


def test_edge_band_leaves_other_seeds_exactly_as_before():
    seed = crack_seed()  # stays > 3 px from its frame
    assert not frame_contact(seed, 3)
    fg = ring_foreground()
    a = place_mask(seed, fg, np.random.default_rng(5))
    b = place_mask(seed, fg, np.random.default_rng(5), edge_band=3)
    assert np.array_equal(a.mask, b.mask) and not b.edge
    assert {k: v for k, v in a.to_json().items()} == b.to_json()


def test_an_edge_defect_that_finds_no_edge_is_reported():
    seed = np.zeros((64, 64), bool)
    seed[0:20, 0:60] = True  # a 60-px-wide chip along the top edge
    fg = np.zeros((64, 64), bool)
    fg[20:44, 20:44] = True  # an object narrower than the chip, even shrunk to half
    with pytest.raises(MaskDoesNotFit, match="along the foreground's edge.*edge_band 0"):
        place_mask(seed, fg, np.random.default_rng(0), tries=5, min_shrink=0.5, edge_band=3)
    with pytest.raises(ValueError, match="edge_band"):
        place_mask(seed, fg, np.random.default_rng(0), edge_band=-1)
    with pytest.raises(ValueError, match="edge_turns"):
        place_mask(seed, fg, np.random.default_rng(0), edge_band=3, edge_turns="eighth")


# --------------------------------------------------------------------------- trimap


def test_trimap_values_are_exactly_one_half_zero():
    fg = ring_foreground()
    p = place_mask(crack_seed(), fg, np.random.default_rng(0))
    t = make_trimap(p.mask, fg)
    assert t.dtype == np.float32 and t.shape == fg.shape
    assert set(np.unique(t).tolist()) == {0.0, 0.5, 1.0}
    assert np.array_equal(t == 1.0, p.mask)
    assert np.array_equal(t == 0.5, fg & ~p.mask)
    assert np.array_equal(t == 0.0, ~fg)


def test_trimap_refuses_a_mask_outside_the_foreground():
    fg = np.zeros((8, 8), bool)
    fg[:4] = True
    mask = np.zeros((8, 8), bool)
    mask[3:5, 2] = True
    with pytest.raises(ValueError, match="1 px outside the foreground"):
        make_trimap(mask, fg)
    with pytest.raises(ValueError, match="same shape"):
        make_trimap(mask, fg[:4])


def test_dilate_mask_grows_by_the_given_pixels():
    m = np.zeros((21, 21), bool)
    m[10, 10] = True
    d = dilate_mask(m, 3)
    assert d[10, 7] and d[10, 13] and d[7, 10] and not d[10, 6] and not d[6, 10]
    assert np.array_equal(dilate_mask(m, 0), m)


# --------------------------------------------------------------------------- foreground


def object_image(shape=(96, 128)) -> tuple[np.ndarray, np.ndarray]:
    """A bright, slightly noisy disc centred on a dark noisy background, and the disc's mask."""
    h, w = shape
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 55, np.uint8)
    cv2.circle(img, (w // 2, h // 2), 26, (190, 175, 160), -1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    return img, (yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= 26**2


def iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_feature_foreground_finds_the_centred_object(stride8_extractor):
    img, disc = object_image()
    fg = estimate_foreground(img, "features", stride8_extractor)
    assert fg.shape == disc.shape and fg.dtype == bool
    assert iou(fg, disc) > 0.9
    assert not fg[:5].any() and not fg[:, :5].any()  # the border is background
    assert np.array_equal(fg, estimate_foreground(img, "features", stride8_extractor))


def test_feature_foreground_falls_back_to_the_whole_image_on_a_flat_image(stride8_extractor):
    with pytest.warns(UserWarning, match="using the whole image"):
        fg = estimate_foreground(np.full((64, 64, 3), 90, np.uint8), "features", stride8_extractor)
    assert fg.all()


def test_otsu_and_whole_foregrounds():
    img, disc = object_image()
    assert iou(estimate_foreground(img, "otsu"), disc) > 0.9
    assert estimate_foreground(img, "whole").all()


def test_foreground_argument_errors():
    img, _ = object_image()
    with pytest.raises(ValueError, match="needs a feature extractor"):
        estimate_foreground(img, "features")
    with pytest.raises(ValueError, match="'whole', 'otsu' or 'features'"):
        estimate_foreground(img, "kmeans")
    with pytest.raises(ValueError, match="uint8 RGB"):
        estimate_foreground(img[..., 0], "whole")


def test_a_rotated_thin_mask_keeps_its_area():
    """A one-pixel-wide line touches every edge of its tight crop; rotating it must not smear those
    edge pixels over the canvas (the area stays the line's, scaled)."""
    from edgeinspect.data.trimap import transformed_seed_mask

    seed = np.zeros((64, 64), bool)
    seed[5:60, 30] = True  # a vertical crack, 55 px long
    for angle in (17.0, 45.0, 123.0, 300.0):
        patch, _, _ = transformed_seed_mask(seed, angle, 1.0)
        assert patch.sum() < 2.5 * seed.sum(), angle  # nearest-neighbour rotation of a line, no smear
