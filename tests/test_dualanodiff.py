"""DualAnoDiff model and sampling loop: SAIM, BCM, the LoRA branches, the dual_unet role, masks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeinspect.config import PartMaskConfig, build_config
from edgeinspect.models.dualanodiff import (
    BCM,
    SAIM,
    BranchLoraConv2d,
    BranchLoraLinear,
    DualAnoDiffModel,
    TrainableWeights,
    is_trainable_key,
)
from edgeinspect.core.ddim import DDIM
from edgeinspect.runtime.dual import DualSampler, PromptContexts, seeded_noises, segment_parts
from edgeinspect.core.networks import Networks, TorchNetwork, torch_networks


def _model(**sections) -> DualAnoDiffModel:
    torch.manual_seed(0)
    return DualAnoDiffModel(build_config("dualanodiff", "tiny", sections)).eval()


def _randomise(modules, scale=0.2):
    """Non-zero weights where training would put them (zero-initialised outputs included)."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * scale)


def _pairs(model, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    shape = (n, c.model.vae.latent_channels, c.model.latent_size, c.model.latent_size)
    with torch.no_grad():
        ctx_w = model.context(c.prompts.whole_prompt, n)
        ctx_p = model.context(c.prompts.part_prompt, n)
    return (torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.tensor([700, 30]),
            ctx_w, ctx_p, torch.randn(shape, generator=g))


def test_saim_and_bcm_shapes_and_start():
    torch.manual_seed(0)
    saim = SAIM(32, 4)
    whole, part = torch.randn(3, 10, 32), torch.randn(3, 10, 32)
    w, p = saim(whole, part)
    assert w.shape == p.shape == (3, 10, 32)
    assert torch.equal(w, whole) and torch.equal(p, part)  # zero-initialised out: identity at the start
    _randomise([saim.out])
    w, p = saim(whole, part)
    part2 = part.clone()
    part2[:, 4] += 1.0
    w2, p2 = saim(whole, part2)
    changed = (w2 - w).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [i == 4 for i in range(10)]  # per position: only position 4 sees it
    assert not torch.equal(p2[:, 4], p[:, 4])
    with pytest.raises(ValueError, match="divide"):
        SAIM(30, 4)

    bcm = BCM(32, 48)
    h, h_bg = torch.randn(3, 10, 32), torch.randn(3, 10, 32)
    assert bcm(h, h_bg).shape == (3, 10, 32)
    assert torch.equal(bcm(h, h_bg), h)  # gate starts at 0
    with torch.no_grad():
        bcm.gate.fill_(1.0)
    assert torch.allclose(bcm(h, h_bg), bcm.mlp(h_bg))


def test_residual_bcm_starts_as_the_background_and_its_gate_learns_from_step_one():
    torch.manual_seed(0)
    h, h_bg, g = torch.randn(3, 10, 32), torch.randn(3, 10, 32), torch.randn(3, 10, 32)
    bcm = BCM(32, 48, "residual")
    assert torch.equal(bcm(h, h_bg), h)  # gate 0: the branch's own features
    (bcm(h, h_bg) * g).sum().backward()
    # at the start the gate's gradient compares the background's own features with the branch's ...
    assert torch.allclose(bcm.gate.grad, (g * (h_bg - h)).sum())
    # ... while the MLP, behind a closed gate, gets none (why the plain MLP and its gate barely move)
    assert all(p.grad is None or not p.grad.any() for p in bcm.mlp.parameters())
    with torch.no_grad():
        bcm.gate.fill_(1.0)
    assert torch.equal(bcm(h, h_bg), h_bg)  # open gate, zero-initialised MLP: exactly the background
    with pytest.raises(ValueError, match="plain' or 'residual"):
        BCM(32, 48, "mystery")


def test_model_hooks_every_transformer_block():
    m = _model()
    blocks = [n for n, mod in m.unet.named_modules() if type(mod).__name__ == "BasicTransformerBlock"]
    assert len(blocks) == 4 and len(m.bcm) == 4 and len(m.saim) == 8  # attn1 + attn2 of each
    lora = [mod for mod in m.unet.modules() if isinstance(mod, BranchLoraLinear)]
    assert len(lora) == 4 * 2 * 4  # to_q/to_k/to_v/to_out.0 of both attention layers per block
    assert all(set(mod.lora_A) == {"whole", "part"} and mod.r["whole"] == 4 for mod in lora)
    only_self = _model(saim={"after": ["self"]}, bcm={"enabled": False})
    assert len(only_self.saim) == 4 and len(only_self.bcm) == 0
    assert set(only_self.role_modules()) == {"vae_encoder", "dual_unet_plain", "vae_decoder"}


def test_trainable_parameters_are_exactly_lora_saim_bcm_prompt():
    m = _model()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters() if is_trainable_key(n)}
    kinds = {"lora": [n for n in trainable if ".lora_" in n], "saim": [n for n in trainable if n.startswith("saim.")],
             "bcm": [n for n in trainable if n.startswith("bcm.")],
             "prompt": [n for n in trainable if n.startswith("prompt_encoder.")]}
    assert all(kinds.values()) and sum(map(len, kinds.values())) == len(trainable)
    assert all(n.startswith(("unet.", "vae.")) for n in frozen)
    assert any(".base_layer." in n for n in frozen)  # the wrapped attention projections stay frozen
    weights = TrainableWeights(m)
    sd = weights.state_dict()
    assert set(sd) == {k for k in m.state_dict() if is_trainable_key(k)}
    other = _model()
    _randomise([other.saim])
    result = weights.load_state_dict(TrainableWeights(other).state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(a.out.weight, b.out.weight) for a, b in zip(m.saim.values(), other.saim.values()))
    with pytest.raises(RuntimeError, match="missing"):
        weights.load_state_dict({})


