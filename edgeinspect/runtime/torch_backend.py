"""The PyTorch backend: a detector's networks from a trained run folder (a bundle holds graphs, not torch
weights: the onnxruntime and TensorRT backends run bundles)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeinspect.config import DiADConfig, GLADConfig
from edgeinspect.core.networks import Networks, torch_networks
from edgeinspect.core.roles import bank_distance_signature, feature_signature
from edgeinspect.core.runs import load_model_weights, load_run_config
from edgeinspect.models.diad import DiADModel
from edgeinspect.models.features import BankDistance, FeatureExtractor, FeatureNet
from edgeinspect.models.glad import GLADModel


def load_diad(path: str | Path, overrides: dict | None = None) -> tuple[DiADConfig, DiADModel]:
    """Model and config from a checkpoint folder or a run folder (latest checkpoint).

    `overrides` may change inference/scoring/runtime settings, never the model itself."""
    ckpt, cfg, extra = load_run_config(path, "diad", overrides, frozenset({"guidance"}))
    model = DiADModel(cfg)
    load_model_weights(model, ckpt)
    if extra.get("scaling_factor") is not None:
        model.set_scaling_factor(extra["scaling_factor"])
    return cfg, model.eval()


def load_glad(path: str | Path, overrides: dict | None = None) -> tuple[GLADConfig, GLADModel, dict]:
    """Config, model and checkpoint state extras (scaling factor, calibrated ADP threshold) from a
    GLAD checkpoint folder or run folder. `overrides` may change anything but the model."""
    ckpt, cfg, extra = load_run_config(path, "glad", overrides)
    model = GLADModel(cfg)
    load_model_weights(model, ckpt)
    if extra.get("scaling_factor") is not None:
        model.set_scaling_factor(extra["scaling_factor"])
    return cfg, model.eval(), extra


def detector_networks(model: nn.Module, features: FeatureExtractor, device: str | torch.device = "cpu") -> Networks:
    """A DiAD or GLAD model's roles, the feature extractor and the bank search as torch Networks."""
    levels = len(features.strides)
    modules = dict(model.role_modules())
    modules["features"] = FeatureNet(features)
    modules["bank_distance"] = BankDistance(levels)
    return torch_networks(modules, device, {"features": feature_signature(levels),
                                            "bank_distance": bank_distance_signature(levels)})
