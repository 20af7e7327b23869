"""GLAD: the ATP target, scoring, SAFF and the ADP loop (stub and tiny real networks)."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from edgeinspect.config import GLADInferenceConfig, GLADScoringConfig, SchedulerConfig, build_config
from edgeinspect.core.ddim import DDIM, seeded_noise
from edgeinspect.runtime.glad import (
    STAGES,
    GLADPipeline,
    fusion_weight,
    latent_difference_maps,
    min_cosine_distance_map,
    min_cosine_distance_maps,
    saff_fuse,
    usable_calibration,
)
from edgeinspect.core.networks import Networks, TorchNetwork
from edgeinspect.runtime.scoring import topk_mean_score
from edgeinspect.models.glad import GLADModel
from edgeinspect.training.glad import atp_target
from edgeinspect.models.features import build_features
from edgeinspect.runtime.run_detector import model_pipeline
from edgeinspect.calibration.adp import propose_weight_bounds

SCHED = DDIM(SchedulerConfig())


# --------------------------------------------------------------------------- ATP target


def test_atp_target_implies_the_normal_latent():
    g = torch.Generator().manual_seed(0)
    z_n, z_a, eps = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    x_t, eps_star = atp_target(z_n, z_a, eps, t, SCHED.alphas_cumprod)
    # the clean estimate from eps* is the normal latent, at every t
    torch.testing.assert_close(SCHED.pred_clean(x_t, eps_star, t), z_n, rtol=0, atol=2e-4)
    # x_t is the noised blend alpha z_a + (1 - alpha) z_n with alpha = t / 1000
    alpha = (t / 1000.0).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, SCHED.add_noise(alpha * z_a + (1 - alpha) * z_n, eps, t), rtol=0, atol=1e-5)
    # a clean sample (z_a = z_n) gets the ordinary noise target
    _, eps_clean = atp_target(z_n, z_n, eps, t, SCHED.alphas_cumprod)
    torch.testing.assert_close(eps_clean, eps, rtol=0, atol=1e-5)
    # and the target differs from eps by +sqrt(abar)/sqrt(1-abar) * alpha (z_a - z_n) (the seed's formula
    # has the opposite sign, whose clean estimate would move *towards* the anomaly)
    a = SCHED.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(eps_star, eps + (a / (1 - a)).sqrt() * alpha * (z_a - z_n), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- scoring


def test_min_over_positions_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 8, 6, 7, generator=g)
    b = torch.randn(2, 8, 5, 9, generator=g)
    ref = 1 - torch.einsum("bcn,bcm->bnm", F.normalize(a.flatten(2), dim=1), F.normalize(b.flatten(2), dim=1)
                           ).amax(-1).view(2, 6, 7)
    tiny_chunks = min_cosine_distance_map(a, b, chunk_mb=1e-5)  # one row per chunk
    torch.testing.assert_close(tiny_chunks, ref.clamp(min=0), rtol=0, atol=1e-5)
    torch.testing.assert_close(min_cosine_distance_map(a, b), tiny_chunks, rtol=0, atol=1e-6)
    # min over positions: a shifted copy has no anomaly, a foreign vector has
    shifted = torch.roll(a, shifts=(2, 3), dims=(2, 3))
    assert float(min_cosine_distance_map(a, shifted).abs().max()) < 1e-5
    odd = a.clone()
    odd[0, :, 1, 1] = -a[0].mean(dim=(1, 2)) * 50
    m = min_cosine_distance_map(odd, a)
    assert m[0].argmax() == 1 * 7 + 1
    maps = min_cosine_distance_maps([a, a], [shifted, a], (12, 14))
    assert maps.shape == (2, 12, 14) and float(maps.abs().max()) < 1e-4


# --------------------------------------------------------------------------- SAFF


def test_saff_takes_input_where_weight_is_0_and_trajectory_where_1():
    g = torch.Generator().manual_seed(1)
    traj, inp, eps = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    w = torch.zeros(2, 1, 8, 8)
    w[:, :, 2:5, 3:7] = 1.0
    w[1, :, 6, 6] = 0.25
    fused = saff_fuse(traj, inp, w)
    one, zero = w.expand_as(traj) == 1, w.expand_as(traj) == 0
    assert torch.equal(fused[one], traj[one]) and torch.equal(fused[zero], inp[zero])
    torch.testing.assert_close(fused[1, :, 6, 6], 0.25 * traj[1, :, 6, 6] + 0.75 * inp[1, :, 6, 6])
    # re-noised with the same eps, its clean estimate is the fused latent again
    z = SCHED.add_noise(fused, eps, 600)
    torch.testing.assert_close(SCHED.pred_clean(z, eps, 600), fused, rtol=0, atol=1e-4)
    # w(m): [0, 1], latent size, monotone in m
    m = torch.linspace(0, 3, 16 * 16).view(1, 16, 16)
    for mode in ("minmax", "linear"):
        wm = fusion_weight(m, (8, 8), mode, 0.5, 2.0)
        assert wm.shape == (1, 1, 8, 8) and float(wm.min()) >= 0 and float(wm.max()) <= 1
        flat = wm.flatten()
        assert torch.all(flat[1:] >= flat[:-1])
    assert float(fusion_weight(m, (8, 8))[0].max()) == 1.0 and float(fusion_weight(m, (8, 8))[0].min()) == 0.0


# --------------------------------------------------------------------------- stub networks
# Latents are (B, 4, 8, 8); images (B, 3, 16, 16) are the first three latent channels upsampled x2, so
# the encoder (2x2 average, fourth channel 0) inverts the decoder exactly. The UNet knows the seeded
# noise and predicts the noise whose clean estimate is clean_fn(u, t), u the exact clean latent.

SEED = 0
LAT = (4, 8, 8)


class Encoder(nn.Module):
    def forward(self, image):
        z = F.avg_pool2d(image, 2)
        return torch.cat([z, torch.zeros_like(z[:, :1])], 1)


class Decoder(nn.Module):
    def forward(self, latent):
        return F.interpolate(latent[:, :3], scale_factor=2, mode="nearest")


class Features(nn.Module):
    def forward(self, image):  # a constant channel keeps cos defined for flat images
        return (torch.cat([image, torch.full_like(image[:, :1], 0.5)], 1),)


class ProjectingUNet(nn.Module):
    def __init__(self, clean_fn):
        super().__init__()
        self.clean_fn = clean_fn
        self.eps = seeded_noise(LAT, SEED, 1)

    def forward(self, sample, timestep, encoder_hidden_states):
        t = int(timestep[0])
        a = SCHED.abar(t, sample)
        u = (sample - (1 - a).sqrt() * self.eps) / a.sqrt()
        return (sample - a.sqrt() * self.clean_fn(u, t)) / (1 - a).sqrt()


def stub_pipeline(clean_fn, threshold, **inference) -> GLADPipeline:
    nets = Networks({
        "vae_encoder": TorchNetwork(Encoder(), ("image",), ("latent",)),
        "unet_plain": TorchNetwork(ProjectingUNet(clean_fn), ("sample", "timestep", "encoder_hidden_states"),
                                   ("noise_pred",)),
        "vae_decoder": TorchNetwork(Decoder(), ("latent",), ("image",)),
        "features": TorchNetwork(Features(), ("image",), ("feature_0",)),
    })
    settings = dict(t0=750, steps=10, min_step=200, top_k=4, adp_top_k=4, seed=SEED)
    settings.update(inference)
    return GLADPipeline(nets, torch.zeros(1, 2, 4), SCHED, GLADInferenceConfig(**settings),
                        GLADScoringConfig(blur_sigma=0.0), threshold=threshold)


NORMAL = torch.full(LAT, 0.2)
NORMAL[3] = 0
REGION = torch.zeros(1, 8, 8)
REGION[:, 2:5, 3:6] = 1
DEFECT = torch.tensor([1.0, -1.0, 0.5, 0.0]).view(4, 1, 1) * REGION


def frames(amplitudes) -> torch.Tensor:
    """Images whose latents are the normal pattern plus `amplitude` x the defect."""
    z = torch.stack([NORMAL + k * DEFECT for k in amplitudes])
    return Decoder()(z)


def removes_defect_at_high_noise(u, t):
    """A model that restores the normal pattern inside REGION, fully at t >= 600, not at all below 100."""
    g = min(max((t - 100) / 500, 0.0), 1.0)
    return u - g * REGION * (u - NORMAL)


def test_agreeing_estimates_never_fire_before_min_step():
    pipe = stub_pipeline(lambda u, t: u, threshold=1e-3)  # both clean estimates are always the input
    r = pipe(frames([0.0, 0.3, 0.7]))
    ts = r.timesteps
    first_below = next(t for t in ts if t < 200)
    assert r.fire_step.tolist() == [first_below] * 3
    assert not r.fired_by_threshold.any()
    checked = [i for i, t in enumerate(ts) if t >= 200]
    assert torch.isnan(r.adp_scores[:, 0]).all()  # first step: the two estimates are the same tensor
    assert float(r.adp_scores[:, checked[1:]].max()) < 1e-4
    assert float(r.scores.abs().max()) < 1e-4  # perfect reconstruction


def test_frames_of_one_batch_fire_at_different_steps():
    pipe = stub_pipeline(removes_defect_at_high_noise, threshold=0.02)
    amps = [0.0, 0.08, 0.2, 0.6]
    batch = pipe(frames(amps))
    alone = [pipe(frames([k])) for k in amps]
    steps = batch.fire_step.tolist()
    assert steps == [a.fire_step.item() for a in alone]
    torch.testing.assert_close(batch.scores, torch.cat([a.scores for a in alone]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.fire_score, torch.cat([a.fire_score for a in alone]), rtol=1e-5, atol=1e-6)
    assert len(set(steps)) >= 3, steps
    assert steps[0] == next(t for t in batch.timesteps if t < 200) and not batch.fired_by_threshold[0]
    assert all(s1 >= s2 for s1, s2 in zip(steps[::-1], steps[-2::-1]))  # stronger defect: fires earlier
    assert batch.fired_by_threshold[-1] and batch.fire_score[-1] > 0.02
    # the check map each frame fired on, at latent size: SAFF's input, the same in a batch as alone
    assert batch.fire_maps.shape == (4, 8, 8) and torch.isfinite(batch.fire_maps).all()
    torch.testing.assert_close(batch.fire_maps, torch.cat([a.fire_maps for a in alone]), rtol=1e-5, atol=1e-6)
    assert float(batch.fire_maps[-1][REGION[0] > 0].mean()) > 3 * float(batch.fire_maps[-1][REGION[0] == 0].mean())
    # after firing no further checks; before it, every step was checked
    for i, fi in enumerate(batch.fire_index.tolist()):
        assert torch.isnan(batch.adp_scores[i, fi + 1:]).all() and not torch.isnan(batch.adp_scores[i, 1:fi + 1]).any()
    # the reconstruction removed the defect where it was strong: the largest map value is inside REGION
    big = batch.maps[-1]
    mask = F.interpolate(REGION[None], size=big.shape, mode="nearest")[0, 0] > 0
    assert float(big[mask].max()) > float(big[~mask].max())
    assert set(batch.timings_ms) == set(STAGES)


def test_check_every_skips_checks_but_not_the_forced_one():
    pipe = stub_pipeline(lambda u, t: u, threshold=1e-3, check_every=3, min_step=300)
    r = pipe(frames([0.2]))
    checked = (~torch.isnan(r.adp_scores[0])).nonzero().squeeze(1).tolist()
    forced = next(i for i, t in enumerate(r.timesteps) if t < 300)
    assert checked == [i for i in range(1, forced) if i % 3 == 0] + [forced]
    assert r.fire_index.tolist() == [forced]


def test_infinite_threshold_fires_only_at_min_step():
    pipe = stub_pipeline(removes_defect_at_high_noise, threshold=None)
    r = pipe(frames([0.0, 0.6]))
    assert r.fire_step.tolist() == [next(t for t in r.timesteps if t < 200)] * 2
    pipe0 = stub_pipeline(removes_defect_at_high_noise, threshold=None, min_step=0)
    r0 = pipe0(frames([0.6]))
    assert r0.fire_step.tolist() == [-1] and torch.isnan(r0.fire_score).all() and torch.isnan(r0.fire_maps).all()


def test_latent_difference_maps_on_known_latents():
    a = torch.zeros(2, 4, 8, 8)
    b = a.clone()
    b[1, :, 2, 3] = 2.0  # RMS over 4 channels of a difference of 2: 2
    m = latent_difference_maps(a, b, (16, 16))
    assert m.shape == (2, 16, 16) and float(m[0].abs().max()) == 0.0
    assert float(m[1].max()) == pytest.approx(2.0 * 0.75 ** 2, rel=1e-5)  # bilinear x2: the peak is spread
    peak = divmod(int(m[1].argmax()), 16)
    assert abs(peak[0] - 4.5) <= 1 and abs(peak[1] - 6.5) <= 1


def test_latent_check_fires_like_the_feature_check_without_decoding():
    amps = [0.0, 0.6]
    feats = stub_pipeline(removes_defect_at_high_noise, threshold=0.02)(frames(amps))
    pipe = stub_pipeline(removes_defect_at_high_noise, threshold=0.02, adp_space="latent")
    calls = []
    pipe.nets["vae_decoder"].module.register_forward_hook(lambda *a: calls.append(1))
    lat = pipe(frames(amps))
    assert len(calls) == 1  # the final decode only: no check decodes
    assert "adp_decode" not in lat.timings_ms and "adp_features" not in lat.timings_ms
    # the normal frame fuses at min_step, the defective one fires by threshold before it, in both spaces
    below = next(t for t in lat.timesteps if t < 200)
    assert lat.fire_step[0] == feats.fire_step[0] == below and not lat.fired_by_threshold[0]
    assert lat.fired_by_threshold[1] and lat.fire_step[1] > below
    # its map at the fire marks the defect region
    fm = lat.fire_maps[1]
    assert float(fm[REGION[0] > 0].mean()) > 3 * float(fm[REGION[0] == 0].mean())


def test_a_threshold_calibrated_in_the_other_space_is_not_used():
    inf = GLADInferenceConfig(adp_space="latent")
    with pytest.warns(UserWarning, match="proposed for adp_space 'features'"):
        assert usable_calibration(inf, {"images": 8}, 0.3, (0.1, 0.2)) == (None, None)
    assert usable_calibration(inf, {"adp_space": "latent"}, 0.3, (0.1, 0.2)) == (0.3, (0.1, 0.2))
    assert usable_calibration(GLADInferenceConfig(), None, 0.3, None) == (0.3, None)


TEXTURE = 0.3 * torch.randn(LAT, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0, 1, 1, 0]).view(4, 1, 1)


def hallucinates_texture(u, t):
    """A model whose normal differs from the input's everywhere (another tile's texture), fully at t >= 600."""
    g = min(max((t - 100) / 500, 0.0), 1.0)
    return u - g * (u - (NORMAL + TEXTURE))


def test_linear_weight_keeps_a_normal_frame_input_derived_where_minmax_does_not():
    x = frames([0.0])
    minmax = stub_pipeline(hallucinates_texture, threshold=None)(x)
    peak = float(minmax.fire_maps.max())
    # bounds above everything the frame's fire map holds: w = 0, the fused latent is the input-derived one
    keep = stub_pipeline(hallucinates_texture, threshold=None, weight_mode="linear",
                         weight_low=2 * peak, weight_high=4 * peak)(x)
    keep2 = stub_pipeline(hallucinates_texture, threshold=None, weight_mode="linear",
                          weight_low=3 * peak, weight_high=9 * peak)(x)
    torch.testing.assert_close(keep.reconstructions, keep2.reconstructions)
    torch.testing.assert_close(keep.fire_maps, minmax.fire_maps)  # the weight acts after the map is taken
    assert float(keep.scores[0]) < 0.5 * float(minmax.scores[0])
    # bounds below it: w = 1, the trajectory's estimate everywhere; farther from the input than either
    take = stub_pipeline(hallucinates_texture, threshold=None, weight_mode="linear", weight_low=-2.0,
                         weight_high=-1.0)(x)
    assert float(take.scores[0]) > float(minmax.scores[0])


def test_proposed_weight_bounds_on_known_maps():
    maps = np.full((3, 4, 4), np.nan)
    maps[:2] = np.arange(32, dtype=float).reshape(2, 4, 4)  # a frame that never fired: NaN, left out
    assert propose_weight_bounds(maps, 50.0, 2.0) == (15.5, 31.0)
    assert propose_weight_bounds(maps, 100.0, 1.5) == (31.0, 46.5)
    with pytest.raises(ValueError, match="no frame fired"):
        propose_weight_bounds(np.full((2, 4, 4), np.nan), 99.0, 2.0)
    with pytest.raises(ValueError, match="nothing to scale"):
        propose_weight_bounds(np.zeros((2, 4, 4)), 99.0, 2.0)


def test_linear_weight_bounds_come_from_config_else_calibration():
    with pytest.raises(ValueError, match="needs its bounds.*glad-threshold"):
        stub_pipeline(lambda u, t: u, threshold=None, weight_mode="linear")
    assert stub_pipeline(lambda u, t: u, None, weight_mode="linear", weight_low=0.1,
                         weight_high=0.3).weight_bounds == (0.1, 0.3)
    nets_from = stub_pipeline(lambda u, t: u, None)
    settings = GLADInferenceConfig(t0=750, steps=10, weight_mode="linear", weight_high=0.5)
    pipe = GLADPipeline(nets_from.nets, torch.zeros(1, 2, 4), SCHED, settings, GLADScoringConfig(),
                        weight_bounds=(0.2, 0.4))
    assert pipe.weight_bounds == (0.2, 0.5)  # the config's high wins over the calibrated one
    with pytest.raises(ValueError, match="must exceed"):
        GLADPipeline(nets_from.nets, torch.zeros(1, 2, 4), SCHED, settings, GLADScoringConfig(),
                     weight_bounds=(0.6, 0.9))
    with pytest.raises(ValueError, match="weight_high must exceed weight_low"):
        GLADInferenceConfig(weight_low=0.5, categories={"tile": {"weight_high": 0.4}})


# --------------------------------------------------------------------------- tiny real networks


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = build_config("glad", "tiny", {"train": {"prompt": "a tile"}, "inference": {"threshold": 0.0}})
    model = GLADModel(cfg).eval()
    return cfg, model, build_features(cfg)


def _frames(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g) * 2 - 1


def test_seeds_reproduce_scores(tiny):
    cfg, model, features = tiny
    pipe = model_pipeline(cfg, model, features)
    x = _frames()
    r1, r2 = pipe(x), pipe(x)
    assert torch.equal(r1.scores, r2.scores) and torch.equal(r1.maps, r2.maps)
    assert torch.equal(r1.fire_step, r2.fire_step)
    alone = pipe(x[1:2])
    torch.testing.assert_close(alone.scores, r1.scores[1:2], rtol=1e-4, atol=1e-5)
    assert r1.maps.shape == (3, 64, 64) and r1.reconstructions.shape == (3, 3, 64, 64)
    assert set(r1.timings_ms) == set(STAGES)
    other = model_pipeline(cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"seed": 1})}),
                          model, features)(x[:1])
    assert not torch.equal(other.reconstructions, r1.reconstructions[:1])


def test_category_settings_apply(tiny):
    cfg, model, features = tiny
    cfg2 = build_config("glad", "tiny", {"train": {"prompt": "a tile", "category": "tile"}, "inference": {
        "categories": {"tile": {"t0": 300, "steps": 3, "threshold": 0.5, "min_step": 50, "top_k": 7}}}})
    pipe = model_pipeline(cfg2, model, features)
    assert pipe.timesteps[0] == 300 and len(pipe.timesteps) == 3 and pipe.threshold == 0.5
    assert pipe.inference.min_step == 50 and pipe.inference.top_k == 7
    assert model_pipeline(cfg2, model, features, category="other").timesteps[0] == cfg2.inference.t0


def test_vit_extractor_with_local_weights(tiny, tmp_path):
    cfg, model, _ = tiny
    torch.manual_seed(0)
    kw = {"depth": 4, "embed_dim": 64, "num_heads": 2}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    vcfg = build_config("glad", "tiny", {"train": {"prompt": "a tile"}, "inference": {"threshold": 0.0},
                                         "features": {"name": "vit_tiny_patch16_224", "weights": str(path),
                                                      "allow_random": False, "model_kwargs": kw}})
    features = build_features(vcfg)
    assert features.kind == "vit" and features.weights_source == str(path)
    r = model_pipeline(vcfg, model, features)(_frames(2))
    assert r.maps.shape == (2, 64, 64) and torch.isfinite(r.scores).all()
    assert (r.fire_step >= 0).all() and torch.isfinite(r.fire_score).all()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("preset", ["tiny", "edge"])
def test_glad_presets_and_mtd_config(preset):
    from edgeinspect.config import GLADConfig, load_config

    cfg = build_config("glad", preset)
    assert isinstance(cfg, GLADConfig) and cfg.model == build_config("diad", preset).model  # a DiAD run can be the base
    from tests.conftest import REPO

    mtd = load_config(REPO / "configs" / "glad_mtd_edge.yaml")
    assert isinstance(mtd, GLADConfig) and mtd.category == "mtd" and mtd.train.init_from is not None


def test_glad_config_errors_name_the_field():
    from edgeinspect.config import ConfigError

    with pytest.raises(ConfigError, match="inference.categories.a.t0"):
        build_config("glad", "tiny", {"inference": {"categories": {"a": {"t0": 5000}}}})
    with pytest.raises(ConfigError, match="categories.a: steps=20 cannot exceed"):
        build_config("glad", "tiny", {"inference": {"categories": {"a": {"t0": 10, "steps": 20}}}})
    with pytest.raises(ConfigError, match="train.atp_step"):
        build_config("glad", "tiny", {"train": {"atp_step": 3}})


def test_vae_roundtrip_reference_compares_like_with_like(tiny):
    """scoring.reference = vae_roundtrip scores the reconstruction against decode(encode(x)); the
    reconstruction and the ADP firing are those of the plain reference."""
    cfg, model, features = tiny
    cfg_rt = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"reference": "vae_roundtrip"})})
    x = _frames()
    r = model_pipeline(cfg_rt, model, features)(x)
    plain_pipe = model_pipeline(cfg, model, features)
    plain = plain_pipe(x)
    assert torch.equal(plain.reconstructions, r.reconstructions) and torch.equal(plain.fire_step, r.fire_step)
    with torch.no_grad():
        roundtrip = model.vae.decode(model.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        scores, maps = plain_pipe.score(roundtrip, r.reconstructions)
    torch.testing.assert_close(r.scores, scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r.maps, maps, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain.maps, r.maps)


def test_the_anchor_encoder_makes_the_input_latents(tiny):
    """scoring.encoder anchor: z0 (the denoising's start, and the ADP checks' input-derived estimates) is the
    anchored autoencoder's resize encode and the full encoder is not run; vae_roundtrip still scores against the
    full autoencoder's round trip."""
    _, _, features = tiny
    torch.manual_seed(0)
    cfg = build_config("glad", "tiny", {"train": {"prompt": "a tile"}, "inference": {"threshold": 0.0},
                                        "model": {"vae": {"kind": "anchored"}}})
    model = GLADModel(cfg).eval()
    assert {"vae_anchor_encoder", "vae_anchor_decoder"} <= set(model.role_modules())
    torch.nn.init.normal_(model.vae.quant_conv.weight, std=0.05)  # a residual that shows

    def pipeline(**scoring):
        return model_pipeline(cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update=scoring)}), model,
                              features)

    def logged(pipe):
        log = []

        def counted(role, net):
            def call(**inputs):
                log.append(role)
                return net(**inputs)
            return call

        pipe.nets = Networks({r: counted(r, pipe.nets[r]) for r in pipe.nets}, pipe.nets.device)
        return pipe, log

    x = _frames()
    anchor, log = logged(pipeline(encoder="anchor"))
    r = anchor(x)
    assert log[0] == "vae_anchor_encoder" and "vae_encoder" not in log
    swapped = pipeline()  # the full pipeline with the anchor encoder in the full encoder's place
    swapped.nets = Networks({**swapped.nets._networks, "vae_encoder": swapped.nets["vae_anchor_encoder"]})
    same = swapped(x)
    assert torch.equal(r.reconstructions, same.reconstructions) and torch.equal(r.fire_step, same.fire_step)
    assert not torch.allclose(r.reconstructions, pipeline()(x).reconstructions)
    roundtrip, log = logged(pipeline(encoder="anchor", reference="vae_roundtrip"))
    r_rt = roundtrip(x)
    assert log[0] == "vae_anchor_encoder" and log.count("vae_encoder") == 1
    assert torch.equal(r.reconstructions, r_rt.reconstructions)
    with torch.no_grad():
        full_rt = model.vae.decode(model.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    torch.testing.assert_close(r_rt.scores, anchor.score(full_rt, r.reconstructions)[0], rtol=1e-4, atol=1e-5)


def test_draws_run_as_one_stacked_batch(tiny):
    """inference.draws = 3 makes exactly the network calls of one draw, each on 3x the rows (a GPU step of
    this small model is launch-bound, so stacking is what makes extra draws cheap there); the input is
    encoded once, and its features for the final maps are extracted once for all draws."""
    from edgeinspect.core.networks import Networks

    cfg, model, features = tiny

    def calls(draws: int) -> list[tuple[str, int]]:
        pipe = model_pipeline(cfg.model_copy(update={"inference": cfg.inference.model_copy(
            update={"draws": draws, "min_step": 1000})}), model, features)
        log = []

        def counted(role, net):
            def call(**inputs):
                log.append((role, next(iter(inputs.values())).shape[0]))
                return net(**inputs)
            return call

        pipe.nets = Networks({r: counted(r, pipe.nets[r]) for r in pipe.nets}, pipe.nets.device)
        pipe(_frames())
        return log

    one, three = calls(1), calls(3)
    assert [r for r, _ in three] == [r for r, _ in one]  # same calls, same order
    frames = _frames().shape[0]
    assert one[0] == three[0] == ("vae_encoder", frames)
    assert one[-1] == ("features", 2 * frames) and three[-1] == ("features", frames + 3 * frames)
    for (role, rows1), (_, rows3) in zip(one[1:-1], three[1:-1]):
        assert rows3 == 3 * rows1, role


def test_draws_average_the_maps_of_single_draws_with_successive_seeds(tiny):
    """inference.draws = 3: the map is the mean of the maps that draws = 1 gives with seeds 5, 6, 7 (the
    same input latents and round-trip reference), the score its top-K mean; per-draw scores and firing
    steps are each single draw's, the other fields the first draw's."""
    cfg, model, features = tiny

    def with_inference(**update):
        return cfg.model_copy(update={
            "inference": cfg.inference.model_copy(update=update),
            "scoring": cfg.scoring.model_copy(update={"reference": "vae_roundtrip"})})

    x = _frames()
    ens = model_pipeline(with_inference(seed=5, draws=3), model, features)(x)
    singles = [model_pipeline(with_inference(seed=s), model, features)(x) for s in (5, 6, 7)]
    mean_map = torch.stack([s.maps for s in singles]).mean(0)
    torch.testing.assert_close(ens.maps, mean_map, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ens.scores, topk_mean_score(mean_map, cfg.inference.top_k), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ens.draw_scores, torch.stack([s.scores for s in singles], 1), rtol=1e-4, atol=1e-6)
    assert torch.equal(ens.draw_fire_steps, torch.stack([s.fire_step for s in singles], 1))
    # the draws run as one stacked batch: equal to one draw alone up to the float rounding of a larger batch
    torch.testing.assert_close(ens.reconstructions, singles[0].reconstructions, rtol=1e-4, atol=1e-5)
    assert torch.equal(ens.fire_step, singles[0].fire_step)
    torch.testing.assert_close(ens.adp_scores, singles[0].adp_scores, rtol=1e-4, atol=1e-6, equal_nan=True)
    # the draws differ, so the mean is not any one of them
    assert not torch.allclose(singles[0].maps, singles[1].maps)
    one = singles[0]
    assert one.draw_scores.shape == (3, 1) and torch.equal(one.draw_scores[:, 0], one.scores)
    # per category, and validated
    cat = build_config("glad", "tiny", {"train": {"prompt": "a tile", "category": "tile"},
                                        "inference": {"categories": {"tile": {"draws": 4}}}})
    assert model_pipeline(cat, model, features).inference.draws == 4
    from edgeinspect.config import ConfigError

    with pytest.raises(ConfigError, match="inference.draws"):
        build_config("glad", "tiny", {"inference": {"draws": 0}})
