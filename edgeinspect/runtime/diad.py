"""DiAD inference: seeded DDIM reconstruction guided by the input, then feature-space scoring.

Written against named networks (`vae_encoder`, `hint_encoder`, `unet`, `vae_decoder`,
`features`), so the same loop runs on torch, onnxruntime or TensorRT networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from edgeinspect.config import DiADInferenceConfig, DiADScoringConfig
from edgeinspect.core.ddim import DDIM, seeded_noise
from edgeinspect.core.networks import Networks
from edgeinspect.runtime.scoring import cosine_distance_maps, gaussian_blur, pooled_max_score
from edgeinspect.core.timing import StageTimer
from edgeinspect.runtime.pipeline import DetectorLoop
from edgeinspect.runtime.postprocess import attach_verdicts

STAGES = ("encode", "denoise", "decode", "features", "scoring")
ROLES = ("vae_encoder", "hint_encoder", "unet", "vae_decoder", "features")


@dataclass
class DiADResult:
    scores: torch.Tensor  # (B,)
    maps: torch.Tensor  # (B, H, W) at the input size
    reconstructions: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    timings_ms: dict[str, float] = field(default_factory=dict)  # per batch, by stage
    # from the pipeline's post-processor (`verdict`), None without one: "OK"/"NG" per frame, normalised scores
    verdicts: list[str] | None = None
    normalized_scores: torch.Tensor | None = None


class DiADPipeline(DetectorLoop):
    """Reconstruct-and-compare for a batch of frames (float (B,3,H,W) in [-1, 1])."""

    def __init__(self, networks: Networks, context: torch.Tensor, schedule: DDIM,
                 inference: DiADInferenceConfig, scoring: DiADScoringConfig, feature_size: int | None = None):
        super().__init__(networks, ROLES, context, schedule, inference, scoring, feature_size)
        self.timesteps = schedule.timesteps(inference.t_start, inference.steps)

    def reconstruct(self, images: torch.Tensor, timer: StageTimer | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(reconstruction, the input's autoencoder round trip when scoring.reference asks for it)."""
        timer = timer or StageTimer(self.nets.device)
        b = images.shape[0]
        with timer("encode"):
            z0 = self.nets["vae_encoder"](image=images)["latent"]
            hint = self.nets["hint_encoder"](image=images)["hint"]
        with timer("denoise"):
            noise = seeded_noise(tuple(z0.shape[1:]), self.inference.seed, b, z0.device, z0.dtype)
            z = self.schedule.add_noise(z0, noise, self.timesteps[0])
            ctx = self.context.expand(b, *self.context.shape[1:])
            unet = self.nets["unet"]
            for i, t in enumerate(self.timesteps):
                t_prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
                tt = torch.full((b,), float(t), device=z.device)
                eps = unet(sample=z, timestep=tt, encoder_hidden_states=ctx, hint=hint)["noise_pred"]
                z, _ = self.schedule.step(z, eps, t, t_prev)
        with timer("decode"):
            if self.scoring.reference == "vae_roundtrip":
                both = self.nets["vae_decoder"](latent=torch.cat([z, z0]))["image"].clamp(-1, 1)
                return both[:b], both[b:]
            return self.nets["vae_decoder"](latent=z)["image"].clamp(-1, 1), None

    def score(self, images: torch.Tensor, recon: torch.Tensor, timer: StageTimer | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        timer = timer or StageTimer(self.nets.device)
        size = tuple(images.shape[-2:])
        with timer("features"):
            both = torch.cat([images, recon])
            if self.feature_size and self.feature_size != size[0]:
                both = F.interpolate(both, size=(self.feature_size,) * 2, mode="bilinear", align_corners=False)
            feats = self.nets["features"](image=both)
            b = images.shape[0]
            fa = [f[:b] for f in feats.values()]
            fb = [f[b:] for f in feats.values()]
        with timer("scoring"):
            maps = cosine_distance_maps(fa, fb, size)
            maps = gaussian_blur(maps, self.scoring.blur_sigma)
            scores = pooled_max_score(maps, self.scoring.pool_size, self.scoring.pool_iterations)
        return scores, maps

    def __call__(self, images: torch.Tensor) -> DiADResult:
        images, timer = self.frames(images)
        recon, roundtrip = self.reconstruct(images, timer)
        scores, maps = self.score(images if roundtrip is None else roundtrip, recon, timer)
        return attach_verdicts(DiADResult(scores.float().cpu(), maps.float().cpu(), recon.float().cpu(), timer.ms),
                               self.verdict)
