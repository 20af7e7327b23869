"""The PyTorch backend: networks from a trained checkpoint, and the DiAD pipeline on top of them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeinspect.config import DiADConfig
from edgeinspect.models.diad import DiADModel
from edgeinspect.models.features import FeatureExtractor
from edgeinspect.core.ddim import DDIM
from edgeinspect.runtime.diad import DiADPipeline
from edgeinspect.core.networks import Networks, torch_networks
from edgeinspect.core.runs import load_model_weights, load_run_config
from edgeinspect.training.diad import build_features


class FeatureNet(nn.Module):
    """The extractor with a tuple output, one tensor per level (graph-exportable)."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.extractor(image))


def feature_signature(levels: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return ("image",), tuple(f"feature_{i}" for i in range(levels))


def load_diad(path: str | Path, overrides: dict | None = None) -> tuple[DiADConfig, DiADModel]:
    """Model and config from a checkpoint folder or a run folder (latest checkpoint).

    `overrides` may change inference/scoring/runtime settings, never the model itself."""
    ckpt, cfg, extra = load_run_config(path, "diad", overrides, frozenset({"guidance"}))
    model = DiADModel(cfg)
    load_model_weights(model, ckpt)
    if extra.get("scaling_factor") is not None:
        model.set_scaling_factor(extra["scaling_factor"])
    return cfg, model.eval()


def diad_pipeline(cfg: DiADConfig, model: DiADModel, features: FeatureExtractor | None = None,
                  device: str | torch.device | None = None) -> DiADPipeline:
    device = torch.device(device or cfg.runtime.device)
    features = features or build_features(cfg)
    modules = dict(model.role_modules())
    modules["features"] = FeatureNet(features)
    nets: Networks = torch_networks(modules, device, {"features": feature_signature(len(features.strides))})
    with torch.inference_mode():
        context = model.to(device).context(cfg.train.prompt)
    return DiADPipeline(nets, context, DDIM(cfg.scheduler), cfg.inference, cfg.scoring,
                        cfg.scoring.feature_size)
