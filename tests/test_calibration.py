"""Calibration: conformal thresholds hit the target false-reject rate on held-out normals (synthetic score
distributions with known quantiles, and a tiny real bundle), F1-optimal thresholds, normalisation, the
PostProcessor helper, storage in the bundle (hash-verified, tampering refused) and the calibrate verb.

Measured on the tiny DiAD bundle (random weights; 200 normal frames made from data/mtd_sample train/good
by crops, turns and flips, split at random 100/100): at a target FRR of 0.05 the threshold is the 96th of
the 100 calibration scores (expected FRR on new normals 5/101), FRR 0.04 on the calibration normals and
0.02 on the 100 held-out ones (bound: 0.05 + 3 binomial standard deviations = 0.115). The pixel threshold
(rule map_max) flags 0.017 % of normal pixels and 4 % of the normal frames.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy import stats

from edgeinspect.runtime.postprocess import ScoreNormalization
from edgeinspect.calibration.thresholds import conformal_rank, f1_at, f1_optimal_threshold, frr_threshold, min_normals
from edgeinspect.runtime.postprocess import NG, OK, NotCalibratedError, PostProcessor
from edgeinspect.runtime.bundle_loading import MANIFEST, BundleError, load_bundle
from edgeinspect.runtime.detector import bundle_pipeline

try:
    from tests.test_export import tiny_bundle
except ImportError:
    from test_export import tiny_bundle

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "mtd_sample"




# --------------------------------------------------------------------------- statistics


def test_conformal_rank_and_minimum_normals():
    assert conformal_rank(99, 0.01) == 99  # (99+1) * 0.99 = 99 exactly (no float round-up to 100)
    assert conformal_rank(999, 0.01) == 990 and conformal_rank(19, 0.05) == 19 and conformal_rank(18, 0.05) == 19
    assert min_normals(0.01) == 99 and min_normals(0.05) == 19 and min_normals(0.3) == 3
    with pytest.raises(ValueError, match="target_frr"):
        conformal_rank(10, 0.0)


@pytest.mark.parametrize("dist,n,alpha", [
    (stats.norm(), 999, 0.01),
    (stats.lognorm(0.8), 199, 0.05),
    (stats.expon(scale=0.3), 99, 0.01),  # the smallest n the rule allows at 1 %
])
def test_threshold_hits_the_target_frr_on_held_out_normals(dist, n, alpha):
    """Over many calibrations the false-reject rate on new normals (exact, from the known CDF) averages
    (n+1-k)/(n+1) <= alpha, and a large held-out sample agrees; never above target on the calibration set."""
    rng = np.random.default_rng(0)
    reps = 400
    k = conformal_rank(n, alpha)
    expected = (n + 1 - k) / (n + 1)
    assert expected <= alpha
    frr_new, achieved, thresholds = [], [], []
    for _ in range(reps):
        t = frr_threshold(dist.rvs(n, random_state=rng), alpha)
        assert t.guaranteed and t.k == k and t.expected_frr == pytest.approx(expected)
        frr_new.append(dist.sf(t.threshold))
        achieved.append(t.achieved_frr)
        thresholds.append(t.threshold)
    # 1 - F(s_(k)) ~ Beta(n+1-k, k): mean `expected`; tolerance 5 standard errors of the mean
    a, b = n + 1 - k, k
    se = np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)) / reps)
    assert abs(np.mean(frr_new) - expected) < 5 * se
    assert max(achieved) <= alpha
    # the threshold sits around the known quantile of the distribution
    assert np.median(thresholds) == pytest.approx(dist.ppf(1 - expected), rel=0.1)
    # one calibration checked on 200 000 held-out normals
    held_out = dist.rvs(200_000, random_state=rng)
    t = frr_threshold(dist.rvs(n, random_state=rng), alpha)
    assert np.mean(held_out > t.threshold) == pytest.approx(dist.sf(t.threshold), abs=0.002)


def test_threshold_with_ties_still_bounds_the_frr():
    rng = np.random.default_rng(1)
    dist = stats.poisson(4)
    frr = [dist.sf(frr_threshold(dist.rvs(199, random_state=rng), 0.05).threshold) for _ in range(300)]
    assert np.mean(frr) <= 0.05  # ties only make exceeding the threshold rarer


def test_too_few_normals_fall_back_to_the_maximum_and_say_so():
    s = np.arange(50, dtype=float)
    with pytest.warns(UserWarning, match="too few.*at least 99"):
        t = frr_threshold(s, 0.01)
    assert not t.guaranteed and t.threshold == 49.0 and t.achieved_frr == 0.0
    with pytest.raises(ValueError, match="too few"):
        frr_threshold(s, 0.01, strict=True)
    with pytest.raises(ValueError, match="NaN"):
        frr_threshold([0.1, np.nan], 0.5)


def test_few_normals_warn_only_when_the_frr_threshold_decides():
    from edgeinspect.calibration.calibrate import fit_calibration

    rng = np.random.default_rng(3)
    normals, defects = rng.normal(0, 1, 8), rng.normal(4, 1, 12)  # 8 normals: too few for 1 %
    maps = rng.random((20, 8, 8)).astype(np.float32)
    masks = np.zeros((20, 8, 8), bool)
    masks[8:, 2:4, 2:4] = True
    labelled = dict(labels=np.r_[np.zeros(8), np.ones(12)], scores=np.r_[normals, defects], masks=masks, maps=maps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the F1 thresholds decide: no warning about the FRR ones
        cal = fit_calibration(normals, maps[:8], 0.01, verdict_from="f1", **labelled)
    assert not cal["image"]["guaranteed"] and not cal["pixel"]["guaranteed"]  # still recorded
    assert cal["verdict"]["image_threshold"] == cal["image_f1"]["threshold"]
    with pytest.warns(UserWarning, match="8 normal scores are too few") as caught:
        fit_calibration(normals, maps[:8], 0.01, verdict_from="target_frr", **labelled)
    assert len(caught) == 2  # the image and the pixel threshold


def test_f1_optimal_threshold_on_known_inputs():
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.2, 0.8, 0.9, 0.85, 0.3]
    r = f1_optimal_threshold(labels, scores)
    # flagging >= 0.3 gives TP 3, FP 1: F1 = 6/7, the best cut; the threshold sits between 0.2 and 0.3
    assert r.threshold == pytest.approx(0.25) and r.f1 == pytest.approx(6 / 7)
    assert (r.tp, r.fp, r.fn, r.precision, r.recall) == (3, 1, 0, 0.75, 1.0)
    assert f1_at(labels, scores, r.threshold) == pytest.approx(r.f1)
    # perfectly separated: the threshold separates them
    r = f1_optimal_threshold([0, 0, 1, 1], [1.0, 2.0, 3.0, 4.0])
    assert 2.0 < r.threshold < 3.0 and r.f1 == 1.0
    # every score tied: flagging all is the only useful cut; the threshold sits just below the score
    r = f1_optimal_threshold([0, 1, 1], [0.5, 0.5, 0.5])
    assert r.threshold < 0.5 and r.f1 == pytest.approx(0.8) and f1_at([0, 1, 1], [0.5] * 3, r.threshold) == r.f1
    with pytest.raises(ValueError, match="at least one defective"):
        f1_optimal_threshold([0, 0], [0.1, 0.2])


def test_f1_optimal_threshold_matches_brute_force_and_f1max():
    from edgeinspect.evaluation.metrics import f1_max

    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.random(300) < 0.3
        s = np.round(rng.normal(y * 1.0, 1.0), 1)  # rounding: many ties
        r = f1_optimal_threshold(y, s)
        brute = max(f1_at(y, s, t) for t in np.concatenate([np.unique(s), [s.min() - 1]]))
        assert r.f1 == pytest.approx(brute) and f1_at(y, s, r.threshold) == pytest.approx(r.f1)
        assert r.f1 == pytest.approx(f1_max(y, s))


def test_normalization():
    s = np.random.default_rng(0).gamma(2.0, 1.0, 5000)
    n = ScoreNormalization.fit(s)
    assert n(np.median(s)) == pytest.approx(0.0) and n(np.percentile(s, 99)) == pytest.approx(1.0)
    assert ScoreNormalization.from_json(n.to_json()) == n
    flat = ScoreNormalization.fit(np.ones(10))
    assert flat.scale == 1.0 and flat.to_json()["degenerate"]


# --------------------------------------------------------------------------- verdict


def test_verdict_helper():
    cal = {"normalization": {"kind": "median_p99", "median": 1.0, "p99": 3.0},
           "verdict": {"image_threshold": 2.5, "pixel_threshold": 0.7, "source": "target_frr"}}
    v = PostProcessor.from_calibration(cal)
    assert v(2.5).verdict == OK and v(2.5000001).verdict == NG  # NG strictly above the threshold
    f = v(4.0)
    assert f.ng and f.normalized_score == pytest.approx(1.5) and f.to_json()["verdict"] == NG
    assert v.normalize(torch.tensor([1.0, 3.0])).tolist() == [0.0, 1.0]
    assert v.normalized_threshold == pytest.approx(0.75)
    assert [x.verdict for x in v.batch(torch.tensor([0.0, 9.0]))] == [OK, NG]
    assert v.is_ng(np.array([2.0, 3.0])).tolist() == [False, True]
    assert v(float("nan")).verdict == NG and v(float("-inf")).verdict == NG  # a broken frame is not passed
    assert v.defect_mask(np.array([[0.1, 0.8]])).tolist() == [[False, True]]
    with pytest.raises(NotCalibratedError, match="edgeinspect calibrate"):
        PostProcessor.from_calibration(None)
    with pytest.raises(NotCalibratedError, match="incomplete"):
        PostProcessor.from_calibration({"image_threshold": 0.9})


# --------------------------------------------------------------------------- a tiny real bundle


def _write_variants(dst: Path, n: int, seed: int = 0) -> list[Path]:
    """n normal frames made from data/mtd_sample train/good: flips, 90-degree turns and random crops."""
    rng = np.random.default_rng(seed)
    src = sorted((SAMPLE / "train" / "good").glob("*.jpg"))
    dst.mkdir(parents=True)
    out = []
    for i in range(n):
        img = cv2.imread(str(src[i % len(src)]), cv2.IMREAD_GRAYSCALE)
        h, w = img.shape
        c = int(min(h, w) * rng.uniform(0.75, 1.0))
        y, x = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
        img = np.rot90(img[y:y + c, x:x + c], int(rng.integers(4)))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = cv2.resize(np.ascontiguousarray(img), (64, 64), interpolation=cv2.INTER_AREA)
        p = dst / f"n{i:04d}.png"
        cv2.imwrite(str(p), img)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def normals(tmp_path_factory) -> tuple[Path, list[Path]]:
    """200 normal frames: the first 100 (random order) in a calibration folder, the rest held out."""
    root = tmp_path_factory.mktemp("normals")
    paths = _write_variants(root / "all", 200)
    order = np.random.default_rng(1).permutation(len(paths))
    cal = root / "cal"
    cal.mkdir()
    for i in order[:100]:
        shutil.copy(paths[i], cal / paths[i].name)
    return cal, [paths[i] for i in order[100:]]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, normals) -> tuple[Path, dict]:
    from edgeinspect.calibration.calibrate import calibrate_bundle

    dst = tmp_path_factory.mktemp("cal") / "bundle"
    shutil.copytree(tiny_bundle()[1], dst)
    cal = calibrate_bundle(dst, normals[0], SAMPLE, target_frr=0.05, threads=1)
    return dst, cal


def test_calibration_hits_the_target_on_held_out_normals_through_the_bundle(calibrated, normals):
    from edgeinspect.calibration.calibrate import load_frames

    bundle_dir, cal = calibrated
    img = cal["image"]
    assert img["n"] == 100 and img["guaranteed"] and img["k"] == conformal_rank(100, 0.05) == 96
    assert img["achieved_frr"] <= 0.05 and img["expected_frr"] == pytest.approx(5 / 101)
    pipe = bundle_pipeline(bundle_dir, intra_op_threads=1)
    held = pipe(load_frames(normals[1], 64))
    frr = float(np.mean(np.array(held.verdicts) == NG))
    # 100 held-out frames: the FRR is 0.05 on average; 3 binomial standard deviations above that
    assert frr <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 100), frr
    assert held.verdicts == [NG if s > img["threshold"] else OK for s in held.scores.tolist()]
    torch.testing.assert_close(held.normalized_scores.double(),
                               (held.scores.double() - cal["normalization"]["median"]) / cal["normalization"]["scale"])
    # the stored threshold is the conformal order statistic of the stored normal scores
    stored = json.loads((bundle_dir / "calibration" / "scores.json").read_text())
    s = np.array([r["score"] for r in stored["normals"]])
    assert len(s) == 100 and img["threshold"] == np.sort(s)[95]
    ref = bundle_pipeline(bundle_dir, intra_op_threads=1)(load_frames(sorted(normals[0].glob("*.png"))[:4], 64))
    np.testing.assert_allclose(ref.scores.numpy(), s[:4], rtol=0, atol=1e-6)  # same pipeline, same scores
    px = cal["pixel"]
    assert px["frames_with_pixels_over"] <= 0.05 and 0 < px["pixel_fpr"] <= px["frames_with_pixels_over"]


def test_f1_thresholds_from_labelled_defects(calibrated):
    bundle_dir, cal = calibrated
    stored = json.loads((bundle_dir / "calibration" / "scores.json").read_text())
    lab = stored["labelled"]
    assert len(lab) == 20 and sum(r["label"] for r in lab) == 12  # mtd_sample test: 8 good, 12 defective
    labels = np.array([0] * 100 + [r["label"] for r in lab])
    scores = np.array([r["score"] for r in stored["normals"]] + [r["score"] for r in lab])
    ref = f1_optimal_threshold(labels, scores)
    f = cal["image_f1"]
    assert f["threshold"] == pytest.approx(ref.threshold) and f["f1"] == pytest.approx(ref.f1)
    assert f["n_images"] == 120 and f["achieved_frr"] == pytest.approx(np.mean(scores[:100] > ref.threshold))
    assert cal["image"]["f1_on_labelled"] == pytest.approx(f1_at(labels, scores, cal["image"]["threshold"]))
    pf = cal["pixel_f1"]
    assert 0 < pf["f1"] <= 1 and pf["n_images"] == 120 and pf["tp"] + pf["fn"] == pf["n_positive"] > 0
    assert cal["data"]["labelled"] == {"source": str(SAMPLE), "n": 20, "n_defective": 12, "n_with_masks": 12}
    v = cal["verdict"]
    assert v["source"] == "target_frr" and v["image_threshold"] == cal["image"]["threshold"]
    assert v["pixel_threshold"] == cal["pixel"]["threshold"]


def test_calibration_is_stored_and_hash_verified(calibrated):
    from edgeinspect.runtime.bundle_loading import sha256_file

    bundle_dir, cal = calibrated
    b = load_bundle(bundle_dir)
    assert b.calibration == json.loads(json.dumps(cal))
    assert b.manifest["files"]["calibration/scores.json"] == sha256_file(bundle_dir / "calibration" / "scores.json")
    assert b.calibration["settings"]["settings_sha256"] == sha256_file(bundle_dir / "settings.json")
    v = PostProcessor.from_bundle(b)
    assert v.image_threshold == cal["image"]["threshold"]
    assert cal["data"]["normals"]["n"] == 100 and cal["target_frr"] == 0.05


def test_pipeline_warns_when_it_scores_otherwise_than_calibrated(calibrated):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bundle_pipeline(calibrated[0], intra_op_threads=1)  # as calibrated: no warning
    with pytest.warns(UserWarning, match=r"precision fp16 \(calibrated with fp32\)"):
        bundle_pipeline(calibrated[0], precision="fp16", intra_op_threads=1)
    with pytest.warns(UserWarning, match="other inference settings"):
        p = bundle_pipeline(calibrated[0], overrides={"inference": {"steps": 1}}, intra_op_threads=1)
    assert p.verdict is not None
    assert bundle_pipeline(calibrated[0], verdict=False, intra_op_threads=1).verdict is None


def test_tampering_after_calibration_is_refused(calibrated, tmp_path):
    from edgeinspect.runtime.bundle_update import set_calibration

    src = calibrated[0]
    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    m = json.loads((edited / MANIFEST).read_text())
    m["calibration"]["verdict"]["image_threshold"] = 1e9  # accept everything
    (edited / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest.json was modified after export"):
        load_bundle(edited)
    with pytest.raises(BundleError, match="modified after export"):
        bundle_pipeline(edited)
    scores = tmp_path / "scores"
    shutil.copytree(src, scores)
    (scores / "calibration" / "scores.json").write_text("[]")
    with pytest.raises(BundleError, match=r"calibration/scores\.json does not match its sha256"):
        load_bundle(scores)
    with pytest.raises(BundleError, match="scores.json"):  # never re-signs a tampered bundle
        set_calibration(scores, {"verdict": {}})


def test_generated_defects_from_a_json_index(tmp_path):
    from edgeinspect.calibration.calibrate import calibrate_bundle
    from edgeinspect.calibration.data import index_labelled

    defects = sorted(p for p in (SAMPLE / "test").rglob("*.jpg") if p.parent.name != "good")[:6]
    gen = tmp_path / "gen"
    gen.mkdir()
    items = []
    for i, p in enumerate(defects):
        shutil.copy(p, gen / f"g{i}.jpg")
        mask = SAMPLE / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
        shutil.copy(mask, gen / f"g{i}_mask.png")
        items.append({"image": f"gen/g{i}.jpg", "mask": f"gen/g{i}_mask.png" if i % 2 == 0 else None})
    (tmp_path / "index.json").write_text(json.dumps(items))
    got = index_labelled(tmp_path / "index.json")
    assert len(got) == 6 and all(x.label == 1 for x in got) and sum(x.mask is not None for x in got) == 3
    normals = _write_variants(tmp_path / "normals", 20, seed=5)
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle()[1], dst)
    cal = calibrate_bundle(dst, tmp_path / "normals", tmp_path / "index.json", target_frr=0.05, threads=1,
                           verdict_from="f1", pixel_rule="pixels")
    assert cal["data"]["labelled"]["n_with_masks"] == 3 and cal["image_f1"]["n_positive"] == 6
    assert cal["pixel_f1"]["n_images"] == 20 + 3  # normals and the masked defects
    assert cal["verdict"]["source"] == "f1" and cal["verdict"]["image_threshold"] == cal["image_f1"]["threshold"]
    assert cal["verdict"]["pixel_threshold"] == cal["pixel_f1"]["threshold"]
    assert cal["pixel"]["rule"].startswith("pixels") and not cal["pixel"]["guaranteed"]
    assert len(normals) == cal["image"]["n"] == 20
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "gen/missing.png"}]))
    from edgeinspect.data.mvtec import DatasetError

    with pytest.raises(DatasetError, match="no such file"):
        index_labelled(tmp_path / "bad.json")


def test_calibrate_verb(tmp_path, normals, capsys):
    import argparse

    from edgeinspect.calibration.cli import add_calibrate_parser

    ap = argparse.ArgumentParser(prog="edgeinspect")
    add_calibrate_parser(ap.add_subparsers(dest="verb", required=True))
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle()[1], dst)
    args = ap.parse_args(["calibrate", "--bundle", str(dst), "--normals", str(normals[0]), "--target-frr", "0.01",
                          "--threads", "1", "--quiet", "--limit", "40"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "calibrated on 40 normal images" in out and "NG if score >" in out
    assert "too few normals for the guarantee" in out and "at least 99" in err  # 40 < 99 at 1 %
    cal = load_bundle(dst).calibration
    assert cal["image"]["n"] == 40 and not cal["image"]["guaranteed"] and "pixel_f1" not in cal
    args = ap.parse_args(["calibrate", "--bundle", str(dst), "--normals", str(tmp_path / "nowhere"), "--quiet"])
    assert args.func(args) == 2
    assert "no such image folder" in capsys.readouterr().err
    args = ap.parse_args(["calibrate", "--bundle", str(dst), "--normals", str(normals[0]), "--verdict", "f1",
                          "--quiet", "--limit", "20", "--threads", "1", "--dry-run"])
    assert args.func(args) == 2
    assert "needs labelled defects" in capsys.readouterr().err