def test_branches_share_the_frozen_base_and_differ_only_in_their_adapters():
    m = _model()
    sample, _, t, ctx_w, _, _ = _pairs(m)
    lora = [mod for mod in m.unet.modules() if isinstance(mod, BranchLoraLinear)]
    with torch.no_grad():
        for mod in lora:  # trained-like adapters, identical in both branches
            mod.lora_B["whole"].weight.normal_(0, 0.2)
            mod.lora_A["part"].weight.copy_(mod.lora_A["whole"].weight)
            mod.lora_B["part"].weight.copy_(mod.lora_B["whole"].weight)
        # same input and prompt in both branches: identical adapters give identical predictions
        w, p = m.dual_forward(sample, sample, t, ctx_w, ctx_w)
        assert torch.allclose(w, p, atol=1e-6)
        plain = m.dual_forward(sample, sample, t, ctx_w, ctx_w)
        for mod in lora:
            mod.lora_B["part"].weight.add_(0.3)
        w2, p2 = m.dual_forward(sample, sample, t, ctx_w, ctx_w)
    assert not torch.allclose(p2, p, atol=1e-3)  # the part adapter drives the part branch
    assert torch.equal(w2, plain[0])  # and never the whole one (SAIM still at its zero start)


def test_conv_targets_get_per_branch_adapters_too():
    m = _model(lora={"rank": 4, "alpha": 4.0, "target_modules": ["to_q", "conv1", "conv2", "conv_out"]})
    convs = {n: mod for n, mod in m.unet.named_modules() if isinstance(mod, BranchLoraConv2d)}
    assert "conv_out" in convs and any(n.endswith("resnets.0.conv1") for n in convs)
    assert all(mod.lora_A["part"].kernel_size == mod.base_layer.kernel_size for mod in convs.values())
    sample, _, t, ctx_w, _, _ = _pairs(m)
    with torch.no_grad():
        base_w, base_p = m.dual_forward(sample, sample, t, ctx_w, ctx_w)
        convs["conv_out"].lora_B["part"].weight.normal_(0, 0.5)
        w, p = m.dual_forward(sample, sample, t, ctx_w, ctx_w)
    assert torch.equal(w, base_w) and not torch.allclose(p, base_p, atol=1e-3)
    # the conv adapters train: gradients reach both branches' A and B (B starts at zero, so A's
    # gradient flows once B moved, as above for "part")
    m.train()
    w, p = m.dual_forward(sample, sample, t, ctx_w, ctx_w)
    (w.square().mean() + p.square().mean()).backward()
    lora_out = convs["conv_out"]
    for name in ("whole", "part"):
        assert lora_out.lora_B[name].weight.grad.abs().sum() > 0
    assert lora_out.lora_A["part"].weight.grad.abs().sum() > 0
    assert lora_out.base_layer.weight.grad is None  # the base stays frozen


