"""The anchored autoencoder: it starts as its linear code (block PCA or the equal-size resize), learns
residuals, keeps its latent statistics, and survives every path a diffusers autoencoder goes through
(config, adaptation, reuse)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edgeinspect.config import ConfigError, build_config
from edgeinspect.models.autoencoder import AnchoredAutoencoderKL, autoencoder_from_config, block_dct_basis
from edgeinspect.models.diad import DiADModel
from edgeinspect.runtime.adaptation import LatentDecoder, adapt_decoder
from edgeinspect.training.diad import train_diad
from edgeinspect.training.loop import Stage


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    small = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), side)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).repeat(1, 3, 1, 1)


@pytest.mark.parametrize("blocks, channels, side", [((8, 16, 16, 16), 16, 32), ((8, 16, 16), 4, 32),
                                                    ((8, 16), 4, 64)])
def test_untrained_is_the_equal_size_resize(blocks, channels, side):
    ae = AnchoredAutoencoderKL(block_out_channels=blocks, latent_channels=channels, norm_num_groups=4,
                               sample_size=64, anchor_kind="resize").eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x).latent_dist.mean
        out = ae.decode(z).sample
    f = 2 ** (len(blocks) - 1)
    assert z.shape == (2, channels, 64 // f, 64 // f)
    assert z.numel() // 2 == side * side  # as many values as the resize
    torch.testing.assert_close(out, _resize(x, side), atol=1e-5, rtol=0)


def test_shift_centres_the_latent_and_keeps_the_round_trip():
    ae = AnchoredAutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4).eval()
    torch.nn.init.normal_(ae.decoder.conv_out.weight, std=0.05)  # a residual that sees the raw latent
    x = torch.rand(2, 3, 32, 32) * 0.5 + 0.3
    with torch.no_grad():
        z0 = ae.encode(x).latent_dist.mean
        out0 = ae.decode(z0).sample
        ae.set_latent_shift(float(z0.mean()))
        z1 = ae.encode(x).latent_dist.mean
        out1 = ae.decode(z1).sample
    torch.testing.assert_close(z1, z0 - z0.mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=0)
    assert "anchor.latent_shift" in ae.state_dict()


def test_residuals_receive_gradients_from_the_start():
    ae = AnchoredAutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = (ae.decode(ae.encode(x).latent_dist.mean).sample - x).pow(2).mean()
    loss.backward()
    for conv in (ae.quant_conv, ae.decoder.conv_out):  # zero-initialised, still learning
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_fit_latent_statistics_gives_centred_unit_latents():
    cfg = build_config("diad", "tiny", {"model": {"vae": {"kind": "anchored"}}})
    model = DiADModel(cfg)
    x = torch.rand(6, 3, 64, 64) * 0.4 + 0.2
    with torch.no_grad():
        raw = model.vae.encode(x).latent_dist.mean
        fitted = model.fit_latent_statistics(raw)
        again = model.vae.encode(x).latent_dist.mean * model.scaling_factor
    assert abs(float(fitted.mean())) < 1e-4 and abs(float(fitted.std()) - 1) < 1e-4
    torch.testing.assert_close(again, fitted, atol=1e-4, rtol=0)


def test_latent_layouts_that_cannot_hold_the_anchor_are_refused():
    resize = {"anchor": "resize"}
    with pytest.raises(ConfigError, match="latent_channels = image channels x k"):
        build_config("diad", "edge", {"model": {"vae": {**resize, "latent_channels": 8}}})
    with pytest.raises(ConfigError, match="latent_channels = image channels x k"):
        build_config("diad", "edge", {"model": {"vae": {**resize, "grey": False, "latent_channels": 16}}})
    cfg = build_config("diad", "edge", {"model": {"vae": {**resize, "grey": False, "latent_channels": 12}}})
    assert cfg.model.vae.latent_channels == 12
    # the block PCA takes any count up to the block's values: f = 8, grey -> at most 64
    assert build_config("diad", "edge", {"model": {"vae": {"latent_channels": 8}}}).model.vae.anchor == "pca"
    with pytest.raises(ConfigError, match="at most 64 latent channels, not 128"):
        build_config("diad", "edge", {"model": {"vae": {"latent_channels": 128, "norm_num_groups": 16}}})
    with pytest.raises(ValueError, match="anchor_kind must be 'pca' or 'resize'"):
        AnchoredAutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, anchor_kind="dct")


def _low_rank_texture(n: int, f: int, rank: int, seed: int) -> torch.Tensor:
    """Grey images whose f x f blocks are a mean block plus `rank` fixed patterns: (n, 3, 8f, 8f), [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.linalg.qr(torch.randn(f * f, rank, generator=g, dtype=torch.float64))[0].T.float()
    mean = torch.rand(f * f, generator=g) * 0.4 - 0.2
    coeff = torch.randn(n, 64, rank, generator=g) * 0.3
    blocks = coeff @ patterns + mean  # (n, 64 blocks, f*f)
    grey = F.fold(blocks.transpose(1, 2), (8 * f, 8 * f), f, stride=f)
    return grey.repeat(1, 3, 1, 1)


def test_block_pca_anchor_recovers_the_blocks_subspace():
    """Fitted on images whose 4x4 blocks span 4 patterns, a 4-component PCA anchor is lossless on new images of
    the same kind, its basis is orthonormal, and the untrained autoencoder round trip is the PCA's."""
    ae = AnchoredAutoencoderKL(block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=4,
                               anchor_kind="pca").eval()
    train, test = _low_rank_texture(6, 4, 4, seed=0), _low_rank_texture(2, 4, 4, seed=0)[:, :, :16]
    ae.fit_anchor(train[i:i + 2] for i in range(0, 6, 2))
    b = ae.anchor.basis.flatten(1)
    torch.testing.assert_close(b @ b.T, torch.eye(4), atol=1e-5, rtol=0)
    with torch.no_grad():
        z = ae.encode(test).latent_dist.mean
        out = ae.decode(z).sample
    assert z.shape == (2, 4, 4, 8)
    torch.testing.assert_close(out, test, atol=1e-4, rtol=0)
    # components come largest variance first, and refitting on the same images gives the same basis
    var = ae.anchor_only_encode(train).var(dim=(0, 2, 3))
    assert torch.all(var[:-1] >= var[1:])
    again = AnchoredAutoencoderKL(block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=4,
                                  anchor_kind="pca")
    again.fit_anchor([train])
    torch.testing.assert_close(again.anchor.basis, ae.anchor.basis, atol=1e-5, rtol=0)


def test_block_pca_keeps_what_a_resize_of_equal_size_loses():
    """Vertical stripes one pixel wide: the equal-size area downscale averages them away, the PCA of 8x8 blocks
    keeps them (16 components, as the edge latent)."""
    x = torch.zeros(4, 3, 64, 64)
    x[..., ::2] = 0.5
    x[..., 1::2] = -0.5
    x = x + torch.linspace(-0.3, 0.3, 64)[None, None, :, None] * torch.rand(4, 1, 1, 1)
    kw = dict(block_out_channels=(8, 16, 16, 16), latent_channels=16, norm_num_groups=4)
    pca, resize = AnchoredAutoencoderKL(**kw, anchor_kind="pca"), AnchoredAutoencoderKL(**kw, anchor_kind="resize")
    pca.fit_anchor([x])
    with torch.no_grad():
        err_pca = (pca.anchor_only_decode(pca.anchor_only_encode(x)) - x).pow(2).mean()
        err_resize = (resize.anchor_only_decode(resize.anchor_only_encode(x)) - x).pow(2).mean()
    assert err_pca < 1e-6 and err_resize > 0.2


def test_an_unfitted_pca_anchor_is_the_block_dct():
    basis = block_dct_basis(8, 1, 64).flatten(1)
    torch.testing.assert_close(basis @ basis.T, torch.eye(64), atol=1e-5, rtol=0)
    assert torch.allclose(basis[0], torch.full((64,), 1 / 8))  # DC first
    ae = AnchoredAutoencoderKL(block_out_channels=(8, 16, 16, 16), latent_channels=16, norm_num_groups=4,
                               anchor_kind="pca")
    torch.testing.assert_close(ae.anchor.basis, block_dct_basis(8, 1, 16))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # an unfitted anchor still codes: smooth images survive it
        smooth = F.interpolate(F.avg_pool2d(x, 16), scale_factor=16, mode="bilinear", align_corners=False)
        err = (ae.decode(ae.encode(smooth).latent_dist.mean).sample - smooth).pow(2).mean()
        noise = (ae.decode(ae.encode(x).latent_dist.mean).sample - x).pow(2).mean()
    assert err < 1e-3 < 0.1 < noise  # keeps smooth images, drops white noise
    with pytest.raises(ValueError, match="sides divisible by 8"):
        ae.fit_anchor([torch.zeros(1, 3, 60, 64)])


def test_training_fits_the_pca_anchor_once(synthetic_mvtec, tmp_path):
    """A fresh autoencoder stage fits the block PCA before its first step; a resume keeps the fitted basis."""
    cfg = build_config("diad", "tiny", {"model": {"vae": {"kind": "anchored"}},
                                        "train": {"data_root": str(synthetic_mvtec), "unet_steps": 0,
                                                  "guidance_steps": 0, "autoencoder_steps": 4}})
    assert cfg.model.vae.anchor == "pca"
    train_diad(cfg, tmp_path / "ae", progress=False)
    first = load_file(str(tmp_path / "ae" / "checkpoints" / "autoencoder-0000002" / "model.safetensors"))
    final = load_file(str(tmp_path / "ae" / "checkpoints" / "autoencoder-final" / "model.safetensors"))
    dct = block_dct_basis(2, 1, 4)
    assert not torch.allclose(first["vae.anchor.basis"], dct, atol=1e-3)  # fitted, not the DCT start
    torch.testing.assert_close(final["vae.anchor.basis"], first["vae.anchor.basis"])  # never refitted
    b = final["vae.anchor.basis"].flatten(1)
    torch.testing.assert_close(b @ b.T, torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["pca", "resize"])
def test_rebuilt_from_its_config_it_is_the_same_autoencoder(kind):
    ae = AnchoredAutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, anchor_kind=kind)
    ae.fit_anchor([torch.rand(2, 3, 32, 32)])
    torch.nn.init.normal_(ae.decoder.conv_out.weight, std=0.05)
    ae.set_latent_shift(0.25)
    again = autoencoder_from_config(json.loads(json.dumps(dict(ae.config))))
    assert isinstance(again, AnchoredAutoencoderKL) and type(again.anchor) is type(ae.anchor)
    again.load_state_dict(ae.state_dict())
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again.decode(z).sample, ae.decode(z).sample)
    # a config written before the PCA anchor (no anchor_kind) is a resize-anchored autoencoder
    old = {k: v for k, v in dict(ae.config).items() if k != "anchor_kind"}
    assert type(autoencoder_from_config(old).anchor).__name__ == "ResizeAnchor"


