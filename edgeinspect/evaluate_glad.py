"""`edgeinspect test`, `predict` and `glad-threshold` for GLAD: scores, metrics, ADP firing,
latency by stage (ADP checks included), overlays, and the firing-threshold proposal.

The result JSON has the same form and keys as DiAD's (`evaluate.evaluate_diad`), plus an `adp`
section (firing statistics) and the firing step/score of every image in `per_image`.
"""

from __future__ import annotations

import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgeinspect.config import GLADConfig
from edgeinspect.data.mvtec import (
    MVTecFolder,
    image_to_tensor,
    read_image,
    resize_image,
    tensor_to_image,
    uint8_to_model,
)
from edgeinspect.evaluate import (_collect_images, _pick_examples, measure_frame_latency, peak_rss_mb, read_name_list,
                                  use_threads)
from edgeinspect.metrics import auroc
from edgeinspect.metrics import evaluate as compute_metrics
from edgeinspect.runtime.glad import ADP_STAGES, STAGES, GLADPipeline
from edgeinspect.training.checkpoint import load_state, resolve_checkpoint, write_json_atomic
from edgeinspect.training.glad import (
    adp_check_maxima,
    calibration_subset,
    for_calibration,
    glad_pipeline,
    load_glad,
    propose_threshold,
    propose_weight_bounds,
)
from edgeinspect.visualize import heatmap_overlay, write_png


def pipeline_from_run(model_path: Path, overrides: dict | None, category: str | None = None,
                      threads: int | None = None, calibrating: bool = False
                      ) -> tuple[GLADConfig, GLADPipeline, dict]:
    cfg, model, extra = load_glad(model_path, overrides)
    if calibrating:
        cfg = for_calibration(cfg)
    use_threads(cfg, threads)
    category = category or cfg.category
    settings = cfg.inference.for_category(category)
    calibrated = extra.get("adp_threshold")
    if settings.threshold is None and calibrated is None:
        warnings.warn("no ADP threshold (neither configured nor calibrated): frames fire only when t < min_step; "
                      "propose one with `edgeinspect glad-threshold`", stacklevel=2)
    bounds = extra.get("adp_weight_bounds")
    return cfg, glad_pipeline(cfg, model, threshold=calibrated, category=category,
                              weight_bounds=None if bounds is None else tuple(bounds)), extra


def measure_glad_latency(pipe: GLADPipeline, frames: torch.Tensor, warmup: int = 2, repeats: int = 10) -> dict:
    """Batch-1 latency per stage (the ADP checks included) and in total. The firing step of a
    frame sets how many checks it costs, so the frames cycled through matter: pass a mix."""
    out = measure_frame_latency(pipe, frames, warmup, repeats, stages=STAGES)
    out["adp_checks_ms"] = sum(out["stage_ms"][s] for s in ADP_STAGES)
    return out


def _adp_summary(pipe: GLADPipeline, fire_step: np.ndarray, by_threshold: np.ndarray, labels: np.ndarray) -> dict:
    def stats(sel: np.ndarray) -> dict:
        fs = fire_step[sel]
        fired = fs >= 0
        return {"n": int(sel.sum()), "fired_by_threshold": float(by_threshold[sel].mean()) if sel.any() else None,
                "never_fired": float((~fired).mean()) if sel.any() else None,
                "mean_fire_step": float(fs[fired].mean()) if fired.any() else None}

    return {"threshold": None if not np.isfinite(pipe.threshold) else pipe.threshold,
            "timesteps": list(pipe.timesteps), "all": stats(np.ones_like(labels, bool)),
            "normal": stats(labels == 0), "defective": stats(labels == 1)}


