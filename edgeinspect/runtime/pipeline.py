"""What the detector loops (DiAD, GLAD) share: their networks (checked at construction, not mid-frame),
prompt context, schedule, settings and the post-processor whose verdicts their results carry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from edgeinspect.core.ddim import DDIM
from edgeinspect.core.networks import Networks
from edgeinspect.core.timing import StageTimer
from edgeinspect.runtime.postprocess import PostProcessor


class DetectorLoop:
    def __init__(self, networks: Networks, roles: Sequence[str], context: torch.Tensor, schedule: DDIM,
                 inference: Any, scoring: Any, feature_size: int | None):
        for role in roles:
            networks[role]  # fail at construction, not mid-frame
        self.nets = networks
        self.context = context.to(networks.device)
        self.schedule = schedule
        self.inference = inference
        self.scoring = scoring
        self.feature_size = feature_size
        self.verdict: PostProcessor | None = None  # set by the detector assembly (a calibrated bundle's)

    def frames(self, images: torch.Tensor) -> tuple[torch.Tensor, StageTimer]:
        """A batch of frames (B, 3, H, W) on the networks' device, and a timer for its stages."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        return images.to(self.nets.device), StageTimer(self.nets.device)