def test_decoder_adaptation_sees_the_anchor():
    ae = AnchoredAutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                               scaling_factor=2.0).eval()
    torch.nn.init.normal_(ae.decoder.conv_out.weight, std=0.05)
    ae.set_latent_shift(-0.3)
    dec = LatentDecoder.from_vae(ae)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(dec(z), ae.decode(z / 2.0).sample, atol=1e-5, rtol=0)
    x_ok = torch.zeros(3, 32, 32)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:16, 8:16] = 1
    for scope in ("decoder", "last_up_block"):
        res = adapt_decoder(dec, z[0], x_ok, mask, steps=5, lr=1e-3, lambda_con=1.0, scope=scope)
        assert res.image.shape == (3, 32, 32)
        assert res.loss_outside[-1] < res.loss_outside[0]


def test_warmup_then_cosine_learning_rate():
    stage = Stage("s", steps=100, lr=1.0, params=lambda: [], loss=lambda _: torch.zeros(()), warmup=10,
                  schedule="cosine")
    assert stage.lr_at(0) == pytest.approx(0.1 * 0.5 * (1 + torch.cos(torch.tensor(0.0)).item()))
    assert stage.lr_at(9) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 9 / 100)).item()))
    assert stage.lr_at(50) == pytest.approx(0.5)
    assert stage.lr_at(99) < 0.01
    assert Stage("c", 5, 2.0, lambda: [], lambda _: torch.zeros(())).lr_at(3) == 2.0


