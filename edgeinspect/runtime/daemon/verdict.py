"""The OK/NG decision of the daemon: where the image threshold comes from, in one place.

A calibrated bundle decides (`edgeinspect.calibration.verdict.Verdict` reads the manifest's calibration
slot: image threshold and score normalisation); else the daemon config's `--threshold`; else there is
no verdict (the reply still carries the score). A calibration record of an older ad-hoc form (a bare
`image_threshold` number) is still read for its threshold, without normalisation. `judge_for` is the
only function that knows this.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Judge:
    threshold: float | None
    source: str | None  # "calibration", "config" or None
    normalize: Callable[[float], float] | None = None

    def __call__(self, score: float) -> tuple[str | None, float | None]:
        """(verdict "OK"/"NG" or None, normalised score or None) of an image score: NG when score > threshold
        (a non-finite score is NG when there is a threshold: a broken frame is not passed)."""
        if self.threshold is None:
            return None, None
        if not math.isfinite(score):
            return "NG", None
        norm = float(self.normalize(score)) if self.normalize is not None else None
        return ("NG" if score > self.threshold else "OK"), norm


def _legacy_threshold(calibration: dict[str, Any]) -> float | None:
    image = calibration.get("image")
    for value in (calibration.get("image_threshold"), image.get("threshold") if isinstance(image, dict) else None,
                  calibration.get("threshold")):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def judge_for(calibration: dict[str, Any] | None, config_threshold: float | None) -> Judge:
    """The bundle's calibrated threshold wins over the configured one (a bundle is calibrated for its model)."""
    if isinstance(calibration, dict) and calibration:
        try:
            from edgeinspect.calibration.verdict import NotCalibratedError, Verdict
        except ImportError:  # a build without the calibration package
            Verdict = None  # noqa: N806
        if Verdict is not None:
            try:
                v = Verdict.from_calibration(calibration)
            except NotCalibratedError:
                v = None
            if v is not None:
                return Judge(float(v.image_threshold), "calibration", v.normalize)
        thr = _legacy_threshold(calibration)
        if thr is not None:
            return Judge(thr, "calibration")
    if config_threshold is not None:
        return Judge(float(config_threshold), "config")
    return Judge(None, None)