@pytest.mark.parametrize("blocks", [2, 3])
def test_batched_branch_adapters_equal_each_blocks_own_lora(blocks):
    """The batched deltas (bmm / grouped conv) are, block by block, peft's base(x) + B(A(x)) * scaling
    with that block's adapter (whole, part, whole), in value and in gradient."""
    m = _model(lora={"rank": 3, "alpha": 6.0, "target_modules": ["to_q", "conv1"]})
    layers = [next(mod for mod in m.unet.modules() if isinstance(mod, kind))
              for kind in (BranchLoraLinear, BranchLoraConv2d)]
    _randomise([mod.lora_B[a] for mod in layers for a in ("whole", "part")])
    g = torch.Generator().manual_seed(3)
    for layer in layers:
        n = 2
        shape = (blocks * n, layer.in_features, 5, 6) if isinstance(layer, BranchLoraConv2d) \
            else (blocks * n, 7, layer.in_features)
        x = torch.randn(shape, generator=g, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        with m.layout.rows(blocks):
            out = layer(x)
        ref = torch.cat([layer.base_layer(xb) + layer.lora_B[a](layer.lora_A[a](xb)) * layer.scaling[a]
                         for xb, a in zip(x_ref.chunk(blocks), ("whole", "part", "whole"))])
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-5)
        weights = torch.randn(out.shape, generator=g)
        params = [getattr(layer, f)[a].weight for f in ("lora_A", "lora_B") for a in ("whole", "part")]
        got = torch.autograd.grad((out * weights).sum(), [x, *params])
        want = torch.autograd.grad((ref * weights).sum(), [x_ref, *params])
        for u, v in zip(got, want):
            assert torch.allclose(u, v, atol=1e-4)
        # without gradients the stacked factors are kept between calls: an in-place weight change must reach them
        with torch.no_grad(), m.layout.rows(blocks):
            before = layer(x)
            layer.lora_B["part"].weight.mul_(-1)
            after = layer(x)
            layer.lora_B["part"].weight.mul_(-1)
        part_rows = slice(n, 2 * n)
        assert torch.allclose(before, ref, atol=1e-5)
        assert not torch.allclose(after[part_rows], before[part_rows], atol=1e-3)
        assert torch.equal(after[:n], before[:n])  # the whole rows keep their own adapter


@pytest.mark.parametrize("mlp", ["plain", "residual"])
def test_bcm_gate_zero_is_exactly_the_branch_without_bcm(mlp):
    m = _model(bcm={"mlp": mlp})
    _randomise([m.saim])  # interaction on, so the part branch would see any change of the whole one
    zw, zp, t, ctx_w, ctx_p, bg = _pairs(m)
    with torch.no_grad():
        ref = m.dual_forward(zw, zp, t, ctx_w, ctx_p)
        with_bg = m.dual_forward(zw, zp, t, ctx_w, ctx_p, bg)
        assert torch.allclose(with_bg[0], ref[0], atol=1e-5) and torch.allclose(with_bg[1], ref[1], atol=1e-5)
        for bcm in m.bcm.values():
            bcm.gate.fill_(0.5)
        opened = m.dual_forward(zw, zp, t, ctx_w, ctx_p, bg)
        other_bg = m.dual_forward(zw, zp, t, ctx_w, ctx_p, bg.flip(-1))
    assert not torch.allclose(opened[0], ref[0], atol=1e-3)
    assert not torch.allclose(opened[0], other_bg[0], atol=1e-3)  # the background's content matters
    assert not torch.allclose(opened[1], ref[1], atol=1e-4)  # through SAIM
    with pytest.raises(RuntimeError, match="dual_forward"):
        m.unet(zw, t, encoder_hidden_states=ctx_w)
    plain = _model(bcm={"enabled": False})
    with pytest.raises(ValueError, match="no BCM"):
        plain.dual_forward(zw, zp, t, ctx_w, ctx_p, bg)