def test_a_trained_autoencoder_is_taken_as_it_is(synthetic_mvtec, tmp_path):
    anchored = {"vae": {"kind": "anchored"}}
    base = build_config("diad", "tiny", {"model": anchored, "train": {"data_root": str(synthetic_mvtec),
                                                                      "unet_steps": 0, "guidance_steps": 0}})
    base_ck = train_diad(base, tmp_path / "ae", progress=False)
    ae_final = tmp_path / "ae" / "checkpoints" / "autoencoder-final"
    cfg = build_config("diad", "tiny", {"model": anchored, "train": {
        "data_root": str(synthetic_mvtec), "init_autoencoder_from": str(tmp_path / "ae")}})
    ck = train_diad(cfg, tmp_path / "diad", progress=False)
    want = {k: v for k, v in load_file(str(ae_final / "model.safetensors")).items() if k.startswith("vae.")}
    got = load_file(str(ck / "model.safetensors"))
    assert want and all(torch.equal(got[k], v) for k, v in want.items())
    state = json.loads((ck / "state.json").read_text())
    assert state["extra"]["scaling_factor"] == json.loads((base_ck / "state.json").read_text())["extra"]["scaling_factor"]
    log = [json.loads(line) for line in (tmp_path / "diad" / "train_log.jsonl").read_text().splitlines()]
    assert not [r for r in log if r["stage"] == "autoencoder"]  # the stage ran no step


