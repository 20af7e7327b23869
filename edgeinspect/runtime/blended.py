"""AdaBLDM Algorithm 1: trimap-controlled blended latent diffusion on a normal image.

Written against named networks (`vae_encoder`, `trimap_encoder`, `unet`, `vae_decoder`), so the
same loop runs on torch, onnxruntime or TensorRT networks. One DDIM schedule of
free + latent + pixel steps from pure noise (t = 999 down):

* free steps: plain denoising, guided by the trimap and the defect prompt (with guidance_scale > 1,
  classifier-free guidance against the empty prompt and, with `uncond_trimap: no_defect`, the trimap
  without its defect region);
* latent steps: before each step, outside the dilated latent mask M_z the latent is replaced by
  the source latent noised to the current level, z = z M_z + q_sample(z_OK, t) (1 - M_z) (the
  paper writes the clean z_OK here; blending a clean latent into a noisy one is the authors' bug
  that methods.md fixes);
* pixel steps: the step's clean estimate is decoded, blended in pixels with the source by the
  exact mask, x M + x_OK (1 - M), encoded again and re-noised to the next level along the step's
  own noise direction (the DDIM update with the blended clean latent), so the last step's result
  decodes to x_OK outside the mask up to the autoencoder's error.

Every random draw comes from a generator seeded per sample, so an output is a pure function of its
seed whatever batch it was generated in (a resumed job regenerates the same image).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from edgeinspect.config import AdaBLDMSamplingConfig
from edgeinspect.data.trimap import TRIMAP_DEFECT, TRIMAP_FOREGROUND
from edgeinspect.core.ddim import DDIM
from edgeinspect.core.networks import Networks
from edgeinspect.core.timing import StageTimer

ROLES = ("vae_encoder", "trimap_encoder", "unet", "vae_decoder")


@dataclass
class BlendResult:
    latents: torch.Tensor  # z*_NG (B, C, h, w): input of the decoder adaptation
    images: torch.Tensor  # decode(z*) (B, 3, H, W) in [-1, 1], before adaptation
    # decode(z_OK) (B, 3, H, W) in [-1, 1] when sampling.paste_mode is "residual" (else None)
    source_images: torch.Tensor | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    # With trace=True: per step (stage name, timestep, latent the UNet saw, source latent at t).
    trace: list[tuple[str, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def latent_mask(mask: torch.Tensor, factor: int, dilation: int) -> torch.Tensor:
    """Pixel mask (B,1,H,W) -> latent mask (B,1,H/f,W/f): a latent cell is editable when any of its
    pixels is defect, then dilated by `dilation` cells."""
    m = F.max_pool2d(mask.float(), factor)
    if dilation > 0:
        m = F.max_pool2d(m, 2 * dilation + 1, stride=1, padding=dilation)
    return m


def feather_weight(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """(1,H,W): 1 on the mask (1,H,W), 1 - distance / feather outside it, 0 from `feather` px on."""
    outside = (mask[0] <= 0.5).cpu().numpy().astype(np.uint8)
    dist = cv2.distanceTransform(outside, cv2.DIST_L2, 5) if not outside.all() else np.full(outside.shape, np.inf)
    return torch.from_numpy(np.clip(1.0 - dist / feather, 0.0, 1.0))[None]


def paste_back(generated: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather: int) -> torch.Tensor:
    """The generated image (C,H,W) inside the mask (1,H,W), the source beyond `feather` px from it, and a
    linear ramp between (weight 1 - distance / feather)."""
    weight = feather_weight(mask, feather).to(generated)
    return weight * generated + (1 - weight) * source.to(generated)


def paste_residual(generated: torch.Tensor, reconstruction: torch.Tensor, source: torch.Tensor,
                   mask: torch.Tensor, feather: int) -> torch.Tensor:
    """source + w (generated - reconstruction), w = `feather_weight`: the change the diffusion made to
    the source's latent, as the decoder draws it, added to the real source image (C,H,W); clamped to
    [-1, 1]. `reconstruction` is the same decoder's image of the source's own latent, so the
    autoencoder's smoothing cancels and the defect keeps the source's fine texture."""
    weight = feather_weight(mask, feather).to(generated)
    return (source.to(generated) + weight * (generated - reconstruction.to(generated))).clamp(-1, 1)


def paste(generated: torch.Tensor, reconstruction: torch.Tensor | None, source: torch.Tensor, mask: torch.Tensor,
          feather: int, mode: str) -> torch.Tensor:
    """`paste_back` (mode "image") or `paste_residual` (mode "residual", needs the reconstruction)."""
    if mode == "image":
        return paste_back(generated, source, mask, feather)
    if mode != "residual":
        raise ValueError(f"paste mode must be 'image' or 'residual', not {mode!r}")
    if reconstruction is None:
        raise ValueError("paste mode 'residual' needs the decoder's reconstruction of the source latent")
    return paste_residual(generated, reconstruction, source, mask, feather)


def stage_of(i: int, cfg: AdaBLDMSamplingConfig) -> str:
    if i < cfg.free_steps:
        return "free"
    return "latent" if i < cfg.free_steps + cfg.latent_steps else "pixel"


class BlendedSampler:
    def __init__(self, networks: Networks, schedule: DDIM, cfg: AdaBLDMSamplingConfig, latent_factor: int):
        for role in ROLES:
            networks[role]
        self.nets = networks
        self.schedule = schedule
        self.cfg = cfg
        self.factor = latent_factor
        self.timesteps = schedule.timesteps(schedule.num_train_timesteps - 1, cfg.total_steps)

    def _noise(self, like: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        shape = tuple(like.shape[1:])
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(like.device, like.dtype)

    def _eps(self, z: torch.Tensor, t: int, hint: torch.Tensor, context: torch.Tensor,
             uncond: torch.Tensor | None, uncond_hint: torch.Tensor) -> torch.Tensor:
        unet = self.nets["unet"]
        if uncond is None:
            tt = torch.full((z.shape[0],), float(t), device=z.device)
            return unet(sample=z, timestep=tt, encoder_hidden_states=context, hint=hint)["noise_pred"]
        b = z.shape[0]
        tt = torch.full((2 * b,), float(t), device=z.device)
        both = unet(sample=torch.cat([z, z]), timestep=tt, encoder_hidden_states=torch.cat([uncond, context]),
                    hint=torch.cat([uncond_hint, hint]))["noise_pred"]
        e_u, e_c = both[:b], both[b:]
        return e_u + self.cfg.guidance_scale * (e_c - e_u)

    def sample(self, x_ok: torch.Tensor, mask: torch.Tensor, trimap: torch.Tensor, context: torch.Tensor,
               seeds: list[int], uncond_context: torch.Tensor | None = None, trace: bool = False) -> BlendResult:
        """x_ok (B,3,H,W) in [-1,1]; mask and trimap (B,1,H,W); context (B,L,D) the defect prompts;
        uncond_context (B,L,D) the empty prompt when guidance_scale > 1; one seed per sample."""
        b = x_ok.shape[0]
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for {b} samples")
        if mask.shape != (b, 1, *x_ok.shape[-2:]) or trimap.shape != mask.shape:
            raise ValueError(f"mask {tuple(mask.shape)} and trimap {tuple(trimap.shape)} must be "
                             f"{(b, 1, *x_ok.shape[-2:])}")
        if self.cfg.guidance_scale > 1 and uncond_context is None:
            raise ValueError("guidance_scale > 1 needs uncond_context (the empty-prompt embedding)")
        dev = self.nets.device
        x_ok, mask, trimap = x_ok.to(dev), mask.to(dev).float(), trimap.to(dev).float()
        context = context.to(dev)
        uncond = uncond_context.to(dev) if self.cfg.guidance_scale > 1 else None
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        timer = StageTimer(dev)
        result = BlendResult(x_ok.new_empty(0), x_ok.new_empty(0))
        with timer("encode"):
            z_ok = self.nets["vae_encoder"](image=x_ok)["latent"]
            hint = self.nets["trimap_encoder"](trimap=trimap)["hint"]
            uncond_hint = hint
            if uncond is not None and self.cfg.uncond_trimap == "no_defect":
                plain = torch.where(trimap >= TRIMAP_DEFECT, torch.full_like(trimap, TRIMAP_FOREGROUND), trimap)
                uncond_hint = self.nets["trimap_encoder"](trimap=plain)["hint"]
            m_z = latent_mask(mask, self.factor, self.cfg.mask_dilation)
        z = self._noise(z_ok, gens)
        ts = self.timesteps
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            stage = stage_of(i, self.cfg)
            with timer(stage):
                source_t = None
                if stage == "latent":
                    source_t = self.schedule.add_noise(z_ok, self._noise(z_ok, gens), t)
                    z = z * m_z + source_t * (1 - m_z)
                if trace:
                    result.trace.append((stage, t, z.clone(), source_t))
                eps = self._eps(z, t, hint, context, uncond, uncond_hint)
                if stage != "pixel":
                    z, _ = self.schedule.step(z, eps, t, t_prev)
                    continue
                clean = self.schedule.pred_clean(z, eps, t)
                x0 = self.nets["vae_decoder"](latent=clean)["image"]
                blended = x0 * mask + x_ok * (1 - mask)
                clean = self.nets["vae_encoder"](image=blended)["latent"]
                z = self.schedule.add_noise(clean, eps, t_prev)
        residual = self.cfg.paste_feather is not None and self.cfg.paste_mode == "residual"
        with timer("decode"):  # two calls, not one of twice the batch: engines are built for the batch size
            images = self.nets["vae_decoder"](latent=z)["image"].clamp(-1, 1)
            if residual:
                result.source_images = self.nets["vae_decoder"](latent=z_ok)["image"].clamp(-1, 1)
        result.latents, result.images, result.timings_ms = z, images, timer.ms
        return result
