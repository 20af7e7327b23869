"""Building the normal-feature bank from a category's training normals (`edgeinspect bank`).

    bank = fit_bank(pipe, training_normals(data))      # pipe: a run's or a bundle's detector pipeline
    save_run_bank(run, bank) / set_bank(bundle, bank)   # bank.safetensors beside the weights / in the bundle

Per feature level: the features of the training normals at the scoring feature size (through the pipeline's
`features` network, so a bundle's bank is built by the graph it will be scored with), a seeded draw of
`scoring.bank.candidates` positions, then a greedy k-centre coreset of `scoring.bank.size` of them, as
PatchCore selects its memory bank (each pick is the candidate farthest from those already picked), on unit
vectors (the score is a cosine distance) after a seeded Gaussian random projection to
`scoring.bank.projection` dimensions (distances nearly kept, the selection many times cheaper).

`scoring.bank.scale_images` training normals (spread over the folder) are kept out of the bank; the hybrid
reference's scales are measured on them: the `scale_percentile` of the pixel values of the reconstruction
reference's maps and of the bank reference's maps (runtime/bank.py: why the hybrid is shaped so).
Nothing here looks at a defect.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save

from edgeinspect.calibration.calibrate import load_frames
from edgeinspect.calibration.data import list_images
from edgeinspect.config import BANK_REFERENCES, BankConfig, frame_size, merge_config
from edgeinspect.core.atomic import write_bytes_atomic
from edgeinspect.core.runs import resolve_checkpoint
from edgeinspect.data.batches import spread_indices
from edgeinspect.runtime.bank import BANK_FILE, BankError, NormalBank
from edgeinspect.runtime.run_detector import run_pipeline

__all__ = ["training_normals", "greedy_coreset", "candidate_vectors", "coreset_bank", "fit_bank", "save_run_bank",
           "bank_bytes", "build_run_bank", "finish_training_bank"]


def training_normals(data: str | Path) -> list[Path]:
    """The training normals of an MVTec-layout category folder (train/good), or every image of a folder."""
    p = Path(data)
    return list_images(p / "train" / "good" if (p / "train" / "good").is_dir() else p)


def greedy_coreset(vectors: torch.Tensor, size: int, projection: int, seed: int) -> torch.Tensor:
    """Indices of `size` rows of `vectors` (N, C) picked by greedy k-centre (farthest-point) selection,
    starting from a seeded random row, on a seeded Gaussian projection to `projection` dims (0: none)."""
    n = vectors.shape[0]
    if size > n:
        raise BankError(f"a bank of {size} vectors needs at least as many candidates; the training normals give "
                        f"{n} at this level: lower scoring.bank.size or add training images")
    g = torch.Generator().manual_seed(seed)
    x = vectors.float()
    if projection and projection < x.shape[1]:
        x = x @ (torch.randn(x.shape[1], projection, generator=g) / math.sqrt(projection))
    # squared distances as |x|^2 + |c|^2 - 2 x.c: one matrix-vector product per pick, no (N, C) temporary
    norms = (x * x).sum(1)
    picked = torch.empty(size, dtype=torch.long)
    picked[0] = int(torch.randint(n, (1,), generator=g))
    nearest = norms + norms[picked[0]] - 2 * (x @ x[picked[0]])
    for i in range(1, size):
        picked[i] = int(nearest.argmax())
        nearest = torch.minimum(nearest, norms + norms[picked[i]] - 2 * (x @ x[picked[i]]))
    return picked


def candidate_vectors(features_of: Callable[[torch.Tensor], list[torch.Tensor]], paths: Sequence[Path], size: int,
                      cfg: BankConfig, batch_size: int) -> list[torch.Tensor]:
    """Per level, about `cfg.candidates` unit feature vectors of the frames `paths` (read at `size`), the same
    number drawn (seeded) from every frame's positions: (N, C) each. `features_of`: frames (B, 3, H, W) in
    [-1, 1] -> one (B, C, h, w) map per level, at the scoring feature size."""
    g = torch.Generator().manual_seed(cfg.seed)
    per_frame = max(1, math.ceil(cfg.candidates / len(paths)))
    out: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for s in range(0, len(paths), batch_size):
            feats = features_of(load_frames(paths[s:s + batch_size], size))
            out = out or [[] for _ in feats]
            for level, f in enumerate(feats):
                unit = F.normalize(f.float(), dim=1, eps=1e-6).flatten(2).transpose(1, 2).cpu()  # (b, hw, C)
                for row in unit:
                    out[level].append(row[torch.randperm(row.shape[0], generator=g)[:per_frame]])
    return [torch.cat(level) for level in out]


def coreset_bank(features_of: Callable[[torch.Tensor], list[torch.Tensor]], paths: Sequence[Path], size: int,
                 cfg: BankConfig, batch_size: int = 8, progress: bool = False) -> NormalBank:
    """The bank (no hybrid scales) of the frames `paths`: per level a greedy k-centre coreset of `cfg.size`
    of their candidate vectors (see `candidate_vectors`)."""
    if not paths:
        raise BankError("no training normals to build the bank from")
    candidates = candidate_vectors(features_of, paths, size, cfg, batch_size)
    vectors = []
    for level, c in enumerate(candidates):
        if progress:
            print(f"bank level {level}: k-centre coreset of {cfg.size} from {c.shape[0]} candidates", flush=True)
        vectors.append(c[greedy_coreset(c, cfg.size, cfg.projection, cfg.seed + level)].contiguous())
    return NormalBank(vectors, info={"train_images": len(paths), "candidates": [int(c.shape[0]) for c in candidates]})


def fit_bank(pipe: Any, paths: Sequence[Path], size: int, batch_size: int = 8, progress: bool = False
             ) -> NormalBank:
    """The bank of the training normals `paths` (read at `size`: config.frame_size with the bank reference) for `pipe` (a DiAD or GLAD
    pipeline; its scoring.bank settings), with the hybrid scales measured on the held-out ones when
    scale_images > 0."""
    cfg: BankConfig = pipe.scoring.bank
    paths = list(paths)
    held = spread_indices(len(paths), cfg.scale_images) if cfg.scale_images else []
    if paths and len(held) >= len(paths):
        raise BankError(f"{len(paths)} training normals: scoring.bank.scale_images {cfg.scale_images} would leave "
                        "none for the bank")
    held_set = set(held)
    bank = coreset_bank(lambda x: pipe.bank_features(pipe.frames(x)[0]),
                        [p for i, p in enumerate(paths) if i not in held_set], size, cfg, batch_size, progress)
    bank.info["held_out_images"] = len(held)
    if held:
        held_paths = [paths[i] for i in held]
        rec = _maps(pipe.using("reconstruction"), held_paths, size, batch_size)
        bank_maps = _maps(pipe.using("bank", bank), held_paths, size, batch_size)
        q = cfg.scale_percentile
        bank.scales = (max(float(np.percentile(rec, q)), 1e-12), max(float(np.percentile(bank_maps, q)), 1e-12))
    return bank


def _maps(pipe: Any, paths: Sequence[Path], size: int, batch_size: int) -> np.ndarray:
    return np.concatenate([pipe(load_frames(paths[s:s + batch_size], size)).maps.float().numpy()
                           for s in range(0, len(paths), batch_size)])


def bank_bytes(bank: NormalBank) -> bytes:
    """The bank's safetensors file content."""
    return save(bank.tensors(), metadata={k: str(v) for k, v in bank.info.items()})


