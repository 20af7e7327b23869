"""Writing atomic, resumable checkpoints: safetensors weights + JSON config/state (reading them:
`edgeinspect.core.runs`).

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgeinspect.core.atomic import fsync_path, write_json_atomic, write_text_atomic
from edgeinspect.core.runs import CheckpointError, TrainState


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
            write_json_atomic(tmp / "optimizer.json", meta)
        rng = {"torch": torch.get_rng_state()}
        rng.update({f"generator.{k}": g.get_state() for k, g in (generators or {}).items()})
        save_file(rng, str(tmp / "rng.safetensors"))
        write_json_atomic(tmp / "state.json", asdict(state))
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
    write_text_atomic(ckpt_root / "latest", name)
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


