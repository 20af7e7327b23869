"""Thresholds and score normalisation from scores alone (no networks): the statistics of calibration.

Convention everywhere: higher score = more anomalous, and a frame (or pixel) is NG when its score is
strictly greater than the threshold (`score > threshold`).

Threshold at a target false-reject rate alpha (`frr_threshold`), the split-conformal rule: with n
held-out normal scores sorted ascending s_(1) <= ... <= s_(n), the threshold is s_(k) with
k = ceil((n + 1)(1 - alpha)). For a new normal frame exchangeable with the calibration normals
(same line, same settings), P(score > threshold) <= alpha, and equals (n + 1 - k) / (n + 1) when scores
have no ties; on the calibration normals themselves at most a fraction alpha exceed it. The rule needs
k <= n, i.e. n >= ceil(1/alpha) - 1 normals (99 for 1 %); with fewer the threshold falls back to the
largest normal score and the result says the guarantee does not hold (`guaranteed` False).

Normalisation (`ScoreNormalization`, in edgeinspect.runtime.postprocess with the verdict it feeds): normalised = (s - median) / (p99 - median) of the calibration
normals' scores (p99: the 99th percentile, linear interpolation), so a typical normal frame scores 0
and the top 1 % of normals score above 1; thresholds are stored raw and normalised.

F1-optimal threshold (`f1_optimal_threshold`): over every cut between distinct scores, the one with the
largest F1 = 2 TP / (2 TP + FP + FN) (the highest such cut on ties), placed midway between the lowest
score it flags and the next lower score, so `score > threshold` flags exactly that set.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from edgeinspect.runtime.postprocess import finite_scores

FRR_RULE = "split-conformal: threshold = k-th smallest of n normal scores, k = ceil((n+1)(1-target_frr))"


def conformal_rank(n: int, target_frr: float) -> int:
    """k = ceil((n + 1)(1 - alpha)) (1-based; may exceed n when n is too small for alpha)."""
    if not 0 < target_frr < 1:
        raise ValueError(f"target_frr must be in (0, 1), got {target_frr}")
    if n < 1:
        raise ValueError("need at least one normal score")
    # round away float noise first: (99 + 1) * 0.99 is 99.00000000000001 in binary floating point
    return max(1, math.ceil(round((n + 1) * (1.0 - target_frr), 9)))


def min_normals(target_frr: float) -> int:
    """The fewest normal scores for which the conformal rule is valid at `target_frr`."""
    n = 1
    while conformal_rank(n, target_frr) > n:
        n = max(n + 1, math.ceil(1 / target_frr) - 1)
    return n


@dataclass(frozen=True)
class FrrThreshold:
    threshold: float
    target_frr: float
    n: int
    k: int  # the threshold is the k-th smallest normal score (k = n when not guaranteed)
    achieved_frr: float  # fraction of the calibration normals with score > threshold
    expected_frr: float  # (n + 1 - k) / (n + 1): P(new normal > threshold) for tie-free scores
    guaranteed: bool  # k <= n: P(new normal > threshold) <= target_frr holds
    rule: str = FRR_RULE

    def to_json(self) -> dict:
        return asdict(self)


def frr_threshold(normal_scores, target_frr: float, strict: bool = False, warn: bool = True) -> FrrThreshold:
    """The split-conformal threshold at `target_frr` (see the module docstring). With too few normals for
    the guarantee: the largest score and a warning (none with `warn=False`, for a threshold that is only
    reported, not used; `guaranteed` still says so), or ValueError when `strict`."""
    s = np.sort(finite_scores(normal_scores, "normal scores"))
    n = s.size
    k = conformal_rank(n, target_frr)
    guaranteed = k <= n
    if not guaranteed:
        msg = (f"{n} normal scores are too few for a false-reject rate of {target_frr:g} with the conformal rule "
               f"(it needs at least {min_normals(target_frr)}); the threshold is the largest normal score and the "
               f"expected false-reject rate is about 1/(n+1) = {1 / (n + 1):.3g}")
        if strict:
            raise ValueError(msg)
        if warn:
            warnings.warn(msg, UserWarning, stacklevel=2)
        k = n
    thr = float(s[k - 1])
    return FrrThreshold(thr, float(target_frr), n, k, float(np.mean(s > thr)), (n + 1 - k) / (n + 1), guaranteed)


@dataclass(frozen=True)
class F1Threshold:
    threshold: float
    f1: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int
    n_positive: int
    n_negative: int

    def to_json(self) -> dict:
        return asdict(self)


def _below(hi: float, lo: float | None) -> float:
    """A threshold t with lo < t < hi (midway where representable), or just below hi when nothing is lower."""
    if lo is None:
        return float(np.nextafter(hi, -np.inf))
    mid = (hi + lo) / 2.0
    return float(mid) if lo < mid < hi else float(lo)


def f1_optimal_threshold(labels, scores) -> F1Threshold:
    """The threshold maximising F1 of `score > threshold` against `labels` (1/True: defective)."""
    y = np.asarray(labels).ravel().astype(bool)
    s = finite_scores(scores, "scores")
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0:
        raise ValueError("an F1-optimal threshold needs at least one defective sample")
    order = np.argsort(-s, kind="stable")
    ss, yy = s[order], y[order]
    tp = np.cumsum(yy)
    fp = np.cumsum(~yy)
    last = np.append(np.flatnonzero(ss[1:] != ss[:-1]), ss.size - 1)  # end of each tie group
    tp_c, fp_c = tp[last], fp[last]
    f1 = 2.0 * tp_c / (tp_c + fp_c + n_pos)
    j = int(np.argmax(f1))  # first maximum: the highest cut among equal F1
    hi = float(ss[last[j]])
    lo = float(ss[last[j] + 1]) if last[j] + 1 < ss.size else None
    t, f = int(tp_c[j]), int(fp_c[j])
    return F1Threshold(_below(hi, lo), float(f1[j]), t / (t + f), t / n_pos, t, f, n_pos - t, n_pos, n_neg)


def f1_at(labels, scores, threshold: float) -> float:
    """F1 of `score > threshold` (0 when nothing is flagged and nothing is defective counts as 0)."""
    y = np.asarray(labels).ravel().astype(bool)
    pred = np.asarray(scores, dtype=np.float64).ravel() > threshold
    tp = int((pred & y).sum())
    denom = int(pred.sum()) + int(y.sum())
    return 2.0 * tp / denom if denom else 0.0


def subsample(x: np.ndarray, max_items: int) -> np.ndarray:
    """Every k-th item of a flat array so at most `max_items` remain (deterministic)."""
    x = np.asarray(x).ravel()
    if x.size <= max_items:
        return x
    return x[:: math.ceil(x.size / max_items)]
