"""Detectors from a trained run folder, on torch: the run side of `runtime.detector`, whose
`assemble_pipeline` they end in too. Kept apart so that a process serving bundles (the line daemon)
never imports the torch models (diffusers, timm: hundreds of MB it does not use).

    run_pipeline(run)                                   # (cfg, pipeline, checkpoint extras), torch
    load_detector(model=run) / load_detector(bundle=b, backend="tensorrt")   # Detector: the CLI's
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeinspect.config import BANK_REFERENCES
from edgeinspect.core.runs import load_state, resolve_checkpoint, run_method
from edgeinspect.models.features import FeatureExtractor, build_features
from edgeinspect.runtime.bank import BANK_FILE, NormalBank, read_bank
from edgeinspect.runtime.bundle_loading import BundleError, load_bundle
from edgeinspect.runtime.detector import DETECTORS, Detector, Pipeline, assemble_pipeline, bundle_pipeline, for_calibration
from edgeinspect.runtime.glad import usable_calibration
from edgeinspect.runtime.torch_backend import detector_networks, load_diad, load_glad


def model_pipeline(cfg: Any, model: nn.Module, features: FeatureExtractor | None = None,
                   device: str | torch.device | None = None, threshold: float | None = None,
                   category: str | None = None, weight_bounds: tuple[float, float] | None = None,
                   bank: NormalBank | None = None) -> Pipeline:
    """The torch pipeline of a loaded DiAD or GLAD model (`threshold`, `category`, `weight_bounds`: GLAD's
    ADP settings, `bank`: the normal-feature bank, see `assemble_pipeline`)."""
    device = torch.device(device or cfg.runtime.device)
    nets = detector_networks(model, features or build_features(cfg), device)
    with torch.inference_mode():
        context = model.to(device).context(cfg.train.prompt if cfg.train.prompt is not None else "")
    return assemble_pipeline(cfg, nets, context, category=category, adp_threshold=threshold,
                             weight_bounds=weight_bounds, bank=bank)


def run_bank(run: str | Path, cfg: Any) -> NormalBank | None:
    """The run's normal-feature bank (its checkpoint folder's bank.safetensors) when cfg's reference needs it."""
    if cfg.scoring.reference not in BANK_REFERENCES:
        return None
    return read_bank(resolve_checkpoint(run) / BANK_FILE)


def run_pipeline(run: str | Path, overrides: dict | None = None, *, category: str | None = None,
                 calibrating: bool = False, device: str | torch.device | None = None
                 ) -> tuple[Any, Pipeline, dict[str, Any]]:
    """(config, torch pipeline, checkpoint state extras) of a trained DiAD or GLAD run or checkpoint folder.
    GLAD: `calibrating` runs the minmax SAFF weight (for proposing the ADP settings)."""
    method = run_method(run)
    if method == "diad":
        cfg, model = load_diad(run, overrides)
        return cfg, model_pipeline(cfg, model, device=device, bank=run_bank(run, cfg)), {}
    if method != "glad":
        raise ValueError(f"{run} is a {method!r} run, not a detector ({', '.join(DETECTORS)})")
    cfg, model, extra = load_glad(run, overrides)
    if calibrating:
        cfg = for_calibration(cfg)
    category = category or cfg.category
    inference = cfg.inference.for_category(category)
    bounds = extra.get("adp_weight_bounds")
    if calibrating:  # proposing them anew: the firing threshold is switched off, the weight is minmax
        calibrated, bounds = None, None
    else:
        calibrated, bounds = usable_calibration(inference, extra.get("adp_calibration"), extra.get("adp_threshold"),
                                                None if bounds is None else tuple(bounds))
    if inference.threshold is None and calibrated is None and not calibrating:
        warnings.warn("no ADP threshold (neither configured nor calibrated): frames fire only when t < min_step; "
                      "propose one with `edgeinspect glad-threshold`", stacklevel=2)
    return cfg, model_pipeline(cfg, model, device=device, threshold=calibrated, category=category,
                               weight_bounds=bounds,
                               bank=run_bank(run, cfg)), extra


def load_detector(model: str | Path | None = None, bundle: str | Path | None = None, backend: str = "torch", *,
                  overrides: dict[str, Any] | None = None, precision: str = "fp32",
                  intra_op_threads: int | None = None) -> Detector:
    """A detector from a run folder (`model`, torch) or a bundle (`bundle` on `backend`)."""
    if (model is None) == (bundle is None):
        raise ValueError("give a run folder (model) or a bundle, not both or neither")
    if model is not None:
        if backend != "torch":
            raise BundleError(f"a run folder runs on the torch backend, not {backend!r}: export it to a bundle "
                              f"(edgeinspect export --model {model} --out BUNDLE) and pass --bundle BUNDLE")
        cfg, pipe, _ = run_pipeline(model, overrides)
        ckpt = resolve_checkpoint(model)
        return Detector(cfg, pipe, str(ckpt), load_state(ckpt).train_seconds)
    loaded = load_bundle(bundle, overrides=overrides)
    pipe = bundle_pipeline(loaded, backend, precision=precision, intra_op_threads=intra_op_threads)
    source = loaded.manifest.get("source") or {}
    return Detector(loaded.config, pipe, str(source.get("checkpoint", loaded.path)), None)