def test_finite_gradients_reach_every_trainable_tensor_and_the_loss_falls():
    m = _model()
    m.train()
    zw, zp, t, _, _, bg = _pairs(m)
    eps_w, eps_p = torch.randn_like(zw), torch.randn_like(zp)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    losses = []
    for step in range(12):
        ctx_w = m.prompt_encoder([m.cfg.prompts.whole_prompt] * 2)
        ctx_p = m.prompt_encoder([m.cfg.prompts.part_prompt] * 2)
        pw, pp = m.dual_forward(zw, zp, t, ctx_w, ctx_p, bg)
        loss = F.mse_loss(pw, eps_w) + F.mse_loss(pp, eps_p)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        if step == 2:  # zero-initialised LoRA B, SAIM out and BCM gate open up after the first steps
            dead = [n for n, p in zip(names, params) if not p.grad.abs().sum() > 0]
            assert not dead, dead[:5]
        opt.step()
        losses.append(loss.item())
    # a random base leaves little for attention adapters to fit; the fall is steady but modest
    assert losses[-1] < 0.95 * losses[0] and losses[-1] < min(losses[:3])


def test_dual_unet_role_runs_through_named_networks():
    m = _model()
    zw, zp, t, ctx_w, ctx_p, bg = _pairs(m)
    nets = torch_networks(m.role_modules())
    out = nets["dual_unet"](sample_whole=zw, sample_part=zp, background=bg, timestep=t.float(), ctx_whole=ctx_w,
                            ctx_part=ctx_p)
    assert set(out) == {"noise_whole", "noise_part"} and out["noise_whole"].shape == zw.shape
    with torch.no_grad():
        ref = m.dual_forward(zw, zp, t, ctx_w, ctx_p, bg)
    assert torch.allclose(out["noise_whole"], ref[0]) and torch.allclose(out["noise_part"], ref[1])


def test_part_mask_segmentation():
    g = torch.Generator().manual_seed(0)
    part = torch.randn(3, 64, 64, generator=g) * 0.04  # decoder noise around the empty value
    part[:, 20:30, 10:40] = -0.7  # the anomaly
    part[:, 50, 50] = 0.9  # an isolated speck
    mask = segment_parts(part[None], PartMaskConfig(threshold=0.2, open_kernel=3, close_kernel=5, min_area=16))[0]
    truth = np.zeros((64, 64), bool)
    truth[20:30, 10:40] = True
    assert not mask[50, 50] and (mask & truth).sum() / (mask | truth).sum() > 0.95
    assert not segment_parts(torch.zeros(1, 3, 32, 32), PartMaskConfig()).any()
    assert segment_parts(torch.zeros(0, 3, 32, 32), PartMaskConfig()).shape == (0, 32, 32)


def test_part_masks_of_a_batch_are_each_images_own():
    """The batch is thresholded at once (one transfer from the device): each image keeps its own
    median reference, and every mask equals that image segmented alone."""
    g = torch.Generator().manual_seed(1)
    parts = torch.randn(3, 3, 48, 48, generator=g) * 0.03
    parts[0, :, 5:15, 5:25] = -0.8
    parts[1] += 0.3  # an offset empty level: only its own median hides it
    parts[1, :, 30:40, 10:20] = 0.9
    cfg = PartMaskConfig(reference="median", threshold=0.15, min_area=8)
    batch = segment_parts(parts, cfg)
    assert batch.shape == (3, 48, 48) and batch.dtype == bool
    for k in range(3):
        assert np.array_equal(batch[k], segment_parts(parts[k:k + 1], cfg)[0])
    assert batch[0, 10, 15] and batch[1, 35, 15] and not batch[2].any() and not batch[1, 5, 5]


class _OracleDualUNet:
    """A perfect denoiser for fixed clean targets: conditional rows aim at (whole, part), the
    unconditional rows at 0, so guided DDIM must land on guidance_scale x targets. Checks that the
    background arrives noised to the same timestep with the seed's background noise."""

    def __init__(self, schedule, targets, bg_clean, seeds, latent_shape):
        self.schedule, self.targets, self.bg_clean = schedule, targets, bg_clean
        self.bg_noise = torch.stack([seeded_noises(s, latent_shape, 3)[2] for s in seeds])
        self.calls = 0

    def __call__(self, sample_whole, sample_part, background, timestep, ctx_whole, ctx_part):
        n = len(self.bg_clean)
        t = int(timestep[0])
        assert (timestep == t).all() and len(timestep) == 2 * n
        expected_bg = self.schedule.add_noise(self.bg_clean, self.bg_noise, t)
        assert torch.allclose(background, torch.cat([expected_bg, expected_bg]), atol=1e-6)
        a = self.schedule.abar(t, sample_whole)
        out = []
        for x, target in ((sample_whole, self.targets[0]), (sample_part, self.targets[1])):
            aim = torch.cat([target, torch.zeros_like(target)])
            out.append((x - a.sqrt() * aim) / (1 - a).sqrt())
        self.calls += 1
        return tuple(out)