def save_run_bank(run: str | Path, bank: NormalBank) -> Path:
    """Write the bank beside the run's latest (or the given) checkpoint's weights, atomically."""
    path = resolve_checkpoint(run) / BANK_FILE
    write_bytes_atomic(path, bank_bytes(bank))
    return path


def build_run_bank(run: str | Path, data: str | Path, overrides: dict | None = None, progress: bool = False
                   ) -> tuple[Path, NormalBank, Any]:
    """Fit a run's bank on the training normals of `data` through the run's own pipeline on torch (with
    `overrides`; built with the reconstruction reference, which the hybrid scales need) and store it beside
    the weights: (its path, the bank, the run's config)."""
    over = merge_config(overrides or {}, {"scoring": {"reference": "reconstruction"}})
    cfg, pipe, _ = run_pipeline(run, over)
    bank = fit_bank(pipe, training_normals(data), frame_size(cfg.model.image_size, cfg.scoring, "bank"), cfg.inference.batch_size, progress)
    return save_run_bank(run, bank), bank, cfg


def finish_training_bank(cfg: Any, checkpoint: Path, progress: bool = False) -> Path | None:
    """The end of a DiAD or GLAD training: when the config scores against the bank (scoring.reference bank or
    hybrid), build it from the training normals into the final checkpoint, so `test`, `export` and the
    daemon work without a separate `edgeinspect bank` step. Nothing when the reference needs none or the
    checkpoint has its bank already (a resumed, finished run)."""
    if cfg.scoring.reference not in BANK_REFERENCES or (Path(checkpoint) / BANK_FILE).is_file():
        return None
    if cfg.train.data_root is None:
        raise BankError(f"scoring.reference {cfg.scoring.reference!r} needs a normal-feature bank, built from "
                        "train.data_root, which this config does not set")
    if progress:
        print(f"bank: scoring.reference {cfg.scoring.reference!r} needs the normal-feature bank; building it from "
              f"{cfg.train.data_root}", flush=True)
    return build_run_bank(checkpoint, cfg.train.data_root, progress=progress)[0]
