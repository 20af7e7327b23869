"""The one post-processor: a frame's image score to its normalised score and OK/NG verdict, its anomaly
map to a defect mask. The pipelines (a bundle's calibrated one attaches verdicts to every result), the
daemon, `edgeinspect predict` and calibration (which writes the record it is read from) all use it.

    post = PostProcessor.from_bundle(bundle)        # or .from_calibration(manifest["calibration"])
    v = post(score)                                 # FrameVerdict(score, normalized_score, verdict "OK"/"NG")
    mask = post.defect_mask(anomaly_map)            # pixels over the calibrated pixel threshold
    PostProcessor(threshold)                        # a bare image threshold (no normalisation): --threshold

A frame is NG when its raw image score is strictly greater than the image threshold (equivalently, its
normalised score is greater than the normalised threshold), or when the score is not finite (a broken
frame is not passed). Normalisation: (s - median) / (p99 - median) of the calibration normals' scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

OK, NG = "OK", "NG"
NORMALIZATION_FORMULA = "(score - median) / (p99 - median) of the calibration normals' scores"


class NotCalibratedError(ValueError):
    """A bundle without calibration where a calibrated verdict was asked for."""


def finite_scores(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{what}: no scores")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: scores contain NaN or Inf")
    return a


@dataclass(frozen=True)
class ScoreNormalization:
    median: float
    p99: float

    @property
    def scale(self) -> float:
        d = self.p99 - self.median
        return d if d > 0 else 1.0  # degenerate (all normals equal): only shift

    @classmethod
    def fit(cls, normal_scores) -> "ScoreNormalization":
        s = finite_scores(normal_scores, "normal scores")
        return cls(float(np.median(s)), float(np.percentile(s, 99)))

    def __call__(self, scores):
        return (np.asarray(scores, dtype=np.float64) - self.median) / self.scale

    def to_json(self) -> dict:
        return {"kind": "median_p99", "formula": NORMALIZATION_FORMULA, "median": self.median, "p99": self.p99,
                "scale": self.scale, "degenerate": not self.p99 > self.median}

    @classmethod
    def from_json(cls, d: dict) -> "ScoreNormalization":
        if d.get("kind", "median_p99") != "median_p99":
            raise ValueError(f"unknown score normalisation {d.get('kind')!r}")
        return cls(float(d["median"]), float(d["p99"]))


@dataclass(frozen=True)
class FrameVerdict:
    score: float
    normalized_score: float | None  # None without a normalisation (a bare threshold)
    verdict: str  # "OK" or "NG"

    @property
    def ng(self) -> bool:
        return self.verdict == NG

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "normalized_score": self.normalized_score, "verdict": self.verdict}


@dataclass(frozen=True)
class PostProcessor:
    image_threshold: float  # raw image score; NG if score > image_threshold
    normalization: ScoreNormalization | None = None
    pixel_threshold: float | None = None  # raw map value; a pixel is defective if map > pixel_threshold
    source: str = "target_frr"  # which threshold decides: calibrated "target_frr" or "f1", or "given"

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any] | None, bundle_path: Any = None) -> "PostProcessor":
        where = f"bundle {bundle_path}: " if bundle_path is not None else ""
        if not calibration:
            raise NotCalibratedError(f"{where}not calibrated: run `edgeinspect calibrate --bundle ... --normals ...` "
                                     "first")
        try:
            v = calibration["verdict"]
            return cls(float(v["image_threshold"]), ScoreNormalization.from_json(calibration["normalization"]),
                       None if v.get("pixel_threshold") is None else float(v["pixel_threshold"]),
                       str(v.get("source", "target_frr")))
        except (KeyError, TypeError, ValueError) as e:
            raise NotCalibratedError(f"{where}the calibration record is incomplete or of another format ({e!r}); "
                                     "calibrate the bundle again") from None

    @classmethod
    def from_bundle(cls, bundle: Any) -> "PostProcessor":
        """From a loaded Bundle (its verified manifest's calibration slot)."""
        return cls.from_calibration(bundle.calibration, bundle.path)

    @property
    def normalized_threshold(self) -> float | None:
        return self.normalize(self.image_threshold)

    def normalize(self, scores):
        """Normalised score(s): (s - median) / (p99 - median) of the calibration normals (None without)."""
        if self.normalization is None:
            return None
        out = self.normalization(_numpy(scores))
        return float(out) if np.ndim(out) == 0 else out

    def is_ng(self, scores):
        s = _numpy(scores)
        out = ~np.isfinite(s) | (s > self.image_threshold)
        return bool(out) if np.ndim(out) == 0 else out

    def __call__(self, score) -> FrameVerdict:
        s = float(_numpy(score))
        norm = self.normalize(s) if np.isfinite(s) else None
        return FrameVerdict(s, norm, NG if self.is_ng(s) else OK)

    def batch(self, scores) -> list[FrameVerdict]:
        return [self(s) for s in np.asarray(_numpy(scores), dtype=np.float64).ravel()]

    def defect_mask(self, anomaly_map) -> np.ndarray:
        if self.pixel_threshold is None:
            raise NotCalibratedError("no pixel threshold in this calibration")
        return _numpy(anomaly_map) > self.pixel_threshold

    def to_json(self) -> dict[str, Any]:
        """The calibration record's `verdict` slot (what `from_calibration` reads back)."""
        return {"source": self.source, "image_threshold": float(self.image_threshold),
                "normalized_threshold": self.normalized_threshold, "pixel_threshold": self.pixel_threshold,
                "rule": "NG if image score > image_threshold (normalised: > normalized_threshold); a pixel "
                        "is defective if its map value > pixel_threshold"}


def _numpy(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def attach_verdicts(result: Any, post: PostProcessor | None) -> Any:
    """Set `verdicts` (list of "OK"/"NG", or None without a post-processor) and `normalized_scores` (torch
    tensor, or None) on a pipeline result (DiADResult/GLADResult: anything with `scores`)."""
    if post is None:
        result.verdicts, result.normalized_scores = None, None
        return result
    scores = result.scores
    norm = post.normalize(scores)
    result.normalized_scores = None if norm is None else torch.as_tensor(np.atleast_1d(norm), dtype=torch.float32)
    result.verdicts = [v.verdict for v in post.batch(scores)]
    return result
