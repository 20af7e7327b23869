"""DiAD inference: seeded DDIM reconstruction guided by the input, then feature-space scoring.

Written against named networks (`vae_encoder`, `hint_encoder`, `unet`, `vae_decoder`,
`features`, and `bank_distance` for the bank and hybrid references), so the same loop runs on torch,
onnxruntime or TensorRT networks. scoring.reference "bank" skips the reconstruction (no diffusion);
"hybrid" adds the bank's map to the reconstruction's (runtime/bank.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from edgeinspect.config import BANK_REFERENCES, DiADInferenceConfig, DiADScoringConfig
from edgeinspect.core.ddim import DDIM, seeded_noise
from edgeinspect.core.networks import Networks
from edgeinspect.runtime.bank import NormalBank, hybrid_maps
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
    reconstructions: torch.Tensor | None  # (B, 3, H, W) in [-1, 1]; None with the bank reference (none made)
    timings_ms: dict[str, float] = field(default_factory=dict)  # per batch, by stage
    # from the pipeline's post-processor (`verdict`), None without one: "OK"/"NG" per frame, normalised scores
    verdicts: list[str] | None = None
    normalized_scores: torch.Tensor | None = None


class DiADPipeline(DetectorLoop):
    """Reconstruct-and-compare for a batch of frames (float (B,3,H,W) in [-1, 1])."""

    def __init__(self, networks: Networks, context: torch.Tensor, schedule: DDIM,
                 inference: DiADInferenceConfig, scoring: DiADScoringConfig, feature_size: int | None = None,
                 bank: NormalBank | None = None, image_size: int | None = None,
                 image_levels: Sequence[int] | None = None):
        super().__init__(networks, ROLES, context, schedule, inference, scoring, feature_size, bank, image_size,
                         image_levels)
        self.timesteps = schedule.timesteps(inference.t_start, inference.steps)

    def reconstruct(self, images: torch.Tensor, timer: StageTimer | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(reconstruction, the input's autoencoder round trip when scoring.reference asks for it)."""
        timer = timer or StageTimer(self.nets.device)
        b = images.shape[0]
        with timer("encode"):
            z0 = self.nets[self.encoder_role](image=images)["latent"]
            z_rt = self.roundtrip_latents(images, z0) if self.scoring.reference == "vae_roundtrip" else None
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
            if z_rt is not None:
                both = self.nets[self.decoder_role](latent=torch.cat([z, z_rt]))["image"].clamp(-1, 1)
                return both[:b], both[b:]
            return self.nets[self.decoder_role](latent=z)["image"].clamp(-1, 1), None

    def score(self, images: torch.Tensor, recon: torch.Tensor | None, timer: StageTimer | None = None,
              frames: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores and maps (at the model image size) of `images` against `recon` (reconstruction,
        hybrid), the bank (bank, hybrid) or both (hybrid). `frames`: the frames as read, when larger than
        the model images `images` (the bank's view; default: `images`)."""
        timer = timer or StageTimer(self.nets.device)
        frames = images if frames is None else frames
        size = tuple(images.shape[-2:])
        b = images.shape[0]
        searches_bank = self.reference in BANK_REFERENCES
        shared = self.shares_bank_features(frames, images)
        with timer("features"):
            feats = None
            if recon is not None or shared:
                feats = self.features_of(images if recon is None else torch.cat([images, recon]))
            bank_feats = None
            if searches_bank:
                bank_feats = [f[:b] for f in feats] if shared and feats is not None else self.bank_features(frames)
        maps = None
        if recon is not None:
            assert feats is not None
            with timer("scoring"):
                maps = gaussian_blur(cosine_distance_maps([f[:b] for f in feats], [f[b:] for f in feats], size),
                                     self.scoring.blur_sigma)
        image_maps = None  # the map the image score pools, when not the pixel map (the bank reference's own)
        if searches_bank:
            assert bank_feats is not None
            with timer("scoring"):  # the bank search makes the map (the hybrid pools its own map)
                bank, bank_image = self.bank_maps(bank_feats, size, image=maps is None)
            assert self.bank is not None
            if maps is None:
                maps, image_maps = bank, bank_image
            else:
                maps = hybrid_maps(maps, bank, self.bank.scales)
        assert maps is not None, "neither a reconstruction nor a bank"
        with timer("scoring"):
            scores = pooled_max_score(maps if image_maps is None else image_maps, self.scoring.pool_size,
                                      self.scoring.pool_iterations)
        return scores, maps

    def __call__(self, images: torch.Tensor) -> DiADResult:
        frames, timer = self.frames(images)
        images = self.model_images(frames)
        if self.reference == "bank":
            scores, maps = self.score(images, None, timer, frames)
            return attach_verdicts(DiADResult(scores.float().cpu(), maps.float().cpu(), None, timer.ms), self.verdict)
        recon, roundtrip = self.reconstruct(images, timer)
        scores, maps = self.score(images if roundtrip is None else roundtrip, recon, timer, frames)
        return attach_verdicts(DiADResult(scores.float().cpu(), maps.float().cpu(), recon.float().cpu(), timer.ms),
                               self.verdict)