def test_sampling_loop_guidance_backgrounds_and_aligned_masks():
    cfg = build_config("dualanodiff", "tiny", {"sampling": {"steps": 4, "guidance_scale": 2.5}})
    schedule = DDIM(cfg.scheduler)
    shape = (3, 16, 16)  # identity "autoencoder": latents are the images
    whole = torch.full((2, *shape), -0.2)
    part = torch.zeros(2, *shape)
    part[0, :, 2:8, 3:12] = -0.3
    part[1, :, 9:14, 9:15] = 0.25
    backgrounds = torch.rand(2, *shape) - 0.5
    seeds = [11, 12]
    oracle = _OracleDualUNet(schedule, (whole, part), backgrounds, seeds, shape)
    sig = ("sample_whole", "sample_part", "background", "timestep", "ctx_whole", "ctx_part")
    nets = Networks({"dual_unet": TorchNetwork(oracle, sig, ("noise_whole", "noise_part")),
                     "vae_encoder": TorchNetwork(lambda x: x, ("image",), ("latent",)),
                     "vae_decoder": TorchNetwork(lambda x: x, ("latent",), ("image",))})
    ctx = PromptContexts(torch.ones(1, 4, 16), torch.ones(1, 4, 16), torch.zeros(1, 4, 16))
    mask_cfg = PartMaskConfig(threshold=0.2, open_kernel=0, close_kernel=0, min_area=0)
    sampler = DualSampler(nets, schedule, ctx, cfg.sampling.model_copy(update={"mask": mask_cfg}), shape,
                          background=True)
    out = sampler.sample(seeds, backgrounds)
    assert oracle.calls == 4
    assert torch.allclose(out.whole, (2.5 * whole).clamp(-1, 1), atol=1e-4)
    assert torch.allclose(out.part, 2.5 * part, atol=1e-4)
    assert np.array_equal(out.masks, (part.abs().amax(1) > 0).numpy())
    with pytest.raises(ValueError, match="BCM"):
        sampler.sample(seeds)


def test_sampling_is_seeded_per_output():
    m = _model()
    cfg = m.cfg
    with torch.no_grad():
        ctx = PromptContexts(m.context(cfg.prompts.whole_prompt), m.context(cfg.prompts.part_prompt), m.context(""))
    shape = (cfg.model.vae.latent_channels, cfg.model.latent_size, cfg.model.latent_size)
    sampler = DualSampler(torch_networks(m.role_modules()), DDIM(cfg.scheduler), ctx, cfg.sampling, shape, True)
    bgs = torch.rand(2, 3, 64, 64) * 2 - 1
    a = sampler.sample([3, 4], bgs)
    b = sampler.sample([3, 4], bgs)
    alone = sampler.sample([4], bgs[1:])
    assert torch.equal(a.whole, b.whole) and torch.equal(a.part, b.part) and np.array_equal(a.masks, b.masks)
    assert torch.allclose(alone.whole[0], a.whole[1], atol=1e-5)  # the batch around an output does not matter
    assert not torch.allclose(a.whole[0], a.whole[1], atol=1e-3)


def test_median_reference_ignores_an_offset_empty_level():
    """A part image whose empty background came out a little off 0: the fixed empty reference masks
    everything, the image's own median masks the defect only."""
    part = torch.full((3, 32, 32), 0.15)
    part[:, 10:16, 12:20] = -0.9
    empty_ref = segment_parts(part[None], PartMaskConfig(reference="empty", threshold=0.1, min_area=4))[0]
    median_ref = segment_parts(part[None], PartMaskConfig(reference="median", threshold=0.1, min_area=4))[0]
    assert empty_ref.all()
    expected = np.zeros((32, 32), bool)
    expected[10:16, 12:20] = True
    iou = (median_ref & expected).sum() / (median_ref | expected).sum()
    assert iou > 0.85  # the opening rounds the rectangle's corners