@pytest.mark.parametrize("kind", ["pca", "resize"])
def test_onnx_graphs_of_the_anchored_autoencoder_match_torch(tmp_path, kind):
    """The edge layout's anchors survive export: the block PCA's strided convolutions and tiled block mean,
    the resize's bicubic upscale and channel folding (r > 1, k > 1)."""
    from edgeinspect.export.onnx import export_onnx, parity_report
    from edgeinspect.models.diad import VAEDecoderNet, VAEEncoderNet

    ae = AnchoredAutoencoderKL(block_out_channels=(8, 16, 16, 16), latent_channels=16, norm_num_groups=4,
                               scaling_factor=1.7, anchor_kind=kind).eval()
    ae.fit_anchor([torch.rand(4, 3, 64, 64) * 2 - 1])
    torch.nn.init.normal_(ae.decoder.conv_out.weight, std=0.05)
    ae.set_latent_shift(0.2)
    image, probe = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    enc, dec = VAEEncoderNet(ae), VAEDecoderNet(ae)
    latent = enc(image).detach()
    for module, name, x, p, out in ((enc, "enc", image, probe, "latent"), (dec, "dec", latent, enc(probe).detach(),
                                                                             "image")):
        graph = export_onnx(module, {"x": x}, tmp_path / f"{name}.onnx", [out], {"x": {0: "batch"}},
                            probe={"x": p})
        err, scale = parity_report(module, graph.path, [{"x": x}, {"x": p}])
        assert err[out] < 1e-4 * max(1.0, scale[out]), (name, err, scale)


