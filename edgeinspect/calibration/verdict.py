"""The calibrated OK/NG decision for one frame: what the line daemon calls after the pipeline.

    verdict = Verdict.from_bundle(bundle)          # or Verdict.from_calibration(manifest["calibration"])
    v = verdict(score)                              # FrameVerdict(score, normalized_score, verdict "OK"/"NG")
    mask = verdict.defect_mask(anomaly_map)         # pixels over the calibrated pixel threshold

A frame is NG when its raw image score is strictly greater than the calibrated image threshold
(equivalently, its normalised score is greater than the normalised threshold), or when the score is not
finite (a broken frame is not passed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeinspect.calibration.thresholds import ScoreNormalization

OK, NG = "OK", "NG"


class NotCalibratedError(ValueError):
    """A bundle without calibration where a calibrated verdict was asked for."""


@dataclass(frozen=True)
class FrameVerdict:
    score: float
    normalized_score: float
    verdict: str  # "OK" or "NG"

    @property
    def ng(self) -> bool:
        return self.verdict == NG

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "normalized_score": self.normalized_score, "verdict": self.verdict}


@dataclass(frozen=True)
class Verdict:
    image_threshold: float  # raw image score; NG if score > image_threshold
    normalization: ScoreNormalization
    pixel_threshold: float | None = None  # raw map value; a pixel is defective if map > pixel_threshold
    source: str = "target_frr"  # which calibrated threshold decides: "target_frr" or "f1"

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any] | None, bundle_path: Any = None) -> "Verdict":
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
    def from_bundle(cls, bundle: Any) -> "Verdict":
        """From a loaded Bundle (its verified manifest's calibration slot)."""
        return cls.from_calibration(bundle.calibration, bundle.path)

    @property
    def normalized_threshold(self) -> float:
        return float(self.normalization(self.image_threshold))

    def normalize(self, scores):
        """Normalised score(s): (s - median) / (p99 - median) of the calibration normals."""
        out = self.normalization(_numpy(scores))
        return float(out) if np.ndim(out) == 0 else out

    def is_ng(self, scores):
        s = _numpy(scores)
        out = ~np.isfinite(s) | (s > self.image_threshold)
        return bool(out) if np.ndim(out) == 0 else out

    def __call__(self, score) -> FrameVerdict:
        s = float(_numpy(score))
        return FrameVerdict(s, float(self.normalization(s)), NG if self.is_ng(s) else OK)

    def batch(self, scores) -> list[FrameVerdict]:
        return [self(s) for s in np.asarray(_numpy(scores), dtype=np.float64).ravel()]

    def defect_mask(self, anomaly_map) -> np.ndarray:
        if self.pixel_threshold is None:
            raise NotCalibratedError("no pixel threshold in this calibration")
        return _numpy(anomaly_map) > self.pixel_threshold


def _numpy(x):
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def attach_verdicts(result: Any, verdict: Verdict | None) -> Any:
    """Add `verdicts` (list of "OK"/"NG", or None when uncalibrated) and `normalized_scores` (torch tensor or
    None) to a pipeline result (DiADResult/GLADResult: anything with `scores`)."""
    if verdict is None:
        result.verdicts, result.normalized_scores = None, None
        return result
    import torch

    scores = result.scores
    result.normalized_scores = torch.as_tensor(np.atleast_1d(verdict.normalize(scores)), dtype=torch.float32)
    result.verdicts = [v.verdict for v in verdict.batch(scores)]
    return result
