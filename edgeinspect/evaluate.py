"""`edgeinspect test` and `edgeinspect predict` for DiAD: scores, metrics, latency, overlays."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgeinspect.data.mvtec import IMAGE_SUFFIXES, MVTecFolder, image_to_tensor, read_image, resize_image, tensor_to_image
from edgeinspect.metrics import evaluate as compute_metrics
from edgeinspect.runtime.diad import STAGES
from edgeinspect.runtime.torch_backend import diad_pipeline, load_diad
from edgeinspect.training.checkpoint import load_state, resolve_checkpoint, write_json_atomic
from edgeinspect.visualize import heatmap_overlay, write_png


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def read_name_list(path: Path | None) -> set[str]:
    """Image names in a list file (exclude files, selections): one per line (a name, <type>/<name> or a
    path); `#` starts a comment; no file, no names."""
    if path is None:
        return set()
    return {ln.split("#")[0].strip() for ln in Path(path).read_text().splitlines()} - {""}


def measure_frame_latency(pipe, frames: torch.Tensor, warmup: int = 2, repeats: int = 10,
                          stages: tuple[str, ...] = STAGES) -> dict:
    """Batch-1 latency per stage and in total (what one camera frame costs on the line)."""
    for i in range(warmup):
        pipe(frames[i % len(frames)].unsqueeze(0))
    per_stage: dict[str, list[float]] = {s: [] for s in stages}
    totals = []
    for i in range(repeats):
        t0 = time.perf_counter()
        r = pipe(frames[i % len(frames)].unsqueeze(0))
        totals.append((time.perf_counter() - t0) * 1e3)
        for s in stages:
            per_stage[s].append(r.timings_ms.get(s, 0.0))
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


def method_of(model: Path) -> str:
    """The method a run/checkpoint folder was trained with (its config.json)."""
    cfg_file = resolve_checkpoint(model).parent.parent / "config.json"
    try:
        return json.loads(cfg_file.read_text()).get("method", "diad")
    except FileNotFoundError:
        return "diad"


def detector_from_run(model: Path, overrides: dict | None = None):
    """(method, config, torch pipeline) of a trained DiAD or GLAD run."""
    method = method_of(model)
    if method == "glad":
        from edgeinspect.evaluate_glad import pipeline_from_run

        cfg, pipe, _ = pipeline_from_run(model, overrides)
        return method, cfg, pipe
    cfg, m = load_diad(model, overrides)
    return method, cfg, diad_pipeline(cfg, m)


def evaluate_diad(model_path: Path, data_root: Path, out_json: Path | None = None, overrides: dict | None = None,
                  exclude_file: Path | None = None, progress: bool = True, overlays_dir: Path | None = None,
                  max_overlays: int = 24, latency_repeats: int = 10, threads: int | None = None) -> dict:
    cfg, model = load_diad(model_path, overrides)
    use_threads(cfg, threads)
    pipe = diad_pipeline(cfg, model)
    size = cfg.model.image_size
    data = MVTecFolder(data_root, "test", size, exclude=read_name_list(exclude_file))
    n = len(data)
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        images[i], masks[i] = data.load(i)
    labels = np.array([s.label for s in data.samples])
    scores = np.zeros(n, np.float64)
    maps = np.zeros((n, size, size), np.float32)
    stage_ms = {s: 0.0 for s in STAGES}
    bs = cfg.inference.batch_size
    t0 = time.perf_counter()
    for s in tqdm(range(0, n, bs), desc="test", disable=not progress, unit="batch"):
        x = torch.stack([image_to_tensor(im) for im in images[s:s + bs]])
        r = pipe(x)
        scores[s:s + bs] = r.scores.numpy()
        maps[s:s + bs] = r.maps.numpy()
        for k, v in r.timings_ms.items():
            stage_ms[k] += v
    wall = time.perf_counter() - t0
    metrics = compute_metrics(labels, scores, masks, maps)
    frames = torch.stack([image_to_tensor(images[i]) for i in range(min(4, n))])
    latency = measure_frame_latency(pipe, frames, repeats=latency_repeats)
    ckpt = resolve_checkpoint(model_path)
    state = load_state(ckpt)
    result = {
        "metrics": metrics,
        "n_images": n,
        "n_defective": int(labels.sum()),
        "defect_types": sorted({s.defect_type for s in data.samples}),
        "batched": {"batch_size": bs, "wall_s": wall, "ms_per_frame": wall * 1e3 / n,
                    "stage_ms_per_frame": {k: v / n for k, v in stage_ms.items()}},
        "latency_batch1": latency,
        "peak_rss_mb": peak_rss_mb(),
        "train_minutes": state.train_seconds / 60.0,
        "checkpoint": str(ckpt),
        "settings": {"t_start": cfg.inference.t_start, "steps": cfg.inference.steps, "seed": cfg.inference.seed,
                     "image_size": size, "feature_size": cfg.scoring.feature_size,
                     "features": cfg.features.name, "torch_threads": torch.get_num_threads(),
                     "device": str(pipe.nets.device)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": torch.get_num_threads()},
        "per_image": [{"image": str(smp.path.name), "type": smp.defect_type, "score": float(sc)}
                      for smp, sc in zip(data.samples, scores)],
    }
    if overlays_dir is not None:
        vmin, vmax = float(np.percentile(maps[labels == 0], 1)), float(np.percentile(maps, 99.9))
        chosen = _pick_examples(labels, scores, max_overlays)
        for i in chosen:
            ov = heatmap_overlay(images[i], maps[i], vmin, vmax, masks[i])
            write_png(Path(overlays_dir) / f"{data.samples[i].defect_type}_{data.samples[i].path.stem}.png",
                      np.concatenate([images[i], ov], axis=1))
        result["overlays"] = str(overlays_dir)
    if out_json is not None:
        write_json_atomic(out_json, result)
        np.savez_compressed(Path(out_json).with_suffix(".maps.npz"), maps=maps.astype(np.float16),
                            scores=scores, labels=labels)
    return result


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


def predict_diad(model_path: Path, inputs: list[Path], out_dir: Path, overrides: dict | None = None,
                 threshold: float | None = None, threads: int | None = None) -> list[dict]:
    cfg, model = load_diad(model_path, overrides)
    use_threads(cfg, threads)
    pipe = diad_pipeline(cfg, model)
    size = cfg.model.image_size
    files = _collect_images(inputs)
    rows: list[dict] = []
    out_dir = Path(out_dir)
    results = []
    bs = cfg.inference.batch_size
    for s in range(0, len(files), bs):
        imgs = [resize_image(read_image(f), size) for f in files[s:s + bs]]
        r = pipe(torch.stack([image_to_tensor(im) for im in imgs]))
        results += [(f, im, float(sc), m.numpy(), tensor_to_image(rec))
                    for f, im, sc, m, rec in zip(files[s:s + bs], imgs, r.scores, r.maps, r.reconstructions)]
    all_maps = np.stack([m for *_, m, _ in results])
    vmin, vmax = float(all_maps.min()), float(np.percentile(all_maps, 99.9))
    if threshold is not None:  # one scale across runs: the threshold sits in the middle of the colour bar
        vmax = max(vmax, 2 * threshold)
    for f, im, sc, amap, rec in results:
        name = f"{f.stem}_overlay.png"
        write_png(out_dir / name, np.concatenate([im, rec, heatmap_overlay(im, amap, vmin, vmax)], axis=1))
        verdict = None if threshold is None else ("NG" if sc > threshold else "OK")
        rows.append({"image": str(f), "score": sc, "verdict": verdict, "overlay": str(out_dir / name)})
    write_json_atomic(out_dir / "scores.json", {"threshold": threshold, "results": rows})
    return rows
