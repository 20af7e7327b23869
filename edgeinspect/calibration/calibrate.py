"""Calibrating a bundle: score held-out normals (and labelled defects) through the bundle's own pipeline on
onnxruntime, fit the thresholds and the score normalisation, store them in the bundle.

    calibrate_bundle("bundles/diad_mtd", "data/normals_holdout", defects="data/mtd", target_frr=0.01)

What is stored in the manifest's calibration slot (`set_calibration`, hashes and digest updated), and
what every number means (the statistics: `edgeinspect.calibration.thresholds`):

    normalization   median and p99 of the normals' image scores; normalised = (s - median) / (p99 - median)
    image           threshold at the target false-reject rate (split-conformal rule), n, k, the FRR
                    achieved on the calibration normals, the expected FRR on new normals, guaranteed
    pixel           pixel threshold at the same target: rule "map_max" (default) = the conformal threshold
                    of each normal frame's largest map value, so a new normal frame has any pixel over it
                    with probability <= target; rule "pixels" = the same order statistic over all normal
                    pixels (a per-pixel false-positive rate; no finite-sample guarantee, pixels of one frame
                    are dependent). Achieved pixel FPR and frames-with-any-pixel-over on the calibration data.
    image_f1/pixel_f1  with labelled defects: the F1-optimal thresholds, their F1/precision/recall and the
                    FRR they give on the normals; F1 at the FRR threshold too
    verdict         the image threshold that decides OK/NG ("target_frr" by default, or "f1"), the pixel
                    threshold for defect masks, and the rule: NG if score > image_threshold
    data, settings  image counts and sources, backend/precision, the bundle's inference settings

The scores themselves go to calibration/scores.json in the bundle (hashed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeinspect.calibration.data import LabelledImage, labelled_images, normal_images, read_mask
from edgeinspect.calibration.thresholds import FRR_RULE, f1_at, f1_optimal_threshold, frr_threshold, subsample
from edgeinspect.config import frame_size
from edgeinspect.data.batches import spread_indices
from edgeinspect.data.mvtec import image_to_tensor, read_image, resize_image
from edgeinspect.runtime.bundle_loading import load_bundle
from edgeinspect.runtime.bundle_update import set_calibration
from edgeinspect.runtime.detector import bundle_pipeline
from edgeinspect.runtime.postprocess import PostProcessor, ScoreNormalization

CALIBRATION_VERSION = 1
PIXEL_RULES = ("map_max", "pixels")
VERDICT_SOURCES = ("target_frr", "f1")
MAX_PIXELS = 20_000_000  # pixel F1 / pixel quantiles beyond this use every k-th pixel


def load_frames(paths: Sequence[Path], size: int) -> torch.Tensor:
    return torch.stack([image_to_tensor(resize_image(read_image(p), size)) for p in paths])


def score_images(pipe: Any, paths: Sequence[Path], size: int, batch_size: int = 8, progress: bool = False,
                 desc: str = "score") -> tuple[np.ndarray, np.ndarray]:
    """(image scores (N,), anomaly maps (N, h, w) float32: the model image size) of image files read at `size`
    (the pipeline's frame size) through a pipeline."""
    scores = np.zeros(len(paths), np.float64)
    maps: np.ndarray | None = None
    starts = range(0, len(paths), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        r = pipe(load_frames(paths[s:s + batch_size], size))
        scores[s:s + batch_size] = r.scores.double().numpy()
        if maps is None:
            maps = np.zeros((len(paths), *r.maps.shape[1:]), np.float32)
        maps[s:s + batch_size] = r.maps.float().numpy()
    assert maps is not None, "no images"
    return scores, maps


def _pixel_threshold(normal_maps: np.ndarray, target_frr: float, rule: str, warn: bool = True) -> dict[str, Any]:
    if rule not in PIXEL_RULES:
        raise ValueError(f"pixel rule must be one of {PIXEL_RULES}, got {rule!r}")
    maxima = normal_maps.reshape(len(normal_maps), -1).max(axis=1)
    if rule == "map_max":
        t = frr_threshold(maxima, target_frr, warn=warn)
        out = {**t.to_json(), "rule": "map_max: " + FRR_RULE + ", over each normal frame's largest map value"}
    else:
        px = subsample(normal_maps, MAX_PIXELS)
        t = frr_threshold(px, target_frr, warn=warn)
        out = {**t.to_json(), "rule": "pixels: the same order statistic over all normal pixels (no finite-sample "
                                      "guarantee: pixels of a frame are dependent)", "guaranteed": False}
    out["pixel_fpr"] = float(np.mean(normal_maps > t.threshold))
    out["frames_with_pixels_over"] = float(np.mean(maxima > t.threshold))
    return out


def fit_calibration(normal_scores: np.ndarray, normal_maps: np.ndarray | None, target_frr: float, *,
                    labels: np.ndarray | None = None, scores: np.ndarray | None = None,
                    masks: np.ndarray | None = None, maps: np.ndarray | None = None,
                    pixel_rule: str = "map_max", verdict_from: str = "target_frr") -> dict[str, Any]:
    """The calibration record from scores alone (see the module docstring).

    normal_scores/normal_maps: the held-out normals (the FRR thresholds and the normalisation).
    labels/scores: the labelled set for the image F1 (the normals included, label 0). masks/maps: the frames
    with pixel labels for the pixel F1 (normals with all-False masks; defects without a mask left out)."""
    if verdict_from not in VERDICT_SOURCES:
        raise ValueError(f"verdict_from must be one of {VERDICT_SOURCES}, got {verdict_from!r}")
    normal_scores = np.asarray(normal_scores, np.float64)
    norm = ScoreNormalization.fit(normal_scores)
    # With the F1 thresholds deciding, the FRR ones are only reported: too few normals for their guarantee
    # is recorded (`guaranteed`), not warned about.
    warn = verdict_from == "target_frr"
    pixel_f1_possible = masks is not None and maps is not None and bool(np.asarray(masks).any())
    image = frr_threshold(normal_scores, target_frr, warn=warn)
    cal: dict[str, Any] = {
        "version": CALIBRATION_VERSION,
        "target_frr": float(target_frr),
        "normalization": norm.to_json(),
        "image": {**image.to_json(), "normalized_threshold": float(norm(image.threshold))},
        "normal_scores": {"n": int(normal_scores.size), "min": float(normal_scores.min()),
                          "median": norm.median, "p99": norm.p99, "max": float(normal_scores.max())},
    }
    if normal_maps is not None:
        cal["pixel"] = _pixel_threshold(np.asarray(normal_maps, np.float32), target_frr, pixel_rule,
                                        warn or not pixel_f1_possible)
    if labels is not None and scores is not None:
        labels = np.asarray(labels).astype(bool)
        scores = np.asarray(scores, np.float64)
        f1 = f1_optimal_threshold(labels, scores)
        cal["image_f1"] = {**f1.to_json(), "normalized_threshold": float(norm(f1.threshold)),
                           "achieved_frr": float(np.mean(normal_scores > f1.threshold)),
                           "n_images": int(labels.size)}
        cal["image"]["f1_on_labelled"] = f1_at(labels, scores, image.threshold)
        cal["image"]["recall_on_labelled"] = float(np.mean(scores[labels] > image.threshold))
        if masks is not None and maps is not None and np.asarray(masks).any():
            m = subsample(np.asarray(masks, bool), MAX_PIXELS)
            v = subsample(np.asarray(maps, np.float32), MAX_PIXELS)
            pf1 = f1_optimal_threshold(m, v)
            cal["pixel_f1"] = {**pf1.to_json(), "n_images": int(len(masks)), "n_pixels_used": int(m.size)}
            if "pixel" in cal:
                cal["pixel"]["f1_on_labelled"] = f1_at(m, v, cal["pixel"]["threshold"])
    if verdict_from == "f1" and "image_f1" not in cal:
        raise ValueError("verdict_from='f1' needs labelled defects")
    img_thr = cal["image_f1"]["threshold"] if verdict_from == "f1" else image.threshold
    pix = cal.get("pixel_f1" if verdict_from == "f1" and "pixel_f1" in cal else "pixel")
    # the record the one post-processor reads back (PostProcessor.from_calibration)
    cal["verdict"] = PostProcessor(float(img_thr), norm, None if pix is None else float(pix["threshold"]),
                                   verdict_from).to_json()
    return cal


def select_normals(normals: str | Path | Sequence[Path], limit: int | None = None) -> list[Path]:
    """The normal images calibration uses: a folder's images (an MVTec category folder gives its test/good)
    or a list of files; with `limit`, at most that many, spread evenly over the sorted list. The thresholds
    and the INT8 ranges are fitted on the same ones."""
    paths = [Path(p) for p in (list(normals) if isinstance(normals, (list, tuple)) else normal_images(normals))]
    if limit is not None and limit < len(paths):
        paths = [paths[i] for i in spread_indices(len(paths), limit)]
    return paths


def _settings_digest(bundle: Any) -> str:
    text = (bundle.path / bundle.manifest["settings"]).read_bytes()
    return hashlib.sha256(text).hexdigest()


def calibrate_bundle(bundle_dir: str | Path, normals: str | Path | Sequence[Path], defects: str | Path | None = None,
                     target_frr: float = 0.01, *, precision: str = "fp32", threads: int | None = None,
                     batch_size: int | None = None, pixel_rule: str = "map_max", verdict_from: str = "target_frr",
                     limit: int | None = None, progress: bool = False, store: bool = True) -> dict[str, Any]:
    """Score the normals (and labelled defects) through the bundle's pipeline on onnxruntime (CPU), fit the
    calibration and store it in the bundle (`store=False`: only return it). `normals`: a folder (an MVTec
    category folder gives its test/good) or a list of image files. `defects`: an MVTec-layout folder or a
    JSON index of {image, mask} pairs. `limit`: use at most this many normals (evenly spread). `precision`:
    the graphs to score with, as the line will run them: fp32, fp16, or int8 (the Q/DQ graphs written by
    `edgeinspect.calibration.qdq.quantize_bundle`, the roles left unquantised in fp16, else fp32)."""

    if verdict_from not in VERDICT_SOURCES:
        raise ValueError(f"verdict_from must be one of {VERDICT_SOURCES}, got {verdict_from!r}")
    if verdict_from == "f1" and defects is None:
        raise ValueError("the F1-optimal verdict threshold (verdict_from='f1') needs labelled defects")
    bundle = load_bundle(bundle_dir)
    size = bundle.config.model.image_size  # the maps' and masks' size; frames are read at frame_size
    frames = frame_size(size, bundle.config.scoring)
    normal_paths = select_normals(normals, limit)
    pipe = bundle_pipeline(bundle, "onnxruntime", precision=precision, intra_op_threads=threads, verdict=False)
    bs = batch_size or bundle.config.inference.batch_size
    n_scores, n_maps = score_images(pipe, normal_paths, frames, bs, progress, "normals")

    labelled: list[LabelledImage] = []
    kwargs: dict[str, Any] = {}
    if defects is not None:
        seen = {p.resolve() for p in normal_paths}
        labelled = [x for x in labelled_images(defects) if x.image.resolve() not in seen]
        if not any(x.label for x in labelled):
            raise ValueError(f"--defects {defects}: no defective images found")
        d_scores, d_maps = score_images(pipe, [x.image for x in labelled], frames, bs, progress, "defects")
        labels = np.concatenate([np.zeros(len(normal_paths), bool), [bool(x.label) for x in labelled]])
        scores = np.concatenate([n_scores, d_scores])
        # pixel labels: normals (all clear) and the labelled images that have a mask or are normal
        has_px = [x.mask is not None or not x.label for x in labelled]
        if any(x.mask is not None for x in labelled):
            masks = np.concatenate([np.zeros(n_maps.shape, bool),
                                    np.stack([read_mask(x.mask, size) for x, h in zip(labelled, has_px) if h])])
            maps = np.concatenate([n_maps, d_maps[np.array(has_px)]])
            kwargs.update(masks=masks, maps=maps)
        kwargs.update(labels=labels, scores=scores)
    cal = fit_calibration(n_scores, n_maps, target_frr, pixel_rule=pixel_rule, verdict_from=verdict_from, **kwargs)
    inf = bundle.config.inference
    cal["data"] = {
        "normals": {"source": str(normals) if not isinstance(normals, (list, tuple)) else "file list",
                    "n": len(normal_paths)},
        "labelled": None if defects is None else {
            "source": str(defects), "n": len(labelled), "n_defective": int(sum(x.label for x in labelled)),
            "n_with_masks": int(sum(x.mask is not None for x in labelled))},
    }
    cal["settings"] = {"backend": "onnxruntime", "precision": precision, "method": bundle.method,
                       "image_size": size, "settings_sha256": _settings_digest(bundle),
                       "inference": inf.model_dump(mode="json")}
    cal["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    scores_file = {
        "normals": [{"image": str(p), "score": float(s)} for p, s in zip(normal_paths, n_scores)],
        "labelled": [{"image": str(x.image), "label": x.label, "score": float(s)}
                     for x, s in zip(labelled, kwargs.get("scores", [])[len(normal_paths):])],
    }
    cal["files"] = ["calibration/scores.json"]
    if store:
        set_calibration(bundle.path, cal, files={"scores.json": (json.dumps(scores_file, indent=1) + "\n").encode()})
    return cal
