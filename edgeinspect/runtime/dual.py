"""DualAnoDiff sampling: both branches denoised together, then the mask from the part.

Written only against named networks (`dual_unet` or `dual_unet_plain`, `vae_encoder`,
`vae_decoder`) and DDIM, so the same loop runs on any backend. Prompt contexts come in as tensors
(computed once by the prompt encoder, or read from a bundle).

Per output, a seed gives the noise of the whole branch, of the part branch and of the background
(drawn in that order from one generator), so an output depends on its seed alone, never on which
other outputs share its batch. Classifier-free guidance batches the conditional and the
unconditional (empty prompt for both branches) rows in one network call:
eps = eps_u + s (eps_c - eps_u), per branch. With BCM the background latent (the encoded normal
image) is noised to each step's timestep with its fixed seeded noise, so the background run sits at
the same noise level as the pair it compensates.

Start: from pure noise (`sampling.strength` 1, the paper), or, with strength < 1, from the last
round(strength x steps) steps of the schedule with the whole branch's latent = the background
image's latent noised to the first of them and the part branch's = the empty part image's latent
(EMPTY_VALUE everywhere) noised likewise, with the same seeded noises.

With `sampling.keep_background` (an extension) the whole branch keeps its background outside the part's
current mask: after each step, its latent there is the background latent noised to the next timestep,
and the mask is the part's clean estimate decoded and segmented like the final one (`latent_mask`).
With `sampling.paste_feather` (an extension) the final whole image is pasted onto the real background
by the final mask (`runtime.blended.paste`): beyond the feather it is the background itself.

The mask is segmented from the decoded part image (empty value 0 in [-1, 1], as the training
targets I * M are): |part| (max over channels) above a threshold, opening, closing, small
components dropped. It is in the generated image's pixel grid, so it is aligned with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from edgeinspect.config import DualAnoDiffSamplingConfig, PartMaskConfig
from edgeinspect.runtime.blended import latent_mask, paste
from edgeinspect.core.ddim import DDIM
from edgeinspect.core.networks import Networks

# The part image's value where there is no anomaly (training targets are I * M in [-1, 1]).
EMPTY_VALUE = 0.0


@dataclass
class PromptContexts:
    """Prompt embeddings (1, L, D) of the whole prompt, the part prompt and the empty prompt."""

    whole: torch.Tensor
    part: torch.Tensor
    empty: torch.Tensor


@dataclass
class DualSamples:
    whole: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    part: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    masks: np.ndarray  # (n, H, W) bool


def seeded_noises(seed: int, latent_shape: tuple[int, int, int], count: int) -> list[torch.Tensor]:
    """`count` independent standard-normal latents from one seed (whole, part, background)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(latent_shape, generator=g) for _ in range(count)]


