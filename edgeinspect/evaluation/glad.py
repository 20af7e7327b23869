"""GLAD's part of `edgeinspect test` (ADP firing, latency by stage with the ADP checks) and
`edgeinspect glad-threshold` (the firing-threshold and SAFF weight-bound proposal).

The result JSON has the same form and keys as DiAD's (`evaluate.diad_evaluation`), plus an `adp`
section (firing statistics) and the firing step/score of every image in `per_image`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeinspect.calibration.adp import adp_check_maxima, propose_threshold, propose_weight_bounds
from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.data.batches import spread_indices
from edgeinspect.data.mvtec import MVTecFolder, image_to_tensor, uint8_to_model
from edgeinspect.evaluation.evaluate import EvalSplit, evaluation_result, measure_frame_latency, run_eval_split, use_threads
from edgeinspect.evaluation.metrics import auroc
from edgeinspect.runtime.detector import Detector
from edgeinspect.runtime.run_detector import run_pipeline
from edgeinspect.runtime.glad import ADP_STAGES, STAGES, GLADPipeline


def measure_glad_latency(pipe: GLADPipeline, frames: torch.Tensor, warmup: int = 2, repeats: int = 10,
                         progress: bool = False) -> dict:
    """Batch-1 latency per stage (the ADP checks included) and in total. The firing step of a
    frame sets how many checks it costs, so the frames cycled through matter: pass a mix."""
    out = measure_frame_latency(pipe, frames, warmup, repeats, stages=STAGES, progress=progress)
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


def glad_evaluation(detector: Detector, split: EvalSplit, progress: bool, latency_repeats: int
                    ) -> tuple[dict, dict[str, np.ndarray]]:
    """GLAD's result JSON (DiAD's keys plus `adp`, `draw_image_auroc` and each image's firing) and the arrays
    stored beside it."""
    cfg, pipe = detector.cfg, detector.pipeline
    size = cfg.model.image_size
    labels = split.labels
    n = len(labels)
    out, batched = run_eval_split(pipe, split, cfg.inference.batch_size,
                                  ("scores", "maps", "fire_step", "fire_score", "fired_by_threshold", "adp_scores",
                                   "draw_scores"), STAGES, progress)
    # latency frames: normal and defective ones, since the firing step sets a frame's cost
    order = [int(i) for i in np.argsort(labels, kind="stable")]
    picks = list(dict.fromkeys([order[0], order[-1], order[len(order) // 2], order[1 % n]]))
    frames = torch.stack([image_to_tensor(split.images[i]) for i in picks])
    latency = measure_glad_latency(pipe, frames, repeats=latency_repeats, progress=progress)
    inf = pipe.inference
    settings = {"category": cfg.category, "t0": inf.t0, "steps": inf.steps, "min_step": inf.min_step,
                "reference": cfg.scoring.reference, "threshold": None if not np.isfinite(pipe.threshold) else pipe.threshold,
                "threshold_source": "config" if inf.threshold is not None else
                ("calibrated" if np.isfinite(pipe.threshold) else "none"),
                "top_k": inf.top_k, "adp_top_k": inf.adp_top_k, "weight_mode": inf.weight_mode,
                "weight_bounds": None if inf.weight_mode == "minmax" else list(pipe.weight_bounds),
                "seed": inf.seed, "draws": inf.draws, "image_size": size,
                "feature_size": cfg.scoring.feature_size,
                "blur_sigma": cfg.scoring.blur_sigma, "features": cfg.features.name,
                "torch_threads": torch.get_num_threads(), "device": str(pipe.nets.device)}
    scores, maps, fire_step, draw_scores = out["scores"], out["maps"], out["fire_step"], out["draw_scores"]
    result = evaluation_result(detector, split, scores, maps, batched, latency, settings)
    result["adp"] = _adp_summary(pipe, fire_step, out["fired_by_threshold"], labels)
    # each noise draw's own image AUROC (one entry with draws = 1): how much one draw moves the result
    result["draw_image_auroc"] = [auroc(labels, draw_scores[:, k]) for k in range(inf.draws)]
    for row, fs, fsc in zip(result["per_image"], fire_step, out["fire_score"]):
        row.update(fire_step=int(fs), fire_score=None if np.isnan(fsc) else float(fsc))
    return result, {"scores": scores, "maps": maps, "fire_step": fire_step, "adp_scores": out["adp_scores"],
                    "timesteps": np.array(pipe.timesteps), "draw_scores": draw_scores}


def glad_threshold(model_path: Path, data_root: Path | None = None, overrides: dict | None = None,
                   images: int | None = None, percentile: float | None = None, margin: float | None = None,
                   out_json: Path | None = None, threads: int | None = None) -> dict:
    """Propose, from normal images (default: the training normals of the run's data folder), the ADP
    firing threshold (`percentile` of each frame's largest ADP check score above min_step, times
    `margin`) and the linear SAFF weight's bounds (calibration.weight_percentile of the check maps at the
    fire, times calibration.weight_margin). Returns the proposal with the `--set` overrides that apply it."""
    cfg, pipe, _ = run_pipeline(model_path, overrides, calibrating=True)
    use_threads(cfg, threads)
    root = Path(data_root) if data_root is not None else cfg.train.data_root
    if root is None:
        raise ValueError("no data folder: pass --data")
    cal = cfg.calibration
    images = cal.images if images is None else images
    percentile = cal.percentile if percentile is None else percentile
    margin = cal.margin if margin is None else margin
    data = MVTecFolder(root, "train", cfg.model.image_size)
    u8, _, _ = data.load_all()
    sel = spread_indices(len(u8), images if images > 0 else len(u8))
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
              "settings": {"adp_space": pipe.inference.adp_space, "t0": pipe.inference.t0, "steps": pipe.inference.steps,
                           "min_step": pipe.inference.min_step, "adp_top_k": pipe.inference.adp_top_k}}
    if out_json is not None:
        write_json_atomic(out_json, result)
    return result
