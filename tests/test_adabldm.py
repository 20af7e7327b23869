"""AdaBLDM: training stages, Algorithm 1's blends, Algorithm 2's adaptation, resumable generation."""

import json

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import edgeinspect.generation.adabldm as gen_mod
from edgeinspect.cli import main
from edgeinspect.config import ConfigError, build_config
from edgeinspect.generation.adabldm import generate_adabldm
from edgeinspect.core.roles import ROLE_SIGNATURES
from edgeinspect.models.adabldm import AdaBLDMModel
from edgeinspect.runtime.adaptation import LatentDecoder, adapt_decoder
from edgeinspect.runtime.blended import BlendedSampler, latent_mask
from edgeinspect.core.ddim import DDIM
from edgeinspect.generation.writer import load_index
from edgeinspect.core.networks import torch_networks
from edgeinspect.training.adabldm import load_adabldm, train_adabldm
from edgeinspect.training.diad import train_diad
from tests.conftest import check_resume_bit_for_bit

SEEDS = {"scratch": ["000.png", "001.png"]}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from tests.conftest import make_mvtec

    return make_mvtec(tmp_path_factory.mktemp("ada") / "cat", n_train=6, n_good=2, n_defect=3)


@pytest.fixture(scope="module")
def base(data_root, tmp_path_factory):
    cfg = build_config("diad", "tiny", {"train": {"data_root": str(data_root), "prompt": "a tile",
                                                  "autoencoder_steps": 2, "unet_steps": 2, "guidance_steps": 0}})
    run = tmp_path_factory.mktemp("base") / "run"
    train_diad(cfg, run, progress=False)
    return run


def _cfg(data_root, base, **train):
    t = {"data_root": str(data_root), "init_from": str(base), "seeds": SEEDS, "object_name": "tile"}
    t.update(train)
    return build_config("adabldm", "tiny", {"train": t})


@pytest.fixture(scope="module")
def run(data_root, base, tmp_path_factory):
    run = tmp_path_factory.mktemp("adarun") / "run"
    train_adabldm(_cfg(data_root, base), run, progress=False)
    return run


def test_training_stages_train_what_they_should(run, base):
    final = load_file(str(run / "checkpoints/done/model.safetensors"))
    after_domain = load_file(str(run / "checkpoints/domain-final/model.safetensors"))
    start = load_file(str(base / "checkpoints/unet-final/model.safetensors"))
    unet_keys = [k for k in final if k.startswith("unet.")]
    ctrl_keys = [k for k in final if k.startswith("controls.scratch.")]
    assert unet_keys and ctrl_keys
    # the domain stage moved the UNet away from the base; the control stage left it frozen
    assert any(not torch.equal(after_domain[k], start[k]) for k in unet_keys)
    assert all(torch.equal(final[k], after_domain[k]) for k in unet_keys)
    assert all(torch.equal(final[k], start[k]) for k in start if k.startswith("vae."))
    # the control's zero convs left zero: it learnt something
    zero_convs = [k for k in ctrl_keys if "zero_conv" in k and k.endswith("weight")]
    assert any(final[k].abs().sum() > 0 for k in zero_convs)
    seeds = json.loads((run / "seeds.json").read_text())
    assert seeds == SEEDS


def test_interrupted_training_resumes_bit_for_bit(data_root, base, tmp_path, monkeypatch):
    from edgeinspect.data.batches import TrainingBatches

    cfg = _cfg(data_root, base, domain_steps=5, control_steps=2)
    check_resume_bit_for_bit(train_adabldm, cfg, tmp_path, TrainingBatches, monkeypatch, "domain")