def evaluate_glad(model_path: Path, data_root: Path, out_json: Path | None = None, overrides: dict | None = None,
                  exclude_file: Path | None = None, progress: bool = True, overlays_dir: Path | None = None,
                  max_overlays: int = 24, latency_repeats: int = 10, threads: int | None = None) -> dict:
    cfg, pipe, extra = pipeline_from_run(model_path, overrides, threads=threads)
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
    fire_step = np.full(n, -1, np.int64)
    fire_score = np.full(n, np.nan)
    by_threshold = np.zeros(n, bool)
    adp_scores = np.full((n, len(pipe.timesteps)), np.nan, np.float32)
    draw_scores = np.zeros((n, pipe.inference.draws), np.float64)
    stage_ms = {s: 0.0 for s in STAGES}
    bs = cfg.inference.batch_size
    t0 = time.perf_counter()
    for s in tqdm(range(0, n, bs), desc="test", disable=not progress, unit="batch"):
        x = torch.stack([image_to_tensor(im) for im in images[s:s + bs]])
        r = pipe(x)
        scores[s:s + bs] = r.scores.numpy()
        maps[s:s + bs] = r.maps.numpy()
        fire_step[s:s + bs] = r.fire_step.numpy()
        fire_score[s:s + bs] = r.fire_score.numpy()
        by_threshold[s:s + bs] = r.fired_by_threshold.numpy()
        adp_scores[s:s + bs] = r.adp_scores.numpy()
        draw_scores[s:s + bs] = r.draw_scores.numpy()
        for k, v in r.timings_ms.items():
            stage_ms[k] += v
    wall = time.perf_counter() - t0
    metrics = compute_metrics(labels, scores, masks, maps)
    # latency frames: normal and defective ones, since the firing step sets a frame's cost
    order = [int(i) for i in np.argsort(labels, kind="stable")]
    picks = list(dict.fromkeys([order[0], order[-1], order[len(order) // 2], order[1 % n]]))
    frames = torch.stack([image_to_tensor(images[i]) for i in picks])
    latency = measure_glad_latency(pipe, frames, repeats=latency_repeats)
    ckpt = resolve_checkpoint(model_path)
    state = load_state(ckpt)
    inf = pipe.inference
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
        "settings": {"category": cfg.category, "t0": inf.t0, "steps": inf.steps, "min_step": inf.min_step,
                     "threshold": None if not np.isfinite(pipe.threshold) else pipe.threshold,
                     "threshold_source": "config" if inf.threshold is not None else
                     ("calibrated" if extra.get("adp_threshold") is not None else "none"),
                     "top_k": inf.top_k, "adp_top_k": inf.adp_top_k, "weight_mode": inf.weight_mode,
                     "weight_bounds": None if inf.weight_mode == "minmax" else list(pipe.weight_bounds),
                     "seed": inf.seed, "draws": inf.draws, "image_size": size,
                     "feature_size": cfg.scoring.feature_size,
                     "blur_sigma": cfg.scoring.blur_sigma, "features": cfg.features.name,
                     "torch_threads": torch.get_num_threads(), "device": str(pipe.nets.device)},
        "adp": _adp_summary(pipe, fire_step, by_threshold, labels),
        # each noise draw's own image AUROC (one entry with draws = 1): how much one draw moves the result
        "draw_image_auroc": [auroc(labels, draw_scores[:, k]) for k in range(inf.draws)],
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": torch.get_num_threads()},
        "per_image": [{"image": str(smp.path.name), "type": smp.defect_type, "score": float(sc),
                       "fire_step": int(fs), "fire_score": None if np.isnan(fsc) else float(fsc)}
                      for smp, sc, fs, fsc in zip(data.samples, scores, fire_step, fire_score)],
    }
    if overlays_dir is not None:
        normals = maps[labels == 0] if (labels == 0).any() else maps
        vmin, vmax = float(np.percentile(normals, 1)), float(np.percentile(maps, 99.9))
        for i in _pick_examples(labels, scores, max_overlays):
            ov = heatmap_overlay(images[i], maps[i], vmin, vmax, masks[i])
            write_png(Path(overlays_dir) / f"{data.samples[i].defect_type}_{data.samples[i].path.stem}.png",
                      np.concatenate([images[i], ov], axis=1))
        result["overlays"] = str(overlays_dir)
    if out_json is not None:
        write_json_atomic(out_json, result)
        np.savez_compressed(Path(out_json).with_suffix(".maps.npz"), maps=maps.astype(np.float16),
                            scores=scores, labels=labels, fire_step=fire_step,
                            adp_scores=adp_scores, timesteps=np.array(pipe.timesteps), draw_scores=draw_scores)
    return result


def predict_glad(model_path: Path, inputs: list[Path], out_dir: Path, overrides: dict | None = None,
                 threshold: float | None = None, threads: int | None = None) -> list[dict]:
    """Score image files; `threshold` is the image-score verdict threshold (not the ADP one)."""
    cfg, pipe, _ = pipeline_from_run(model_path, overrides, threads=threads)
    size = cfg.model.image_size
    files = _collect_images(inputs)
    out_dir = Path(out_dir)
    results = []
    bs = cfg.inference.batch_size
    for s in range(0, len(files), bs):
        imgs = [resize_image(read_image(f), size) for f in files[s:s + bs]]
        r = pipe(torch.stack([image_to_tensor(im) for im in imgs]))
        results += [(f, im, float(sc), m.numpy(), tensor_to_image(rec), int(fs))
                    for f, im, sc, m, rec, fs in zip(files[s:s + bs], imgs, r.scores, r.maps, r.reconstructions,
                                                     r.fire_step)]
    all_maps = np.stack([res[3] for res in results])
    vmin, vmax = float(all_maps.min()), float(np.percentile(all_maps, 99.9))
    if threshold is not None:
        vmax = max(vmax, 2 * threshold)
    rows: list[dict] = []
    for f, im, sc, amap, rec, fs in results:
        name = f"{f.stem}_overlay.png"
        write_png(out_dir / name, np.concatenate([im, rec, heatmap_overlay(im, amap, vmin, vmax)], axis=1))
        verdict = None if threshold is None else ("NG" if sc > threshold else "OK")
        rows.append({"image": str(f), "score": sc, "verdict": verdict, "fire_step": fs,
                     "overlay": str(out_dir / name)})
    write_json_atomic(out_dir / "scores.json", {"threshold": threshold, "results": rows})
    return rows


def glad_threshold(model_path: Path, data_root: Path | None = None, overrides: dict | None = None,
                   images: int | None = None, percentile: float | None = None, margin: float | None = None,
                   out_json: Path | None = None, threads: int | None = None) -> dict:
    """Propose, from normal images (default: the training normals of the run's data folder), the ADP
    firing threshold (`percentile` of each frame's largest ADP check score above min_step, times
    `margin`) and the linear SAFF weight's bounds (calibration.weight_percentile of the check maps at the
    fire, times calibration.weight_margin). Returns the proposal with the `--set` overrides that apply it."""
    cfg, pipe, _ = pipeline_from_run(model_path, overrides, threads=threads, calibrating=True)
    root = Path(data_root) if data_root is not None else cfg.train.data_root
    if root is None:
        raise ValueError("no data folder: pass --data")
    cal = cfg.calibration
    images = cal.images if images is None else images
    percentile = cal.percentile if percentile is None else percentile
    margin = cal.margin if margin is None else margin
    data = MVTecFolder(root, "train", cfg.model.image_size)
    u8, _, _ = data.load_all()
    sel = calibration_subset(len(u8), images if images > 0 else len(u8))
    maxima, fire_maps = adp_check_maxima(pipe, uint8_to_model(u8[sel]), cfg.inference.batch_size)
    thr = propose_threshold(maxima, percentile, margin)
    low, high = propose_weight_bounds(fire_maps, cal.weight_percentile, cal.weight_margin)
    category = cfg.category
    prefix = f"inference.categories.{category}." if category else "inference."
    finite = maxima[np.isfinite(maxima)]
    result = {"threshold": thr, "weight_low": low, "weight_high": high, "category": category, "images": len(sel),
              "percentile": percentile, "margin": margin, "weight_percentile": cal.weight_percentile,
              "weight_margin": cal.weight_margin,
              "set": f"--set {prefix}threshold={thr:.6g}",
              "set_weight": f"--set inference.weight_mode=linear --set {prefix}weight_low={low:.6g} "
                            f"--set {prefix}weight_high={high:.6g}",
              "data": str(root),
              "max_scores": {"min": float(finite.min()), "median": float(np.median(finite)),
                             "max": float(finite.max())},
              "settings": {"t0": pipe.inference.t0, "steps": pipe.inference.steps,
                           "min_step": pipe.inference.min_step, "adp_top_k": pipe.inference.adp_top_k}}
    if out_json is not None:
        write_json_atomic(out_json, result)
    return result
