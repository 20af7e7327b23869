"""What the detector loops (DiAD, GLAD) share: their networks (checked at construction, not mid-frame),
prompt context, schedule, settings, the normal-feature bank (scoring.reference bank or hybrid) and the
post-processor whose verdicts their results carry."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from edgeinspect.config import BANK_REFERENCES, frame_size
from edgeinspect.core.ddim import DDIM
from edgeinspect.core.networks import Networks
from edgeinspect.core.timing import StageTimer
from edgeinspect.runtime.bank import NormalBank, bank_distance_maps, check_bank
from edgeinspect.runtime.postprocess import PostProcessor
from edgeinspect.runtime.scoring import gaussian_blur


def neighbourhood_average(feats: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Each level's (B, C, h, w) features averaged over every position's k x k neighbourhood (stride 1, the
    border over the part inside the map): PatchCore's locally aware patch features. k = 1: unchanged."""
    if k == 1:
        return feats
    return [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in feats]


class DetectorLoop:
    def __init__(self, networks: Networks, roles: Sequence[str], context: torch.Tensor, schedule: DDIM,
                 inference: Any, scoring: Any, feature_size: int | None, bank: NormalBank | None = None,
                 image_size: int | None = None, image_levels: Sequence[int] | None = None):
        self.method_roles = tuple(roles)
        # The feature levels whose bank distances make the bank reference's image score (config
        # bank_image_levels of scoring.bank.image_strides); None: every level.
        self.image_levels = None if image_levels is None else tuple(image_levels)
        # The model image size: larger frames (read at the bank's feature size, config.frame_size) are
        # area-downscaled to it for the diffusion and the maps. None: frames are taken at their own size.
        self.image_size = image_size
        self.scoring = scoring
        self._check(networks, scoring.reference, bank)
        self.nets = networks
        self.context = context.to(networks.device)
        self.schedule = schedule
        self.inference = inference
        self.feature_size = feature_size
        self.verdict: PostProcessor | None = None  # set by the detector assembly (a calibrated bundle's)
        self.bank = None if bank is None else NormalBank([v.to(networks.device) for v in bank.vectors], bank.scales,
                                                         bank.info)

    def _check(self, networks: Networks, reference: str, bank: NormalBank | None) -> None:
        """Fail at construction, not mid-frame: the networks and bank `reference` needs (the bank reference
        runs no diffusion: only the feature extractor and the bank search)."""
        if reference in BANK_REFERENCES:
            check_bank(bank, reference)
        if reference != "bank" and self.encoder_role == "vae_anchor_encoder" and "vae_anchor_encoder" not in networks:
            raise ValueError("scoring.encoder 'anchor' needs an anchored autoencoder (model.vae.kind anchored, "
                             "the edge default) and, from a bundle, its vae_anchor_encoder graph (exported with "
                             "it): this model has none; use scoring.encoder full")
        # scoring.encoder anchor: the anchor encoder stands in for the full one, which only the vae_roundtrip
        # reference's round trip still runs (so a bundle pipeline loads it for that alone: detector.pipeline_roles)
        method = self.method_roles
        if self.encoder_role != "vae_encoder" and reference != "vae_roundtrip":
            method = tuple(self.encoder_role if r == "vae_encoder" else r for r in method)
        roles = {"bank": ("features", "bank_distance"), "hybrid": (*method, "bank_distance")}
        for role in roles.get(reference, method):
            networks[role]
        if reference != "bank" and self.decoder_role == "vae_anchor_decoder" and "vae_anchor_decoder" not in networks:
            raise ValueError("scoring.decoder 'anchor' needs an anchored autoencoder (model.vae.kind anchored, "
                             "the edge default) and, from a bundle, its vae_anchor_decoder graph (exported with "
                             "it): this model has none; use scoring.decoder full")

    @property
    def encoder_role(self) -> str:
        """The network that encodes frames to the latent the diffusion starts from: scoring.encoder full or
        anchor."""
        return "vae_anchor_encoder" if self.scoring.encoder == "anchor" else "vae_encoder"

    def roundtrip_latents(self, images: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """The latents of the vae_roundtrip reference's round trip of `images`: the full encoder's, whichever
        encoder made the start latents `z0` (reused when it was the full one)."""
        return z0 if self.encoder_role == "vae_encoder" else self.nets["vae_encoder"](image=images)["latent"]

    @property
    def decoder_role(self) -> str:
        """The network that decodes latents to images: scoring.decoder full or anchor."""
        return "vae_anchor_decoder" if self.scoring.decoder == "anchor" else "vae_decoder"

    @property
    def reference(self) -> str:
        return self.scoring.reference

    def using(self, reference: str, bank: NormalBank | None = None) -> "DetectorLoop":
        """This pipeline with another scoring.reference (and bank): the same networks and settings."""
        other = copy.copy(self)
        other.scoring = self.scoring.model_copy(update={"reference": reference})
        bank = bank if bank is not None else self.bank
        self._check(self.nets, reference, bank)
        other.bank = None if bank is None else NormalBank([v.to(self.nets.device) for v in bank.vectors],
                                                          bank.scales, bank.info)
        return other

    def features_of(self, images: torch.Tensor, size: int | None = None) -> list[torch.Tensor]:
        """The extractor's features of frames resized to `size` (default: the scoring feature size)."""
        size = size or self.feature_size
        if size and size != images.shape[-1]:
            images = F.interpolate(images, size=(size,) * 2, mode="bilinear", align_corners=False)
        return list(self.nets["features"](image=images).values())

    def model_images(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames at the model image size: larger frames (the bank's view) area-downscaled, others as they are."""
        if self.image_size is None or frames.shape[-2:] == (self.image_size, self.image_size):
            return frames
        if min(frames.shape[-2:]) < self.image_size:
            raise ValueError(f"frames of {tuple(frames.shape[-2:])} px are smaller than the model image "
                             f"({self.image_size} px): read them at the pipeline's frame_size")
        return F.interpolate(frames, size=(self.image_size,) * 2, mode="area")

    @property
    def frame_size(self) -> int | None:
        """The size this pipeline's frames are best read at (config.frame_size); None: no model image size."""
        return None if self.image_size is None else frame_size(self.image_size, self.scoring)

    def map_size(self, frames: torch.Tensor) -> tuple[int, int]:
        """The size of the maps of `frames`: the model image size (frames' own without one)."""
        return tuple(frames.shape[-2:]) if self.image_size is None else (self.image_size, self.image_size)

    @property
    def bank_feature_size(self) -> int | None:
        """The size frames are resized to for the bank's features (scoring.bank.feature_size, else the scoring
        feature size)."""
        return self.scoring.bank.feature_size or self.feature_size

    def bank_features(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """The features the bank search compares: of the frame itself at the bank's feature size (read at that
        size: no resize), averaged over scoring.bank.neighbourhood; the same features `edgeinspect bank` stores."""
        return neighbourhood_average(self.features_of(frames, self.bank_feature_size), self.scoring.bank.neighbourhood)

    def shares_bank_features(self, frames: torch.Tensor, images: torch.Tensor) -> bool:
        """Whether the bank's features are the input features the reconstruction reference computes anyway
        (the frames are the model images, the sizes agree, no neighbourhood average): then one extractor call
        serves both."""
        return frames is images and self.bank_feature_size == self.feature_size and self.scoring.bank.neighbourhood == 1

    def bank_maps(self, feats: list[torch.Tensor], size: tuple[int, int], image: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank reference's blurred map of frames with these features, (B, H, W), and the map its image
        score pools: the levels of scoring.bank.image_strides blurred by its image_blur_sigma (the same map
        when those are unset, or when `image` is False: a caller that pools another map, the hybrid)."""
        assert self.bank is not None, "no bank (checked at construction)"
        levels = bank_distance_maps(self.nets, feats, self.bank, size, self.scoring.bank.chunk_mb)
        maps = gaussian_blur(torch.stack(levels).sum(0), self.scoring.blur_sigma)
        cfg = self.scoring.bank
        if not image or (self.image_levels is None and cfg.image_blur_sigma in (None, self.scoring.blur_sigma)):
            return maps, maps
        chosen = range(len(levels)) if self.image_levels is None else self.image_levels
        sigma = self.scoring.blur_sigma if cfg.image_blur_sigma is None else cfg.image_blur_sigma
        return maps, gaussian_blur(torch.stack([levels[i] for i in chosen]).sum(0), sigma)

    def frames(self, images: torch.Tensor) -> tuple[torch.Tensor, StageTimer]:
        """A batch of frames (B, 3, H, W) on the networks' device, and a timer for its stages."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        return images.to(self.nets.device), StageTimer(self.nets.device)