def test_missing_base_and_seeds_say_what_to_do(data_root, base, tmp_path):
    with pytest.raises(ValueError, match="train.init_from is not set"):
        train_adabldm(_cfg(data_root, base, init_from=None), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="needs real seed defects"):
        train_adabldm(_cfg(data_root, base, seeds={}), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="have no seeds"):
        train_adabldm(_cfg(data_root, base, defect_types=["hole"]), tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="sampling"):
        build_config("adabldm", "tiny", {"sampling": {"free_steps": 0, "latent_steps": 0, "pixel_steps": 0}})


def _sampler(model, cfg, device="cpu"):
    nets = torch_networks(model.role_modules("scratch"), device, ROLE_SIGNATURES)
    return BlendedSampler(nets, DDIM(cfg.scheduler), cfg.sampling, cfg.model.vae.downsample_factor), nets


def _inputs(cfg, b=2):
    size = cfg.model.image_size
    g = torch.Generator().manual_seed(0)
    x_ok = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 20:36, 24:40] = 1
    trimap = 0.5 + 0.5 * mask
    return x_ok, mask, trimap


def test_latent_stage_keeps_the_noised_source_outside_the_mask(run):
    cfg, model, _ = load_adabldm(run, {"sampling": {"free_steps": 1, "latent_steps": 3, "pixel_steps": 1,
                                                    "mask_dilation": 1}})
    sampler, nets = _sampler(model, cfg)
    x_ok, mask, trimap = _inputs(cfg)
    ctx = model.prompt_encoder(["a tile with a scratch"] * 2).detach()
    res = sampler.sample(x_ok, mask, trimap, ctx, [1, 2], trace=True)
    m_z = latent_mask(mask, cfg.model.vae.downsample_factor, 1)
    assert m_z.sum() > mask.sum() / cfg.model.vae.downsample_factor ** 2  # dilated
    latent_steps = [tr for tr in res.trace if tr[0] == "latent"]
    assert len(latent_steps) == 3
    for _, t, z, source_t in latent_steps:
        outside = (1 - m_z).bool().expand_as(z)
        torch.testing.assert_close(z[outside], source_t[outside], rtol=0, atol=0)
        assert not torch.allclose(z[~outside], source_t[~outside])
    # the source is the encoded x_ok noised to that step's level
    z_ok = nets["vae_encoder"](image=x_ok)["latent"]
    _, t, _, source_t = latent_steps[-1]
    a = DDIM(cfg.scheduler).abar(t, z_ok)
    implied_noise = (source_t - a.sqrt() * z_ok) / (1 - a).sqrt()
    assert 0.5 < implied_noise.std() < 1.5


def test_pixel_stage_returns_the_source_outside_the_mask_up_to_vae_error(run):
    cfg, model, _ = load_adabldm(run, {"sampling": {"free_steps": 2, "latent_steps": 1, "pixel_steps": 2}})
    sampler, nets = _sampler(model, cfg)
    x_ok, mask, trimap = _inputs(cfg)
    ctx = model.prompt_encoder(["a tile with a scratch"] * 2).detach()
    res = sampler.sample(x_ok, mask, trimap, ctx, [5, 6])
    roundtrip = nets["vae_decoder"](latent=nets["vae_encoder"](image=x_ok)["latent"])["image"].clamp(-1, 1)
    # far from the mask (beyond the tiny autoencoder's reach) the output is the source's round trip
    far = torch.ones_like(mask)
    far[:, :, 12:44, 16:48] = 0
    out_err = ((res.images - x_ok).abs() * far).sum() / far.sum() / 3
    vae_err = ((roundtrip - x_ok).abs() * far).sum() / far.sum() / 3
    assert out_err <= vae_err * 1.05 + 1e-3


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *a):
        return self.fn(*a)


def _stand_in_networks():
    """A perfect autoencoder (latent = image) and a UNet that always predicts the same noise."""
    modules = {
        "vae_encoder": _Fn(lambda x: x.clone()),
        "vae_decoder": _Fn(lambda z: z.clone()),
        "trimap_encoder": _Fn(lambda m: torch.zeros(m.shape[0], 4, *m.shape[-2:])),
        "unet": _Fn(lambda z, t, ctx, hint: 0.5 * torch.ones_like(z)),
    }
    return torch_networks(modules, "cpu", ROLE_SIGNATURES)


