import pytest
import torch

from edgeinspect.config import build_config
from edgeinspect.models.diad import DiADModel
from edgeinspect.models.guidance import HintEncoder, residual_slots


def _model(injection="mid", sff=True):
    torch.manual_seed(0)
    cfg = build_config("diad", "tiny", {"guidance": {"injection": injection, "sff": sff}})
    return cfg, DiADModel(cfg)


def _inputs(cfg, b=2):
    L, s = cfg.model.latent_size, cfg.model.image_size
    g = torch.Generator().manual_seed(1)
    z = torch.randn(b, 4, L, L, generator=g)
    x = torch.rand(b, 3, s, s, generator=g) * 2 - 1
    t = torch.tensor([10.0, 700.0][:b])
    return z, x, t


@pytest.mark.parametrize("injection", ["mid", "full"])
def test_sg_output_shapes_per_injection_mode(injection):
    cfg, model = _model(injection)
    z, x, t = _inputs(cfg)
    ctx = model.context("a tile", 2)
    with torch.no_grad():
        # non-zero injection convs so zeros can only come from the injection mode
        for p in model.guidance.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        hint = model.guidance.encode_hint(x)
        down, mid = model.guidance(z, t, ctx, hint)
    slots = residual_slots(model.unet)
    assert hint.shape == (2, cfg.model.unet.block_out_channels[0], cfg.model.latent_size, cfg.model.latent_size)
    assert len(down) == len(slots)
    lowest = max(s.level for s in slots)
    for r, s in zip(down, slots):
        side = cfg.model.latent_size // 2**s.level
        assert r.shape == (2, s.channels, side, side)
        injected = injection == "full" or s.level == lowest
        assert (r.abs().sum() > 0) == injected
    assert mid.shape == (2, cfg.model.unet.block_out_channels[-1], cfg.model.latent_size // 2**lowest,
                         cfg.model.latent_size // 2**lowest)


def test_zero_init_guided_unet_equals_plain_unet():
    cfg, model = _model()
    z, x, t = _inputs(cfg)
    ctx = model.context("a tile", 2)
    guided = model.role_modules()["unet"]
    with torch.no_grad():
        plain = model.unet(z, t, encoder_hidden_states=ctx).sample
        fused = guided(z, t, ctx, model.guidance.encode_hint(x))
    torch.testing.assert_close(plain, fused)


def test_sff_parameters_receive_gradient():
    cfg, model = _model()
    z, x, t = _inputs(cfg)
    with torch.no_grad():
        ctx = model.context("a tile", 2)
    guided = model.role_modules()["unet"]
    # One optimisation step moves the zero injection convs off zero (as in real training) ...
    opt = torch.optim.SGD(model.guidance.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        out = guided(z, t, ctx, model.guidance.encode_hint(x))
        out.pow(2).mean().backward()
        if _ == 0:
            zero_conv_grad = sum(m.weight.grad.abs().sum() for m in model.guidance.zero_convs
                                 if isinstance(m, torch.nn.Conv2d))
            assert zero_conv_grad > 0
        opt.step()
    # ... after which the SFF branch gets gradient (the authors' all-zero init would keep it at 0).
    sff_grads = [p.grad for p in model.guidance.sff.parameters()]
    assert sff_grads and all(g is not None for g in sff_grads)
    assert all(float(g.abs().sum()) > 0 for g in sff_grads)


def test_sff_convs_are_not_zero_initialised():
    _, model = _model()
    convs = [m for m in model.guidance.sff.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(float(c.weight.detach().abs().sum()) > 0 for c in convs)


def test_sff_off_has_no_fusion():
    _, model = _model(sff=False)
    assert model.guidance.sff is None


def test_hint_encoder_reaches_latent_resolution_like_controlnet():
    enc = HintEncoder([16, 16, 32, 32, 96, 96, 256], 8, 320)
    strides = [m.stride[0] for m in enc.net if isinstance(m, torch.nn.Conv2d)]
    assert strides == [1, 1, 2, 1, 2, 1, 2, 1]
    assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, 320, 8, 8)
    assert float(enc.net[-1].weight.detach().abs().sum()) == 0
    with pytest.raises(ValueError, match="too few"):
        HintEncoder([16, 16], 8, 32)