def test_the_anchor_decoder_skips_the_learnt_residual_on_every_backend(tmp_path):
    """scoring.decoder anchor: the reconstruction is the resize part of the decode, in torch and in the bundle."""
    from edgeinspect.export.bundle import export_bundle
    from edgeinspect.runtime.detector import bundle_pipeline
    from edgeinspect.runtime.run_detector import run_pipeline
    from tests.test_export import make_tiny_run, tiny_features

    run = make_tiny_run(tmp_path / "run", overrides={"model": {"vae": {"kind": "anchored"}}})
    cfg, full, _ = run_pipeline(run)
    vae = full.nets["vae_decoder"].module.vae
    torch.nn.init.normal_(vae.decoder.conv_out.weight, std=0.05)  # a residual that shows
    _, anchor, _ = run_pipeline(run, {"scoring": {"decoder": "anchor"}})
    anchor.nets = full.nets  # the same (perturbed) weights
    frames = torch.rand(2, 3, 64, 64) * 2 - 1
    r_full, r_anchor = full(frames), anchor(frames)
    latent = torch.randn(2, *vae.encode(frames).latent_dist.mean.shape[1:])
    want = vae.anchor_only_decode(latent / vae.config.scaling_factor)
    got = full.nets["vae_anchor_decoder"](latent=latent)["image"]
    torch.testing.assert_close(got, want)
    assert float((r_full.reconstructions - r_anchor.reconstructions).abs().max()) > 1e-3
    # exported: the bundle carries the anchor decoder, and onnxruntime scores as torch does
    features = tiny_features()
    bundle = export_bundle(run, tmp_path / "bundle", ("fp32",), features=features, overwrite=True, threads=1)
    ort = bundle_pipeline(bundle, "onnxruntime", overrides={"scoring": {"decoder": "anchor"}}, verdict=False)
    _, torch_anchor, _ = run_pipeline(run, {"scoring": {"decoder": "anchor"}})
    torch_anchor.nets = type(torch_anchor.nets)({**torch_anchor.nets._networks,
                                                 "features": ort.nets["features"]}, name="mixed")
    torch.testing.assert_close(ort(frames).scores, torch_anchor(frames).scores, rtol=1e-3, atol=1e-4)


def test_the_anchor_decoder_needs_an_anchored_autoencoder(tmp_path):
    from edgeinspect.runtime.run_detector import run_pipeline
    from tests.test_export import make_tiny_run

    run = make_tiny_run(tmp_path / "run")  # the tiny preset's KL autoencoder
    with pytest.raises(ValueError, match="scoring.decoder 'anchor' needs an anchored autoencoder"):
        run_pipeline(run, {"scoring": {"decoder": "anchor"}})


def test_the_anchor_encoder_is_the_resize_part_of_the_encode():
    """scoring.encoder anchor: the latent without the learnt residual, shifted and scaled as the full one; the
    resize decoder turns it back into the equal-size resize. Untrained (zero residual), both encoders agree."""
    from edgeinspect.models.diad import VAEAnchorEncoderNet, VAEEncoderNet

    ae = AnchoredAutoencoderKL(block_out_channels=(8, 16, 16, 16), latent_channels=16, norm_num_groups=4,
                               sample_size=64, scaling_factor=1.7).eval()
    ae.set_latent_shift(0.2)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    anchor, full = VAEAnchorEncoderNet(ae), VAEEncoderNet(ae)
    with torch.no_grad():
        torch.testing.assert_close(anchor(x), full(x))
        torch.nn.init.normal_(ae.quant_conv.weight, std=0.05)  # a residual that shows
        z = anchor(x)
        assert float((full(x) - z).abs().max()) > 1e-3
        torch.testing.assert_close(z, ae.anchor_only_encode(x) * 1.7)
        torch.testing.assert_close(ae.anchor_only_decode(z / 1.7), _resize(x, 32), atol=1e-5, rtol=0)
    assert set(DiADModel(build_config("diad", "tiny", {"model": {"vae": {"kind": "anchored"}}})).role_modules()) >= {
        "vae_encoder", "vae_anchor_encoder", "vae_decoder", "vae_anchor_decoder"}
    assert "vae_anchor_encoder" not in DiADModel(build_config("diad", "tiny")).role_modules()


