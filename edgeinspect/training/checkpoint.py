"""Atomic, resumable checkpoints: safetensors weights + JSON config/state.

Layout of a run directory:

    run/config.json                   the validated config the run was started with
    run/checkpoints/<name>/           one complete checkpoint
        model.safetensors             all module weights
        optimizer.safetensors         optimizer tensors (+ optimizer.json: param groups)
        rng.safetensors               torch RNG state, so a resumed run draws what it would have
        state.json                    stage, step, elapsed time, extra values (written last)
    run/checkpoints/latest            name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, then `latest` is replaced
atomically: a kill at any moment leaves the previous checkpoint intact and `latest` pointing at a
complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    stage: str
    step: int = 0  # completed steps within `stage`
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list, so a rename into it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    _write_json(Path(path), obj)


def _optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | Path, name: str, model: torch.nn.Module, state: TrainState,
                    optimizer: torch.optim.Optimizer | None = None, keep: int = 2,
                    generators: dict[str, torch.Generator] | None = None) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        if optimizer is not None:
            tensors, meta = _optimizer_to_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            _write_json(tmp / "optimizer.json", meta)
        rng = {"torch": torch.get_rng_state()}
        rng.update({f"generator.{k}": g.get_state() for k, g in (generators or {}).items()})
        save_file(rng, str(tmp / "rng.safetensors"))
        _write_json(tmp / "state.json", asdict(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except Exception as err:
        # e.g. a full disk: give the space of the half-written copy back; `latest` still names the
        # previous checkpoint, so --resume loses only the steps since then
        shutil.rmtree(tmp, ignore_errors=True)
        latest = (ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").is_file() else None
        raise CheckpointError(f"could not write checkpoint {final} ({err}); the latest complete one is "
                              f"{latest or 'none'}") from err
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(ckpt_root)
    latest_tmp = ckpt_root / "latest.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, ckpt_root / "latest")
    _prune(ckpt_root, keep, protect={name})
    return final


def _prune(ckpt_root: Path, keep: int, protect: set[str]) -> None:
    dirs = sorted((d for d in ckpt_root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.stat().st_mtime)
    # Stage-final checkpoints ("<stage>-final") are kept: they are the hand-over points between stages.
    removable = [d for d in dirs if d.name not in protect and not d.name.endswith("-final")]
    for d in removable[: max(0, len(removable) - (keep - 1))]:
        shutil.rmtree(d, ignore_errors=True)
    for d in ckpt_root.iterdir():
        if d.is_dir() and d.name.startswith(".tmp-"):
            shutil.rmtree(d, ignore_errors=True)


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


def load_state(ckpt: Path) -> TrainState:
    return TrainState(**json.loads((ckpt / "state.json").read_text()))


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    weights = load_file(str(ckpt / "model.safetensors"))
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{ckpt} does not match the model built from its config: "
            f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
        )


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path) -> bool:
    if not (ckpt / "optimizer.safetensors").is_file():
        return False
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    meta = json.loads((ckpt / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_tensors(tensors, meta))
    return True


def load_rng(ckpt: Path, generators: dict[str, torch.Generator] | None = None) -> None:
    f = ckpt / "rng.safetensors"
    if not f.is_file():
        return
    states = load_file(str(f))
    torch.set_rng_state(states["torch"])
    for k, g in (generators or {}).items():
        if f"generator.{k}" in states:
            g.set_state(states[f"generator.{k}"])


def load_run_config(path: str | Path, method: str, overrides: dict | None = None,
                    fixed: frozenset[str] = frozenset()) -> tuple[Path, Any, dict[str, Any]]:
    """(checkpoint folder, validated config, checkpoint state extras) of a trained `method` run, from
    a run folder (its latest checkpoint) or a checkpoint folder. `overrides` may change any section
    but `model` and the `fixed` ones (what the trained weights depend on)."""
    from edgeinspect.config import _merge, build_config

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
        data = _merge(data, overrides)
    data.pop("method", None)
    cfg = build_config(method, data["model"]["preset"], data, source=str(cfg_file))
    return ckpt, cfg, load_state(ckpt).extra
