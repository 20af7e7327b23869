"""`edgeinspect test` and `edgeinspect predict` on a detector from a run (torch) or a bundle (onnxruntime,
TensorRT): the test-split loop, metrics, batch-1 latency, result JSON, overlays and file scoring; DiAD's
result settings here, GLAD's additions (ADP firing) in `edgeinspect.evaluation.glad`."""

from __future__ import annotations

import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgeinspect.data.mvtec import (
    IMAGE_SUFFIXES,
    MVTecFolder,
    Sample,
    image_to_tensor,
    read_image,
    read_mask,
    resize_image,
    tensor_to_image,
)
from edgeinspect.evaluation.metrics import evaluate as compute_metrics
from edgeinspect.runtime.diad import STAGES
from edgeinspect.runtime.detector import Detector
from edgeinspect.runtime.postprocess import PostProcessor
from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.data.visualize import frame_and_heatmap, heatmap_overlay, write_png


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def read_name_list(path: Path | None) -> set[str]:
    """Image names in a list file (exclude files, selections): one per line (a name, <type>/<name> or a
    path); `#` starts a comment; no file, no names."""
    if path is None:
        return set()
    return {ln.split("#")[0].strip() for ln in Path(path).read_text().splitlines()} - {""}


def measure_frame_latency(pipe, frames: torch.Tensor, warmup: int = 2, repeats: int = 10,
                          stages: tuple[str, ...] = STAGES, progress: bool = False) -> dict:
    """Batch-1 latency per stage and in total (what one camera frame costs on the line)."""
    bar = tqdm(total=warmup + repeats, desc="latency (batch 1)", disable=not progress, unit="frame")
    for i in range(warmup):
        pipe(frames[i % len(frames)].unsqueeze(0))
        bar.update()
    per_stage: dict[str, list[float]] = {s: [] for s in stages}
    totals = []
    for i in range(repeats):
        t0 = time.perf_counter()
        r = pipe(frames[i % len(frames)].unsqueeze(0))
        totals.append((time.perf_counter() - t0) * 1e3)
        for s in stages:
            per_stage[s].append(r.timings_ms.get(s, 0.0))
        bar.update()
    bar.close()
    return {
        "ms_per_frame": statistics.median(totals),
        "ms_per_frame_p90": float(np.percentile(totals, 90)),
        "stage_ms": {s: statistics.median(v) for s, v in per_stage.items()},
        "repeats": repeats,
    }


def use_threads(cfg, threads: int | None) -> None:
    """torch's CPU threads for inference: `threads` when given (the CLI's --threads), else the run's
    train.threads, else torch's default (all cores)."""
    n = threads or cfg.train.threads
    if n:
        torch.set_num_threads(n)


@dataclass
class EvalSplit:
    """A category's test split: frames at the detector's frame size, masks at its maps' (the model image) size."""

    samples: list[Sample]
    images: np.ndarray  # (n, H, W, 3) uint8
    masks: np.ndarray  # (n, h, w) bool
    labels: np.ndarray  # (n,) 1: defective