@pytest.mark.parametrize("pixel_steps, exact", [(2, True), (0, False)])
def test_pixel_stage_output_is_the_source_outside_the_mask(pixel_steps, exact):
    cfg = build_config("adabldm", "tiny", {"sampling": {"free_steps": 2, "latent_steps": 2,
                                                        "pixel_steps": pixel_steps}})
    sampler = BlendedSampler(_stand_in_networks(), DDIM(cfg.scheduler), cfg.sampling, latent_factor=1)
    x_ok, mask, trimap = _inputs(cfg)
    res = sampler.sample(x_ok, mask, trimap, torch.zeros(2, 4, 16), [1, 2])
    outside = (mask == 0).expand_as(x_ok)
    if exact:
        torch.testing.assert_close(res.images[outside], x_ok[outside], rtol=0, atol=1e-6)
    else:
        assert (res.images[outside] - x_ok[outside]).abs().mean() > 0.05
    assert (res.images[~outside] - x_ok[~outside]).abs().mean() > 0.05  # the defect region was generated


@pytest.mark.parametrize("uncond_trimap", ["same", "no_defect"])
def test_guidance_rows_get_the_trimap_they_should(uncond_trimap):
    """The guided (defect prompt) rows always see the defect trimap; the unguided rows see it too
    ("same") or the trimap with its defect region made plain foreground ("no_defect")."""
    cfg = build_config("adabldm", "tiny", {"sampling": {"free_steps": 2, "latent_steps": 0, "pixel_steps": 0,
                                                        "guidance_scale": 3.0, "uncond_trimap": uncond_trimap}})
    seen = []

    def unet(z, t, ctx, hint):
        seen.append(hint.clone())
        return torch.zeros_like(z)

    modules = {"vae_encoder": _Fn(lambda x: x.clone()), "vae_decoder": _Fn(lambda z: z.clone()),
               "trimap_encoder": _Fn(lambda m: m.expand(-1, 4, -1, -1).clone()), "unet": _Fn(unet)}
    sampler = BlendedSampler(torch_networks(modules, "cpu", ROLE_SIGNATURES), DDIM(cfg.scheduler), cfg.sampling,
                             latent_factor=1)
    x_ok, mask, trimap = _inputs(cfg)
    assert (trimap == 1).any() and (trimap == 0.5).any()
    sampler.sample(x_ok, mask, trimap, torch.ones(2, 4, 16), [1, 2], uncond_context=torch.zeros(2, 4, 16))
    assert len(seen) == 2
    uncond_rows, cond_rows = seen[0][:2, :1], seen[0][2:, :1]
    assert torch.equal(cond_rows, trimap)
    expected = trimap if uncond_trimap == "same" else torch.where(trimap == 1, torch.full_like(trimap, 0.5), trimap)
    assert torch.equal(uncond_rows, expected)


