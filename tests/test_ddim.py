import pytest
import torch
from diffusers import DDIMScheduler

from edgeinspect.config import SchedulerConfig
from edgeinspect.core.ddim import DDIM, alphas_cumprod, seeded_noise


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_schedule_equals_diffusers_bit_for_bit(schedule):
    cfg = SchedulerConfig(beta_schedule=schedule)
    ref = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                        beta_end=cfg.beta_end, beta_schedule=schedule, clip_sample=False, set_alpha_to_one=True)
    assert torch.equal(alphas_cumprod(cfg), ref.alphas_cumprod)


def test_timesteps_trailing():
    d = DDIM(SchedulerConfig())
    assert d.timesteps(999, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert d.timesteps(749, 5)[0] == 749
    with pytest.raises(ValueError):
        d.timesteps(1000, 10)


def test_matches_diffusers_ddim_step_by_step():
    cfg = SchedulerConfig()
    ours = DDIM(cfg)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
                        timestep_spacing="trailing")
    ref.set_timesteps(10)
    assert ref.timesteps.tolist() == ours.timesteps(999, 10)
    g = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(2, 4, 8, 8, generator=g)
    ts = ours.timesteps(999, 10)
    for i, t in enumerate(ts):
        eps = torch.randn(2, 4, 8, 8, generator=g)
        x_ref = ref.step(eps, t, x_ref).prev_sample
        x_ours, _ = ours.step(x_ours, eps, t, ts[i + 1] if i + 1 < len(ts) else -1)
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-4, atol=1e-4)


def test_clean_estimate_identity():
    d = DDIM(SchedulerConfig())
    z0 = torch.randn(3, 4, 4, 4)
    eps = torch.randn_like(z0)
    for t in (0, 250, 999):
        torch.testing.assert_close(d.pred_clean(d.add_noise(z0, eps, t), eps, t), z0, rtol=1e-4, atol=1e-3)


def test_seeded_noise_same_for_every_sample_and_seed():
    a = seeded_noise((4, 2, 2), 3, batch=3)
    assert torch.equal(a[0], a[2])
    assert torch.equal(seeded_noise((4, 2, 2), 3, 1)[0], a[1])
    assert not torch.equal(seeded_noise((4, 2, 2), 4, 1)[0], a[0])