def _kernel(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def segment_parts(parts: torch.Tensor, cfg: PartMaskConfig) -> np.ndarray:
    """Bool (n, H, W) masks of part images (n, 3, H, W) in [-1, 1]: where each differs from empty.

    The threshold runs on the images' device and one uint8 array comes back for the batch (the
    sampler calls this at every step with sampling.keep_background); the morphology and the small
    component filter run per image on the CPU."""
    parts = parts.detach().float()
    if cfg.reference == "median":
        reference = parts.flatten(2).median(dim=2).values[:, :, None, None]
    else:
        reference = torch.full_like(parts[:, :, :1, :1], EMPTY_VALUE)
    masks = ((parts - reference).abs().amax(dim=1) > cfg.threshold).to(torch.uint8).cpu().numpy()
    return np.stack([_clean_mask(m, cfg) for m in masks]) if len(masks) else masks.astype(bool)


def _clean_mask(mask: np.ndarray, cfg: PartMaskConfig) -> np.ndarray:
    """Opening, closing and the small-component filter of one thresholded (H, W) uint8 mask."""
    if cfg.open_kernel > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _kernel(cfg.open_kernel))
    if cfg.close_kernel > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _kernel(cfg.close_kernel))
    if cfg.min_area > 0:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.zeros(count, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= cfg.min_area
        mask = keep[labels].astype(np.uint8)
    return mask.astype(bool)


class DualSampler:
    def __init__(self, nets: Networks, schedule: DDIM, contexts: PromptContexts,
                 sampling: DualAnoDiffSamplingConfig, latent_shape: tuple[int, int, int], background: bool):
        self.nets = nets
        self.schedule = schedule
        self.contexts = contexts
        self.sampling = sampling
        self.latent_shape = tuple(latent_shape)
        self.background = background
        self.timesteps = schedule.timesteps(schedule.num_train_timesteps - 1, sampling.steps)
        self.from_images = sampling.strength < 1.0
        self.keep_background = sampling.keep_background
        if self.from_images:
            self.timesteps = self.timesteps[len(self.timesteps) - max(1, round(sampling.strength * sampling.steps)):]

    @property
    def needs_images(self) -> bool:
        """Whether `sample` needs background images (BCM, a start from them, keeping or pasting onto them)."""
        return self.background or self.from_images or self.keep_background or self.sampling.paste_feather is not None

    def _contexts(self, n: int, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.contexts

        def rows(x: torch.Tensor) -> torch.Tensor:
            return x.to(self.nets.device).expand(n, *x.shape[1:])

        if not guided:
            return rows(c.whole), rows(c.part)
        return torch.cat([rows(c.whole), rows(c.empty)]), torch.cat([rows(c.part), rows(c.empty)])

    def sample(self, seeds: list[int], backgrounds: torch.Tensor | None = None) -> DualSamples:
        """One output per seed; `backgrounds` (n, 3, H, W) in [-1, 1]: the background images (BCM's,
        and the start of the whole branch when sampling.strength < 1)."""
        if self.needs_images != (backgrounds is not None):
            raise ValueError("background images are needed exactly when the model has BCM, sampling.strength < 1, "
                             "sampling.keep_background or sampling.paste_feather")
        n = len(seeds)
        device = self.nets.device
        noises = [seeded_noises(s, self.latent_shape, 3) for s in seeds]
        z_whole = torch.stack([e[0] for e in noises]).to(device)
        z_part = torch.stack([e[1] for e in noises]).to(device)
        scale = self.sampling.guidance_scale
        guided = scale != 1.0
        copies = 2 if guided else 1
        ctx_whole, ctx_part = self._contexts(n, guided)
        if self.needs_images:
            bg_clean = self.nets["vae_encoder"](image=backgrounds.to(device))["latent"]
        if self.background or self.keep_background:
            bg_noise = torch.stack([e[2] for e in noises]).to(device, bg_clean.dtype)
        if self.from_images:
            t0 = self.timesteps[0]
            empty = torch.full_like(backgrounds[:1], EMPTY_VALUE).to(device)
            z_empty = self.nets["vae_encoder"](image=empty)["latent"].expand_as(bg_clean)
            z_whole = self.schedule.add_noise(bg_clean, z_whole.to(bg_clean.dtype), t0)
            z_part = self.schedule.add_noise(z_empty, z_part.to(bg_clean.dtype), t0)
        unet = self.nets["dual_unet" if self.background else "dual_unet_plain"]
        for i, t in enumerate(self.timesteps):
            t_prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
            inputs = {
                "sample_whole": z_whole.repeat(copies, 1, 1, 1),
                "sample_part": z_part.repeat(copies, 1, 1, 1),
                "timestep": torch.full((copies * n,), float(t), device=device),
                "ctx_whole": ctx_whole,
                "ctx_part": ctx_part,
            }
            if self.background:
                inputs["background"] = self.schedule.add_noise(bg_clean, bg_noise, t).repeat(copies, 1, 1, 1)
            out = unet(**inputs)
            eps_whole, eps_part = out["noise_whole"], out["noise_part"]
            if guided:
                eps_whole = eps_whole[n:] + scale * (eps_whole[:n] - eps_whole[n:])
                eps_part = eps_part[n:] + scale * (eps_part[:n] - eps_part[n:])
            z_whole, _ = self.schedule.step(z_whole, eps_whole, t, t_prev)
            z_part, part_clean = self.schedule.step(z_part, eps_part, t, t_prev)
            if self.keep_background:
                part_now = self.nets["vae_decoder"](latent=part_clean)["image"].clamp(-1, 1)
                masks = torch.from_numpy(segment_parts(part_now, self.sampling.mask))[:, None]
                keep = latent_mask(masks, part_now.shape[-1] // z_whole.shape[-1],
                                   self.sampling.keep_background_dilation).to(device, z_whole.dtype)
                bg_prev = bg_clean if t_prev < 0 else self.schedule.add_noise(bg_clean, bg_noise, t_prev)
                z_whole = keep * z_whole + (1 - keep) * bg_prev
        images = self.nets["vae_decoder"](latent=torch.cat([z_whole, z_part]))["image"].clamp(-1, 1)
        whole, part = images[:n], images[n:]
        masks = segment_parts(part, self.sampling.mask)
        feather, mode = self.sampling.paste_feather, self.sampling.paste_mode
        if feather is not None:
            recon = self.nets["vae_decoder"](latent=bg_clean)["image"].clamp(-1, 1) if mode == "residual" else None
            m = torch.from_numpy(masks)[:, None].float()
            whole = torch.stack([paste(whole[k], None if recon is None else recon[k], backgrounds[k].to(whole),
                                       m[k], feather, mode) for k in range(n)])
        return DualSamples(whole, part, masks)