def test_strength_starts_from_the_noised_background_and_empty_part():
    cfg = build_config("dualanodiff", "tiny", {"sampling": {"steps": 4, "guidance_scale": 1.0, "strength": 0.5}})
    schedule = DDIM(cfg.scheduler)
    shape = (3, 8, 8)
    backgrounds = torch.rand(2, *shape) - 0.5
    seeds = [3, 4]
    seen = []

    def plain_unet(sample_whole, sample_part, timestep, ctx_whole, ctx_part):  # no BCM: no background input
        seen.append((int(timestep[0]), sample_whole.clone(), sample_part.clone()))
        return torch.zeros_like(sample_whole), torch.zeros_like(sample_part)

    sig = ("sample_whole", "sample_part", "timestep", "ctx_whole", "ctx_part")
    nets = Networks({"dual_unet_plain": TorchNetwork(plain_unet, sig, ("noise_whole", "noise_part")),
                     "vae_encoder": TorchNetwork(lambda x: x + 0.1, ("image",), ("latent",)),
                     "vae_decoder": TorchNetwork(lambda x: x, ("latent",), ("image",))})
    ctx = PromptContexts(torch.ones(1, 4, 16), torch.ones(1, 4, 16), torch.zeros(1, 4, 16))
    sampler = DualSampler(nets, schedule, ctx, cfg.sampling, shape, background=False)
    full = schedule.timesteps(schedule.num_train_timesteps - 1, 4)
    assert sampler.needs_images and list(sampler.timesteps) == list(full[2:])  # the last half of the schedule
    sampler.sample(seeds, backgrounds)
    assert [t for t, _, _ in seen] == [int(t) for t in full[2:]]
    t0, whole0, part0 = seen[0]
    noise = [seeded_noises(s, shape, 3) for s in seeds]
    assert torch.allclose(whole0, schedule.add_noise(backgrounds + 0.1, torch.stack([e[0] for e in noise]), t0))
    empty_latent = torch.full_like(backgrounds, 0.0) + 0.1  # the encoded empty part image
    assert torch.allclose(part0, schedule.add_noise(empty_latent, torch.stack([e[1] for e in noise]), t0))
    with pytest.raises(ValueError, match="strength"):
        sampler.sample(seeds)


@pytest.mark.parametrize("dilation", [0, 1])
def test_keep_background_keeps_it_outside_the_parts_mask(dilation):
    """With sampling.keep_background the whole branch's latent outside the part's current mask (grown
    by the dilation) is the background latent noised to the next timestep after every step; at the
    end the whole image is the background there, and the branch's own image inside."""
    cfg = build_config("dualanodiff", "tiny", {"sampling": {
        "steps": 4, "guidance_scale": 1.0, "keep_background": True, "keep_background_dilation": dilation,
        "mask": {"threshold": 0.2, "open_kernel": 0, "close_kernel": 0, "min_area": 0}}})
    schedule = DDIM(cfg.scheduler)
    shape = (3, 16, 16)  # identity autoencoder: the latent grid is the pixel grid
    whole_target = torch.full((2, *shape), 0.6)
    part_target = torch.zeros(2, *shape)
    part_target[0, :, 2:6, 3:9] = -0.5
    part_target[1, :, 10:14, 9:15] = 0.5
    backgrounds = torch.rand(2, *shape) - 0.5
    seeds = [5, 6]
    seen = []

    def plain_unet(sample_whole, sample_part, timestep, ctx_whole, ctx_part):  # its clean estimates: the targets
        seen.append((int(timestep[0]), sample_whole.clone()))
        a = schedule.abar(int(timestep[0]), sample_whole)
        return ((sample_whole - a.sqrt() * whole_target) / (1 - a).sqrt(),
                (sample_part - a.sqrt() * part_target) / (1 - a).sqrt())

    sig = ("sample_whole", "sample_part", "timestep", "ctx_whole", "ctx_part")
    nets = Networks({"dual_unet_plain": TorchNetwork(plain_unet, sig, ("noise_whole", "noise_part")),
                     "vae_encoder": TorchNetwork(lambda x: x, ("image",), ("latent",)),
                     "vae_decoder": TorchNetwork(lambda x: x, ("latent",), ("image",))})
    ctx = PromptContexts(torch.ones(1, 4, 16), torch.ones(1, 4, 16), torch.zeros(1, 4, 16))
    sampler = DualSampler(nets, schedule, ctx, cfg.sampling, shape, background=False)
    assert sampler.needs_images
    out = sampler.sample(seeds, backgrounds)
    keep = (part_target.abs().amax(1) > 0)[:, None].float()
    if dilation:
        keep = F.max_pool2d(keep, 2 * dilation + 1, stride=1, padding=dilation)
    inside = keep.expand_as(whole_target).bool()
    assert np.array_equal(out.masks, (part_target.abs().amax(1) > 0).numpy())
    assert torch.allclose(out.whole[~inside], backgrounds[~inside], atol=1e-5)
    assert torch.allclose(out.whole[inside], whole_target[inside], atol=1e-4)
    bg_noise = torch.stack([seeded_noises(s, shape, 3)[2] for s in seeds])
    assert len(seen) == 4
    for t, z in seen[1:]:  # the latent each later step starts from
        noised_bg = schedule.add_noise(backgrounds, bg_noise, t)
        assert torch.allclose(z[~inside], noised_bg[~inside], atol=1e-5)
    with pytest.raises(ValueError, match="keep_background"):
        sampler.sample(seeds)