def test_the_anchor_encoder_starts_the_reconstruction_on_every_backend(tmp_path):
    """scoring.encoder anchor: DiAD denoises from the resize part of the encode, in torch and in the bundle (whose
    pipeline loads no full encoder); the vae_roundtrip reference still round-trips the frame with the full one."""
    from edgeinspect.core.networks import Networks
    from edgeinspect.export.bundle import export_bundle
    from edgeinspect.runtime.detector import bundle_pipeline
    from edgeinspect.runtime.run_detector import run_pipeline
    from tests.test_export import make_tiny_run, tiny_features

    run = make_tiny_run(tmp_path / "run", overrides={"model": {"vae": {"kind": "anchored"}}})
    start = {"inference": {"t_start": 500}}  # the start latent still shows through the noise
    _, full, _ = run_pipeline(run, start)
    nets = full.nets
    vae = nets["vae_encoder"].module.vae
    torch.nn.init.normal_(vae.quant_conv.weight, std=0.05)  # a residual that shows
    frames = torch.rand(2, 3, 64, 64) * 2 - 1
    want = vae.anchor_only_encode(frames) * vae.config.scaling_factor
    torch.testing.assert_close(nets["vae_anchor_encoder"](image=frames)["latent"], want)
    # the anchor pipeline is the full one with the anchor encoder in the full encoder's place
    _, anchor, _ = run_pipeline(run, {**start, "scoring": {"encoder": "anchor"}})
    anchor.nets = nets  # the same (perturbed) weights
    r_full, r_anchor = full(frames), anchor(frames)
    full.nets = Networks({**nets._networks, "vae_encoder": nets["vae_anchor_encoder"]})
    torch.testing.assert_close(r_anchor.reconstructions, full(frames).reconstructions)
    assert float((r_full.reconstructions - r_anchor.reconstructions).abs().max()) > 1e-3
    # vae_roundtrip: the reconstruction from the anchor latent, against the full autoencoder's round trip
    _, roundtrip, _ = run_pipeline(run, {**start, "scoring": {"encoder": "anchor", "reference": "vae_roundtrip"}})
    roundtrip.nets = nets
    recon, rt = roundtrip.reconstruct(frames)
    torch.testing.assert_close(recon, r_anchor.reconstructions)
    torch.testing.assert_close(rt, nets["vae_decoder"](latent=nets["vae_encoder"](image=frames)["latent"])["image"]
                               .clamp(-1, 1))
    # exported: the bundle carries the anchor encoder, onnxruntime encodes and scores as torch does, and a
    # pipeline on it opens no session for the full encoder
    bundle = export_bundle(run, tmp_path / "bundle", ("fp32",), features=tiny_features(), overwrite=True, threads=1)
    ort = bundle_pipeline(bundle, "onnxruntime", overrides={"scoring": {"encoder": "anchor"}}, verdict=False)
    assert "vae_anchor_encoder" in ort.nets and "vae_encoder" not in ort.nets
    _, torch_anchor, _ = run_pipeline(run, {"scoring": {"encoder": "anchor"}})
    torch.testing.assert_close(ort.nets["vae_anchor_encoder"](image=frames)["latent"],
                               torch_anchor.nets["vae_anchor_encoder"](image=frames)["latent"], rtol=1e-4, atol=1e-5)
    torch_anchor.nets = Networks({**torch_anchor.nets._networks, "features": ort.nets["features"]}, name="mixed")
    torch.testing.assert_close(ort(frames).scores, torch_anchor(frames).scores, rtol=1e-3, atol=1e-4)


def test_the_anchor_encoder_needs_an_anchored_autoencoder(tmp_path):
    from edgeinspect.runtime.run_detector import run_pipeline
    from tests.test_export import make_tiny_run

    run = make_tiny_run(tmp_path / "run")  # the tiny preset's KL autoencoder
    with pytest.raises(ValueError, match="scoring.encoder 'anchor' needs an anchored autoencoder"):
        run_pipeline(run, {"scoring": {"encoder": "anchor"}})


def test_a_run_from_before_the_pca_anchor_is_told_how_to_load(tmp_path):
    """A saved run config without model.vae.anchor now reads as pca; its resize-anchored weights have no basis."""
    from edgeinspect.config import dump_config
    from edgeinspect.core.runs import CheckpointError, TrainState, load_model_weights
    from edgeinspect.training.checkpoint import save_checkpoint

    old = build_config("diad", "tiny", {"model": {"vae": {"kind": "anchored", "anchor": "resize"}}})
    save_checkpoint(tmp_path, "done", DiADModel(old), TrainState("done", 0))
    cfg = dump_config(old)
    del cfg["model"]["vae"]["anchor"]
    with pytest.raises(CheckpointError, match='add "anchor": "resize" to model.vae'):
        load_model_weights(DiADModel(build_config("diad", "tiny", {"model": cfg["model"]})),
                           tmp_path / "checkpoints" / "done")
