"""Reading trained runs: a run folder's checkpoints, its config and the state saved with its weights.

Layout of a run folder (written by `edgeinspect.training.checkpoint.save_checkpoint`):

    run/config.json                   the validated config the run was started with
    run/checkpoints/<name>/           one complete checkpoint (model.safetensors, state.json, ...)
    run/checkpoints/latest            name of the newest complete checkpoint
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from edgeinspect.config import build_config, merge_config


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    stage: str
    step: int = 0  # completed steps within `stage`
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints")
    return found


def stage_checkpoint(path: str | Path, stage: str, setting: str) -> Path:
    """A checkpoint folder as given; for a run folder its `<stage>-final` checkpoint. `setting` names the
    config field that gave `path`, for the error."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    cand = path / "checkpoints" / f"{stage}-final"
    if (cand / "state.json").is_file():
        return cand
    if (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path} has no checkpoints/{stage}-final yet (its {stage} stage has not finished); "
                              f"point {setting} at a checkpoint folder to use another one")
    raise CheckpointError(f"{setting}={path} is neither a checkpoint folder nor a run folder")


def load_state(ckpt: Path) -> TrainState:
    return TrainState(**json.loads((ckpt / "state.json").read_text()))


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    weights = load_file(str(ckpt / "model.safetensors"))
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        hint = ""
        if any(k.endswith("anchor.basis") for k in result.missing_keys):
            hint = (" (its autoencoder has no block PCA: a run trained before the PCA anchor became the default; "
                    "add \"anchor\": \"resize\" to model.vae in its config.json)")
        raise CheckpointError(
            f"{ckpt} does not match the model built from its config: "
            f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}{hint}"
        )


def run_method(path: str | Path) -> str:
    """The method a run or checkpoint folder was trained with (its config.json; "diad" without one)."""
    cfg_file = resolve_checkpoint(path).parent.parent / "config.json"
    if not cfg_file.is_file():
        return "diad"
    return json.loads(cfg_file.read_text()).get("method", "diad")


def load_run_config(path: str | Path, method: str, overrides: dict | None = None,
                    fixed: frozenset[str] = frozenset()) -> tuple[Path, Any, dict[str, Any]]:
    """(checkpoint folder, validated config, checkpoint state extras) of a trained `method` run, from
    a run folder (its latest checkpoint) or a checkpoint folder. `overrides` may change any section
    but `model` and the `fixed` ones (what the trained weights depend on)."""
    ckpt = resolve_checkpoint(path)
    cfg_file = ckpt.parent.parent / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{ckpt} is not inside a run folder (no {cfg_file})")
    data = json.loads(cfg_file.read_text())
    if data.get("method", method) != method:
        raise CheckpointError(f"{cfg_file} is a {data.get('method')!r} run, not a {method!r} one")
    if overrides:
        bad = set(overrides) & ({"model", "method"} | set(fixed))
        if bad:
            raise ValueError(f"cannot override {sorted(bad)} of a trained model")
        data = merge_config(data, overrides)
    data.pop("method", None)
    cfg = build_config(method, data["model"]["preset"], data, source=str(cfg_file))
    return ckpt, cfg, load_state(ckpt).extra