@pytest.mark.parametrize("mode", ["image", "residual"])
def test_paste_puts_the_whole_image_onto_the_real_background(mode):
    """sampling.paste_feather: beyond the feather around the final mask the whole image is the background
    itself (not its reconstruction); on the mask, the branch's image ("image") or the background plus
    the branch's change from the background's reconstruction ("residual")."""
    cfg = build_config("dualanodiff", "tiny", {"sampling": {
        "steps": 3, "guidance_scale": 1.0, "paste_feather": 2, "paste_mode": mode,
        "mask": {"threshold": 0.2, "open_kernel": 0, "close_kernel": 0, "min_area": 0}}})
    schedule = DDIM(cfg.scheduler)
    shape = (3, 16, 16)
    whole_target = torch.full((2, *shape), 0.6)
    part_target = torch.zeros(2, *shape)
    part_target[0, :, 2:6, 3:9] = -0.5
    part_target[1, :, 10:14, 9:15] = 0.5

    def plain_unet(sample_whole, sample_part, timestep, ctx_whole, ctx_part):  # clean estimates: the targets
        a = schedule.abar(int(timestep[0]), sample_whole)
        return ((sample_whole - a.sqrt() * whole_target) / (1 - a).sqrt(),
                (sample_part - a.sqrt() * part_target) / (1 - a).sqrt())

    sig = ("sample_whole", "sample_part", "timestep", "ctx_whole", "ctx_part")
    nets = Networks({"dual_unet_plain": TorchNetwork(plain_unet, sig, ("noise_whole", "noise_part")),
                     "vae_encoder": TorchNetwork(lambda x: x + 0.1, ("image",), ("latent",)),  # reconstruction: bg + 0.1
                     "vae_decoder": TorchNetwork(lambda x: x, ("latent",), ("image",))})
    ctx = PromptContexts(torch.ones(1, 4, 16), torch.ones(1, 4, 16), torch.zeros(1, 4, 16))
    sampler = DualSampler(nets, schedule, ctx, cfg.sampling, shape, background=False)
    assert sampler.needs_images
    backgrounds = torch.rand(2, *shape) - 0.5
    out = sampler.sample([5, 6], backgrounds)
    mask = torch.from_numpy(out.masks)[:, None].expand_as(whole_target)
    assert np.array_equal(out.masks, (part_target.abs().amax(1) > 0).numpy())
    grown = F.max_pool2d(mask.float(), 5, stride=1, padding=2).bool()  # the mask and its 2-px feather
    assert torch.equal(out.whole[~grown], backgrounds[~grown])
    expected = whole_target if mode == "image" else backgrounds + whole_target - (backgrounds + 0.1)
    assert torch.allclose(out.whole[mask], expected[mask], atol=1e-4)
    with pytest.raises(ValueError, match="paste_feather"):
        sampler.sample([5, 6])