def test_samples_depend_on_their_seed_only(run):
    cfg, model, _ = load_adabldm(run)
    sampler, _ = _sampler(model, cfg)
    x_ok, mask, trimap = _inputs(cfg, 3)
    ctx = model.prompt_encoder(["a tile with a scratch"] * 3).detach()
    batch = sampler.sample(x_ok, mask, trimap, ctx, [7, 8, 9]).latents
    alone = sampler.sample(x_ok[1:2], mask[1:2], trimap[1:2], ctx[1:2], [8]).latents
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_decoder_adaptation_lowers_the_normal_region_loss_and_keeps_the_original(run):
    _, model, _ = load_adabldm(run)
    decoder = LatentDecoder.from_vae(model.vae)
    original = {k: v.clone() for k, v in decoder.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    size = model.cfg.model.image_size
    z = torch.randn(4, size // 2, size // 2, generator=g)
    ramp = torch.linspace(-0.8, 0.8, size)
    x_ok = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        torch.zeros(size, size)])  # a smooth normal image a decoder can learn
    mask = torch.zeros(1, size, size)
    mask[:, 10:30, 10:30] = 1
    res = adapt_decoder(decoder, z, x_ok, mask, steps=40, lr=3e-3, lambda_con=100.0)
    assert res.loss_outside[-1] < 0.8 * res.loss_outside[0]
    final_outside = (((res.image - x_ok) ** 2) * (1 - mask)).sum() / (1 - mask).sum() / 3
    first_outside = (((res.before - x_ok) ** 2) * (1 - mask)).sum() / (1 - mask).sum() / 3
    assert final_outside < first_outside
    # the defect region stays close to what the original decoder drew (lambda_con)
    inside = (((res.image - res.before) ** 2) * mask).sum() / mask.sum() / 3
    assert inside < 0.1 * first_outside
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_generation_resumes_without_duplicates_or_gaps(run, tmp_path, monkeypatch):
    whole = generate_adabldm(run, tmp_path / "whole", n_per_type=4, progress=False)
    calls = {"n": 0}
    real_write = gen_mod.GenerationWriter.write

    def dying_write(self, i, *a, **k):
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real_write(self, i, *a, **k)

    monkeypatch.setattr(gen_mod.GenerationWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generate_adabldm(run, tmp_path / "killed", n_per_type=4, progress=False)
    assert len(load_index(tmp_path / "killed")["items"]) == 3
    monkeypatch.setattr(gen_mod.GenerationWriter, "write", real_write)
    generate_adabldm(run, tmp_path / "killed", n_per_type=4, progress=False)
    a, b = load_index(whole)["items"], load_index(tmp_path / "killed")["items"]
    assert sorted(map(int, b)) == [0, 1, 2, 3]
    import cv2

    for k in a:
        assert a[k]["seed"] == b[k]["seed"] and a[k]["source_image"] == b[k]["source_image"]
        ia = cv2.imread(str(whole / a[k]["image"]))
        ib = cv2.imread(str(tmp_path / "killed" / b[k]["image"]))
        assert np.abs(ia.astype(int) - ib.astype(int)).max() <= 1
        mask = cv2.imread(str(whole / a[k]["mask"]), 0) > 0
        trimap = cv2.imread(str(whole / a[k]["trimap"]), 0)
        assert mask.any() and (trimap[mask] == 255).all() and set(np.unique(trimap)) <= {0, 128, 255}


def test_cli_train_and_generate(data_root, base, tmp_path, capsys):
    cfg = tmp_path / "a.yaml"
    cfg.write_text(f"method: adabldm\nmodel: {{preset: tiny}}\ntrain:\n  data_root: {data_root}\n"
                   f"  init_from: {base}\n  seeds: {{scratch: ['000.png']}}\n")
    assert main(["train", "adabldm", "--config", str(cfg), "--run", str(tmp_path / "run"), "--quiet"]) == 0
    out = tmp_path / "gen"
    assert main(["generate", "adabldm", "--model", str(tmp_path / "run"), "--out", str(out), "--per-type", "2",
                 "--quiet", "--set", "sampling.adapt_steps=1"]) == 0
    index = load_index(out)
    assert len(index["items"]) == 2 and index["settings"]["sampling"]["adapt_steps"] == 1
    assert "2 images" in capsys.readouterr().out
    assert main(["generate", "adabldm", "--model", str(tmp_path / "run"), "--out", str(out), "--per-type", "2",
                 "--quiet", "--set", "sampling.adapt_steps=2"]) == 2
    assert "different settings" in capsys.readouterr().err


def test_model_rejects_an_unknown_defect_type(run):
    _, model, _ = load_adabldm(run)
    assert isinstance(model, AdaBLDMModel)
    with pytest.raises(KeyError, match="no control branch for defect type 'hole'"):
        model.role_modules("hole")
    hint = model.role_modules("scratch")["trimap_encoder"](torch.full((1, 1, 64, 64), 0.5))
    assert hint.shape == (1, model.unet.config.block_out_channels[0], 32, 32)


def test_tail_adaptation_matches_the_decoder_and_trains_only_the_tail(run):
    _, model, _ = load_adabldm(run)
    decoder = LatentDecoder.from_vae(model.vae)
    size = model.cfg.model.image_size
    z = torch.randn(1, 4, size // 2, size // 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model.vae.decode(z / model.scaling_factor).sample
        torch.testing.assert_close(decoder(z), reference, rtol=1e-5, atol=1e-5)
    x_ok = torch.zeros(3, size, size)
    mask = torch.zeros(1, size, size)
    mask[:, 5:15, 5:15] = 1
    res = adapt_decoder(decoder, z[0], x_ok, mask, steps=15, lr=3e-3, lambda_con=100.0, scope="last_up_block")
    assert res.loss_outside[-1] < res.loss_outside[0]
    with pytest.raises(ValueError, match="scope"):
        adapt_decoder(decoder, z[0], x_ok, mask, steps=1, lr=1e-3, lambda_con=1.0, scope="encoder")


def test_items_do_not_depend_on_which_other_types_share_the_job():
    from edgeinspect.config import PlacementConfig
    from edgeinspect.generation.adabldm import plan_item
    from edgeinspect.generation.writer import item_seed

    rng = np.random.default_rng(0)
    fg = np.ones((6, 32, 32), bool)
    masks = {t: rng.random((3, 32, 32)) > 0.9 for t in ("crack", "break")}
    alone = [plan_item(j, 5, ["crack"], 4, 6, masks, fg, PlacementConfig()) for j in range(4)]
    shared = [plan_item(4 + j, 5, ["break", "crack"], 4, 6, masks, fg, PlacementConfig()) for j in range(4)]
    for a, b in zip(alone, shared):
        assert a.seed == b.seed == item_seed(5, "crack", a.index)
        assert (a.normal, a.seed_defect, a.placement) == (b.normal, b.seed_defect, b.placement)
        assert np.array_equal(a.mask, b.mask)
    # another type's item j has its own seed: per-type jobs do not reuse each other's draws
    others = [plan_item(j, 5, ["break", "crack"], 4, 6, masks, fg, PlacementConfig()) for j in range(4)]
    assert {p.seed for p in others}.isdisjoint({p.seed for p in alone})
    assert len({item_seed(5, t, j) for t in ("crack", "break", "blowhole") for j in range(100)}) == 300


def test_planned_edge_seeds_stay_on_the_edge():
    """sampling.placement.edge_band reaches the generation plan: a seed cut into the left edge is
    placed on the left or right edge (half turns), the others anywhere."""
    from edgeinspect.config import PlacementConfig
    from edgeinspect.data.trimap import frame_contact
    from edgeinspect.generation.adabldm import plan_item

    edge_seed = np.zeros((32, 32), bool)
    edge_seed[10:18, 0:5] = True
    inner_seed = np.zeros((32, 32), bool)
    inner_seed[12:16, 12:18] = True
    masks = {"break": np.stack([edge_seed, inner_seed])}
    fg = np.ones((3, 32, 32), bool)
    placement = PlacementConfig(edge_band=2)
    sides = set()
    for j in range(24):
        p = plan_item(j, 1, ["break"], 24, 3, masks, fg, placement)
        contact = frame_contact(p.mask, 2)
        assert p.placement["edge"] == (p.seed_defect == 0)
        if p.seed_defect == 0:
            assert set(contact) in ({"left"}, {"right"}) and p.placement["angle"] in (0.0, 180.0)
            sides |= set(contact)
        free = plan_item(j, 1, ["break"], 24, 3, masks, fg, PlacementConfig())
        assert free.seed_defect == p.seed_defect and free.placement["edge"] is False
    assert sides == {"left", "right"}


def test_paste_back_keeps_the_exact_source_beyond_the_feather():
    from edgeinspect.runtime.blended import paste_back

    gen = torch.full((3, 32, 32), 0.8)
    src = torch.linspace(-1, 1, 32 * 32).reshape(1, 32, 32).expand(3, -1, -1).clone()
    mask = torch.zeros(1, 32, 32)
    mask[0, 10:14, 12:20] = 1
    out = paste_back(gen, src, mask, feather=4)
    inside = mask[0] > 0
    assert torch.equal(out[:, inside], gen[:, inside])
    far = ~torch.from_numpy(cv2.dilate(mask[0].numpy().astype(np.uint8), np.ones((9, 9), np.uint8)) > 0)
    assert torch.equal(out[:, far], src[:, far])  # the real image, not a reconstruction
    w = (out - src) / (gen - src)  # the blend weight: 1 on the mask, falling off outside it
    assert 0 < w[0, 10, 21] < 1 and w[0, 10, 21] > w[0, 10, 22]
    assert torch.equal(paste_back(gen, src, torch.zeros(1, 32, 32), 4), src)


def test_paste_residual_adds_the_change_to_the_real_source():
    from edgeinspect.runtime.blended import paste, paste_residual

    src = torch.linspace(-0.5, 0.5, 32 * 32).reshape(1, 32, 32).expand(3, -1, -1).clone()
    recon = src * 0.5  # a smooth reconstruction of the source
    gen = recon.clone()
    mask = torch.zeros(1, 32, 32)
    mask[0, 10:14, 12:20] = 1
    gen[:, 10:14, 12:20] -= 0.3  # the defect: darker than the reconstruction where the mask is
    out = paste_residual(gen, recon, src, mask, feather=4)
    inside = mask[0] > 0
    assert torch.allclose(out[:, inside], src[:, inside] - 0.3)  # the source's own values, darkened
    far = ~torch.from_numpy(cv2.dilate(mask[0].numpy().astype(np.uint8), np.ones((9, 9), np.uint8)) > 0)
    assert torch.equal(out[:, far], src[:, far])
    assert torch.equal(paste_residual(recon, recon, src, mask, 4), src)  # no change made, none pasted
    assert paste_residual(gen - 5, recon, src, mask, 4).min() == -1  # clamped to the image range
    with pytest.raises(ValueError, match="reconstruction"):
        paste(gen, None, src, mask, 4, "residual")


def test_residual_paste_writes_the_exact_source_outside_the_feather(run, data_root, tmp_path):
    """sampling.paste_mode residual: the sampler also decodes the source's latent; the written image is
    the source image beyond the feather (uint8-exact) and source + (x* - reconstruction) on the mask,
    x* being the image before (no) adaptation."""
    with pytest.raises(ConfigError, match="adapt_steps: 0"):
        load_adabldm(run, {"sampling": {"paste_feather": 2, "paste_mode": "residual"}})
    over = {"sampling": {"paste_feather": 2, "paste_mode": "residual", "adapt_steps": 0}}
    out = generate_adabldm(run, tmp_path / "res", n_per_type=2, progress=False, overrides=over)
    cfg, net, _ = load_adabldm(run, over)
    index = load_index(out)
    from edgeinspect.data.mvtec import read_image, resize_image

    for it in index["items"].values():
        assert "adaptation_loss" not in it
        image = cv2.imread(str(out / it["image"]))[..., ::-1].astype(int)
        before = cv2.imread(str(out / it["before_adaptation"]))[..., ::-1].astype(int)
        mask = cv2.imread(str(out / it["mask"]), 0) > 0
        source = resize_image(read_image(data_root / "train/good" / it["source_image"]),
                              cfg.model.image_size).astype(int)
        with torch.no_grad():
            x = torch.from_numpy(source).permute(2, 0, 1)[None].float() / 127.5 - 1
            nets = net.role_modules("scratch")
            recon = nets["vae_decoder"](nets["vae_encoder"](x)).clamp(-1, 1)[0]
        recon = ((recon + 1) * 127.5).round().permute(1, 2, 0).numpy()
        far = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
        assert np.array_equal(image[far], source[far])
        expect = np.clip(source + before - recon, 0, 255)[mask]
        assert np.abs(image[mask] - expect).max() <= 2  # uint8 rounding of x* and of the output


def test_control_loss_is_weighted_on_the_pasted_defect(data_root, base, tmp_path, monkeypatch):
    """train.defect_loss_weight: the control loss gets the composite's pasted-defect mask, which is the
    trimap's defect region (value 1) of the same, identically flipped, composite."""
    import edgeinspect.training.adabldm as ada_training
    from edgeinspect.models.guidance import GuidanceNet

    trimaps, seen = [], []
    real_hint, real_loss = GuidanceNet.encode_hint, ada_training.defect_weighted_mse

    def hint_spy(self, trimap):
        trimaps.append(trimap.clone())
        return real_hint(self, trimap)

    def loss_spy(pred, target, mask, weight):
        seen.append((mask.clone(), weight))
        return real_loss(pred, target, mask, weight)

    monkeypatch.setattr(GuidanceNet, "encode_hint", hint_spy)
    monkeypatch.setattr(ada_training, "defect_weighted_mse", loss_spy)
    train_adabldm(_cfg(data_root, base, domain_steps=0, control_steps=3, defect_loss_weight=4.0), tmp_path / "r",
                  progress=False)
    assert len(seen) == len(trimaps) == 3 and {w for _, w in seen} == {4.0}
    for (mask, _), trimap in zip(seen, trimaps):
        assert mask.any() and torch.equal(mask > 0.5, trimap == 1.0)


def test_downstream_roundtrip_is_the_models_autoencoder(run):
    from benchmarks.downstream import autoencoder_roundtrip

    cfg, model, _ = load_adabldm(run / "checkpoints/done")
    size = cfg.model.image_size
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = autoencoder_roundtrip(run / "checkpoints/done", size)(image)
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        ref = model.vae.decode(model.vae.encode(x).latent_dist.mean).sample[0]
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ((ref.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()).max() <= 1
    with pytest.raises(ValueError, match="px"):
        autoencoder_roundtrip(run / "checkpoints/done", size * 2)


def test_control_composites_redraw_a_seed_that_does_not_fit_then_say_so(data_root, base, tmp_path, monkeypatch):
    """A seed that does not fit a normal image's foreground is redrawn; when none fits, training stops
    with the reason instead of crashing on the placement's own error mid-batch."""
    import edgeinspect.training.adabldm as ada_training
    from edgeinspect.data.trimap import MaskDoesNotFit

    real, calls = ada_training.cut_paste, []

    def first_fails(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise MaskDoesNotFit("too wide")
        return real(*args, **kwargs)

    monkeypatch.setattr(ada_training, "cut_paste", first_fails)
    cfg = _cfg(data_root, base, domain_steps=0, control_steps=1)
    train_adabldm(cfg, tmp_path / "ok", progress=False)
    assert len(calls) == cfg.train.batch_size + 1  # one redraw, then one composite per batch item
    assert {k for k in calls[0]} >= {"rotation", "scale", "tries", "min_shrink", "edge_band", "edge_turns"}

    def never_fits(*args, **kwargs):
        raise MaskDoesNotFit("too wide")

    monkeypatch.setattr(ada_training, "cut_paste", never_fits)
    with pytest.raises(MaskDoesNotFit, match=r"no \w+ seed fits normal image \d+ in 20 draws.*too wide"):
        train_adabldm(cfg, tmp_path / "never", progress=False)