def load_eval_split(data_root: Path, size: int, exclude_file: Path | None = None, frames: int | None = None
                    ) -> EvalSplit:
    """The test split with masks at `size` (the model image) and frames at `frames` (config.frame_size;
    default `size`)."""
    frames = frames or size
    data = MVTecFolder(data_root, "test", frames, exclude=read_name_list(exclude_file), mask_size=size)
    n = len(data)
    images = np.zeros((n, frames, frames, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        images[i], masks[i] = data.load(i)
    return EvalSplit(data.samples, images, masks, np.array([s.label for s in data.samples]))


def run_eval_split(pipe, split: EvalSplit, batch_size: int, fields: tuple[str, ...], stages: tuple[str, ...],
                   progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """The detector over the test images in batches: per result field (a batch-first tensor of its result,
    e.g. scores, maps) the array over all images, and the `batched` entry (wall time, stage ms per frame)."""
    n = len(split.labels)
    out: dict[str, np.ndarray] = {}
    stage_ms = dict.fromkeys(stages, 0.0)
    t0 = time.perf_counter()
    for s in tqdm(range(0, n, batch_size), desc="test", disable=not progress, unit="batch"):
        r = pipe(torch.stack([image_to_tensor(im) for im in split.images[s:s + batch_size]]))
        for f in fields:
            v = getattr(r, f).numpy()
            if f not in out:
                out[f] = np.empty((n, *v.shape[1:]), v.dtype)
            out[f][s:s + batch_size] = v
        for k, v in r.timings_ms.items():
            stage_ms[k] = stage_ms.get(k, 0.0) + v
    wall = time.perf_counter() - t0
    return out, {"batch_size": batch_size, "wall_s": wall, "ms_per_frame": wall * 1e3 / n,
                 "stage_ms_per_frame": {k: v / n for k, v in stage_ms.items()}}


def evaluation_result(detector: Detector, split: EvalSplit, scores: np.ndarray, maps: np.ndarray, batched: dict,
                      latency: dict, settings: dict) -> dict:
    """The result JSON's common part (DiAD's and GLAD's): metrics, timings, the run, settings, per image."""
    return {
        "metrics": compute_metrics(split.labels, scores, split.masks, maps),
        "n_images": len(split.labels),
        "n_defective": int(split.labels.sum()),
        "defect_types": sorted({s.defect_type for s in split.samples}),
        "batched": batched,
        "latency_batch1": latency,
        "peak_rss_mb": peak_rss_mb(),
        "train_minutes": None if detector.train_seconds is None else detector.train_seconds / 60.0,
        "checkpoint": detector.checkpoint,
        "settings": settings,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": torch.get_num_threads()},
        "per_image": [{"image": str(smp.path.name), "type": smp.defect_type, "score": float(sc)}
                      for smp, sc in zip(split.samples, scores)],
    }


def write_evaluation_outputs(result: dict, split: EvalSplit, scores: np.ndarray, maps: np.ndarray,
                             out_json: Path | None, overlays_dir: Path | None, max_overlays: int,
                             **arrays: np.ndarray) -> None:
    """Overlays of a spread of examples into `overlays_dir`: each the image at its own size beside its
    anomaly map (`frame_and_heatmap`; one colour scale for all: the normals' 1st to all maps' 99.9th
    percentile); the result JSON to `out_json` and the maps, scores, labels and `arrays` beside it
    (<name>.maps.npz)."""
    if overlays_dir is not None:
        normals = maps[split.labels == 0] if (split.labels == 0).any() else maps
        vmin, vmax = float(np.percentile(normals, 1)), float(np.percentile(maps, 99.9))
        for i in _pick_examples(split.labels, scores, max_overlays):
            smp = split.samples[i]
            mask = None if smp.mask_path is None else read_mask(smp.mask_path)
            tile = frame_and_heatmap(read_image(smp.path), maps[i], vmin, vmax, mask,
                                     f"{smp.defect_type}: score {scores[i]:.4f}")
            write_png(Path(overlays_dir) / f"{smp.defect_type}_{smp.path.stem}.png", tile)
        result["overlays"] = str(overlays_dir)
    if out_json is not None:
        write_json_atomic(out_json, result)
        np.savez_compressed(Path(out_json).with_suffix(".maps.npz"), maps=maps.astype(np.float16),
                            scores=scores, labels=split.labels, **arrays)


def diad_evaluation(detector: Detector, split: EvalSplit, progress: bool, latency_repeats: int
                    ) -> tuple[dict, dict[str, np.ndarray]]:
    """DiAD's result JSON and the arrays stored beside it."""
    cfg, pipe = detector.cfg, detector.pipeline
    out, batched = run_eval_split(pipe, split, cfg.inference.batch_size, ("scores", "maps"), STAGES, progress)
    frames = torch.stack([image_to_tensor(im) for im in split.images[:4]])
    latency = measure_frame_latency(pipe, frames, repeats=latency_repeats, progress=progress)
    settings = {"t_start": cfg.inference.t_start, "steps": cfg.inference.steps, "seed": cfg.inference.seed,
                "image_size": cfg.model.image_size, "feature_size": cfg.scoring.feature_size,
                "features": cfg.features.name, "torch_threads": torch.get_num_threads(),
                "device": str(pipe.nets.device), "reference": cfg.scoring.reference,
                "encoder": cfg.scoring.encoder, "decoder": cfg.scoring.decoder}
    return evaluation_result(detector, split, out["scores"], out["maps"], batched, latency, settings), out


def _pick_examples(labels: np.ndarray, scores: np.ndarray, k: int) -> list[int]:
    """A spread of examples: defective and normal, highest and lowest scoring."""
    pos = [int(i) for i in np.argsort(-scores) if labels[i] == 1]
    neg = [int(i) for i in np.argsort(-scores) if labels[i] == 0]
    half = k // 2
    take_pos = pos[: half // 2] + pos[-(half - half // 2):] if len(pos) > half else pos
    take_neg = neg[: (k - half) // 2] + neg[-((k - half) - (k - half) // 2):] if len(neg) > k - half else neg
    return list(dict.fromkeys(take_pos + take_neg))


def _collect_images(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    if not out:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}")
    return out


def predict_files(pipe, size: int, batch_size: int, inputs: list[Path], out_dir: Path, threshold: float | None,
                  fields: tuple[str, ...] = ()) -> list[dict]:
    """Score image files (folders: every image below them): an overlay per image (input, reconstruction
    unless the bank reference made none, heat map on one colour scale) and `scores.json` in `out_dir`; a row per image with its score, verdict
    and the per-frame result `fields` (e.g. GLAD's fire_step). The verdict comes from `threshold` when given,
    else from the pipeline's calibrated post-processor (a calibrated bundle), else there is none."""
    post = PostProcessor(threshold, source="given") if threshold is not None else pipe.verdict
    threshold = None if post is None else post.image_threshold
    files = _collect_images(inputs)
    out_dir = Path(out_dir)
    results = []
    for s in range(0, len(files), batch_size):
        imgs = [resize_image(read_image(f), size) for f in files[s:s + batch_size]]
        r = pipe(torch.stack([image_to_tensor(im) for im in imgs]))
        for k, (f, im) in enumerate(zip(files[s:s + batch_size], imgs)):
            rec = None if r.reconstructions is None else tensor_to_image(r.reconstructions[k])  # bank: none
            results.append((f, im, float(r.scores[k]), r.maps[k].numpy(), rec,
                            {name: getattr(r, name)[k].item() for name in fields}))
    all_maps = np.stack([res[3] for res in results])
    vmin, vmax = float(all_maps.min()), float(np.percentile(all_maps, 99.9))
    if threshold is not None:  # one scale across runs: the threshold sits in the middle of the colour bar
        vmax = max(vmax, 2 * threshold)
    rows: list[dict] = []
    for f, im, sc, amap, rec, extra in results:
        name = f"{f.stem}_overlay.png"
        im = im if im.shape[0] == amap.shape[0] else resize_image(im, amap.shape[0])  # the frame at the map's size
        panels = [im] if rec is None else [im, rec]
        write_png(out_dir / name, np.concatenate([*panels, heatmap_overlay(im, amap, vmin, vmax)], axis=1))
        verdict = None if post is None else post(sc).verdict
        rows.append({"image": str(f), "score": sc, "verdict": verdict, **extra, "overlay": str(out_dir / name)})
    write_json_atomic(out_dir / "scores.json", {"threshold": threshold, "results": rows})
    return rows
