import numpy as np
import pytest

from edgeinspect.config import ConfigError, SyntheticAnomalyConfig, build_config
from edgeinspect.data.anomalies import (
    AnomalySynthesizer,
    blend,
    otsu_foreground,
    perlin_mask,
    perlin_noise,
    procedural_texture,
    rotate_field,
    shuffle_grid,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _image(h=64, w=64, seed=1):
    return (_rng(seed).random((h, w, 3)) * 120 + 60).astype(np.uint8)


def test_perlin_masks_deterministic_and_binary():
    a = perlin_mask((64, 64), _rng(3))
    b = perlin_mask((64, 64), _rng(3))
    c = perlin_mask((64, 64), _rng(4))
    assert a.mask.dtype == bool and a.mask.shape == (64, 64)
    assert np.array_equal(a.mask, b.mask) and a.angle == b.angle and a.scale == b.scale
    assert not np.array_equal(a.mask, c.mask)
    assert a.mask.any() and not a.mask.all()
    assert np.array_equal(a.mask, a.noise > 0.3)  # the thresholded field
    for _ in range(20):  # lattice sizes from the configured range 2^0..2^5
        s = perlin_mask((64, 64), _rng(_), 0, 5).scale
        assert all(v in (1, 2, 4, 8, 16, 32) for v in s)


def test_perlin_mask_is_the_rotated_field():
    plain = perlin_mask((64, 64), _rng(7), max_rotation=0.0)
    rotated = perlin_mask((64, 64), _rng(7), max_rotation=90.0)
    assert plain.angle == 0.0 and rotated.angle != 0.0 and abs(rotated.angle) <= 90
    np.testing.assert_allclose(rotated.noise, rotate_field(plain.noise, rotated.angle), atol=1e-6)
    assert not np.array_equal(rotated.mask, plain.mask)
    # rotate_field turns counter-clockwise about the centre: 90 degrees is np.rot90
    f = perlin_noise((33, 33), (4, 4), _rng(1))
    np.testing.assert_allclose(rotate_field(f, 90.0), np.rot90(f), atol=1e-4)


def test_perlin_noise_any_shape():
    n = perlin_noise((50, 70), (32, 4), _rng(0))
    assert n.shape == (50, 70) and n.dtype == np.float32
    assert -1.5 < n.min() < 0 < n.max() < 1.5


def test_foreground_estimate_and_intersection():
    img = np.full((64, 64, 3), 30, np.uint8)
    yy, xx = np.mgrid[0:64, 0:64]
    disc = (yy - 32) ** 2 + (xx - 30) ** 2 < 18**2
    img[disc] = 200
    img = (img.astype(int) + _rng(0).integers(-10, 10, img.shape)).clip(0, 255).astype(np.uint8)
    fg = otsu_foreground(img)
    iou = (fg & disc).sum() / (fg | disc).sum()
    assert iou > 0.9
    # no object to find (a flat frame): the whole image is foreground
    assert otsu_foreground(np.full((64, 64, 3), 100, np.uint8)).all()
    cfg = SyntheticAnomalyConfig(foreground="otsu", clean_ratio=0.0)
    synth = AnomalySynthesizer(cfg)
    rng = _rng(2)
    hits = 0
    for _ in range(10):
        s = synth(img, rng)
        assert not (s.mask & ~fg).any()  # never outside the foreground
        assert np.array_equal(s.image[~s.mask], img[~s.mask])
        hits += bool(s.mask.any())
    assert hits >= 8


@pytest.mark.parametrize("source", ["texture", "image", "shuffle"])
def test_each_source_changes_only_the_mask(source):
    cfg = SyntheticAnomalyConfig(sources={source: 1.0}, clean_ratio=0.0)
    pool = np.stack([np.full((64, 64, 3), v, np.uint8) for v in (10, 120, 240)])
    img = _image()
    synth = AnomalySynthesizer(cfg, pool)
    s = synth(img, _rng(5), index=0)
    assert s.source == source and not s.clean and s.mask.any()
    assert 0.0 <= s.beta < 0.8
    assert np.array_equal(s.image[~s.mask], img[~s.mask])
    assert (s.image[s.mask] != img[s.mask]).any()
    if source == "image":  # the source is another pool image, never the image's own index
        src = (s.image[s.mask].astype(float) - s.beta * img[s.mask]) / (1 - s.beta)
        assert np.abs(src - 10).min() > 50


def test_shuffle_grid_permutes_blocks():
    img = _image(64, 64)
    out = shuffle_grid(img, 8, _rng(0))
    assert not np.array_equal(out, img)

    def blocks(x):
        return sorted(x[i:i + 8, j:j + 8].tobytes() for i in range(0, 64, 8) for j in range(0, 64, 8))

    assert blocks(out) == blocks(img)
    odd = _image(70, 66)  # remainder strips stay in place
    o2 = shuffle_grid(odd, 8, _rng(0))
    assert np.array_equal(o2[64:], odd[64:]) and np.array_equal(o2[:, 64:], odd[:, 64:])


def test_blend_factor():
    img = np.full((4, 4, 3), 100, np.uint8)
    src = np.full((4, 4, 3), 200, np.uint8)
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    out = blend(img, src, m, 0.25)
    assert (out[m] == 175).all() and (out[~m] == 100).all()


def test_synthesizer_deterministic_and_clean_ratio():
    cfg = build_config("glad", "tiny").train.anomalies
    pool = np.stack([_image(seed=s) for s in range(4)])
    synth = AnomalySynthesizer(cfg, pool)
    a = [synth(pool[i % 4], _rng(11), index=i % 4) for i in range(3)]
    b = [synth(pool[i % 4], _rng(11), index=i % 4) for i in range(3)]
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
    rng = _rng(0)
    draws = [synth(pool[0], rng, index=0) for _ in range(200)]
    clean = [d for d in draws if d.clean]
    assert 0.4 < len(clean) / 200 < 0.6
    assert all(np.array_equal(d.image, pool[0]) and not d.mask.any() for d in clean)
    tex = procedural_texture((32, 48), _rng(1))
    assert tex.shape == (32, 48, 3) and tex.dtype == np.uint8
    assert np.array_equal(tex, procedural_texture((32, 48), _rng(1)))


def test_anomaly_config_validation():
    with pytest.raises(ConfigError, match="beta_low"):
        build_config("glad", "tiny", {"train": {"anomalies": {"beta_low": 0.9, "beta_high": 0.5}}})
    with pytest.raises(ConfigError, match="train.anomalies.sources"):
        build_config("glad", "tiny", {"train": {"anomalies": {"sources": {"noise": 1.0}}}})
