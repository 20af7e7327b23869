import math

import pytest
import torch

from edgeinspect.config import build_config
from edgeinspect.models.diad import DiADModel
from edgeinspect.models.features import build_feature_extractor
from edgeinspect.core.networks import MissingNetworkError, Networks
from edgeinspect.runtime.scoring import (
    cosine_distance_maps,
    gaussian_blur,
    pooled_max_score,
    topk_mean_score,
)
from edgeinspect.runtime.run_detector import model_pipeline


def test_cosine_distance_maps_known_values():
    a = torch.zeros(1, 2, 2, 2)
    a[:, 0] = 1
    b = a.clone()
    b[0, :, 0, 0] = torch.tensor([0.0, 1.0])  # orthogonal at one position -> 1 - cos = 1
    b[0, :, 1, 1] = torch.tensor([-1.0, 0.0])  # opposite -> 2
    m = cosine_distance_maps([a, a], [b, b], (2, 2))
    expected = torch.tensor([[1.0, 0.0], [0.0, 2.0]]) * 2  # two identical levels add up
    torch.testing.assert_close(m[0], expected)
    assert cosine_distance_maps([a], [b], (8, 8)).shape == (1, 8, 8)


def test_blur_keeps_constants_and_mass():
    const = torch.full((2, 16, 16), 3.0)
    torch.testing.assert_close(gaussian_blur(const, 2.0), const)
    spike = torch.zeros(1, 41, 41)
    spike[0, 20, 20] = 1
    out = gaussian_blur(spike, 2.0)
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-4)
    assert float(out[0, 20, 20]) == pytest.approx(1 / (2 * math.pi * 4), rel=0.02)
    assert gaussian_blur(torch.rand(1, 4, 4), 5.0).shape == (1, 4, 4)  # kernel larger than the map


def test_pooled_max_and_topk_scores():
    m = torch.zeros(1, 16, 16)
    m[0, 4:8, 4:8] = 1.0  # a 4x4 block
    # one 4x4 average pool centred on the block covers it exactly
    assert float(pooled_max_score(m, 4, 1)) == pytest.approx(1.0)
    assert float(pooled_max_score(m, 8, 1)) == pytest.approx(16 / 64)
    assert float(topk_mean_score(m, 32)) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_pipeline():
    torch.manual_seed(0)
    cfg = build_config("diad", "tiny")
    model = DiADModel(cfg).eval()
    with torch.no_grad():  # a non-trivial SG so guidance matters
        for p in model.guidance.zero_convs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    features = build_feature_extractor("efficientnet_lite0", None, (4, 8, 16), allow_random=True)
    return cfg, model, features


def _frames(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_same_frame_and_seed_give_the_same_score(tiny_pipeline):
    cfg, model, features = tiny_pipeline
    pipe = model_pipeline(cfg, model, features)
    x = _frames()
    r1, r2 = pipe(x), pipe(x)
    assert torch.equal(r1.scores, r2.scores) and torch.equal(r1.maps, r2.maps)
    # a frame's score does not depend on its batch neighbours
    alone = pipe(x[1:2])
    torch.testing.assert_close(alone.scores, r1.scores[1:2], rtol=1e-5, atol=1e-6)
    assert r1.maps.shape == (3, 64, 64) and r1.reconstructions.shape == (3, 3, 64, 64)
    assert set(r1.timings_ms) == {"encode", "denoise", "decode", "features", "scoring"}


def test_seed_changes_reconstruction(tiny_pipeline):
    cfg, model, features = tiny_pipeline
    x = _frames(1)
    a = model_pipeline(cfg, model, features)(x)
    cfg2 = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"seed": 1})})
    b = model_pipeline(cfg2, model, features)(x)
    assert not torch.equal(a.reconstructions, b.reconstructions)


def test_bad_input_and_missing_network(tiny_pipeline):
    cfg, model, features = tiny_pipeline
    pipe = model_pipeline(cfg, model, features)
    with pytest.raises(ValueError, match="expected images"):
        pipe(torch.zeros(3, 64, 64))
    with pytest.raises(MissingNetworkError, match="features"):
        Networks({}, name="onnxruntime")["features"]


def test_vae_roundtrip_reference_compares_like_with_like(tiny_pipeline):
    cfg, model, features = tiny_pipeline
    cfg_rt = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"reference": "vae_roundtrip"})})
    pipe = model_pipeline(cfg_rt, model, features)
    x = _frames(2)
    r = pipe(x)
    with torch.no_grad():
        roundtrip = model.vae.decode(model.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    scores, maps = pipe.score(roundtrip, r.reconstructions)
    torch.testing.assert_close(r.scores, scores, rtol=1e-4, atol=1e-5)
    # the plain reference gives a different map for the same reconstruction
    plain = model_pipeline(cfg, model, features)(x)
    assert torch.equal(plain.reconstructions, r.reconstructions)
    assert not torch.allclose(plain.maps, r.maps)
