"""The OK/NG decision of the daemon: where the image threshold comes from, in one place.

A calibrated bundle decides (its manifest's calibration slot read by the one post-processor,
`edgeinspect.runtime.postprocess.PostProcessor`: image threshold and score normalisation); else the
daemon config's `--threshold`; else there is no verdict (the reply still carries the score). A
calibration record of an older ad-hoc form (a bare `image_threshold` number) is still read for its
threshold, without normalisation. `judge_for` is the only function that knows this; the OK/NG rule
itself is the post-processor's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgeinspect.runtime.postprocess import NotCalibratedError, PostProcessor


@dataclass(frozen=True)
class Judge:
    post: PostProcessor | None  # None: no threshold, no verdict
    source: str | None  # where the threshold comes from: "calibration", "config" or None

    @property
    def threshold(self) -> float | None:
        return None if self.post is None else self.post.image_threshold

    def __call__(self, score: float) -> tuple[str | None, float | None]:
        """(verdict "OK"/"NG" or None, normalised score or None) of an image score."""
        if self.post is None:
            return None, None
        v = self.post(score)
        return v.verdict, v.normalized_score


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
            return Judge(PostProcessor.from_calibration(calibration), "calibration")
        except NotCalibratedError:
            thr = _legacy_threshold(calibration)
            if thr is not None:
                return Judge(PostProcessor(thr, source="given"), "calibration")
    if config_threshold is not None:
        return Judge(PostProcessor(float(config_threshold), source="given"), "config")
    return Judge(None, None)
