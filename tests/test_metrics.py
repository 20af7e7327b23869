import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from edgeinspect.evaluation.metrics import auroc, average_precision, evaluate, f1_max, pro_score

TOL = 1e-9


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def sk_f1max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(f1.max())


def random_case(seed, n, pos_rate, decimals=None, dtype=np.float64):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < pos_rate
    y[0], y[1] = True, False  # guarantee both classes
    s = rng.normal(size=n) + 1.2 * y
    if decimals is not None:
        s = np.round(s, decimals)  # heavy ties
    return y, s.astype(dtype)


def reference_pro(masks, maps, fpr_limit=0.3, thresholds=None):
    """Slow, literal PRO: loop over thresholds, images and regions."""
    masks = np.asarray(masks).astype(bool)
    if thresholds is None:
        thresholds = np.unique(maps)
    thresholds = np.sort(np.asarray(thresholds))[::-1]  # descending -> FPR grows
    regions = []  # list of (image index, boolean region mask)
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))  # 8-connectivity
        for r in range(1, n + 1):
            regions.append((i, lab == r))
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in thresholds:
        above = maps >= t
        overlaps = [above[i][reg].sum() / reg.sum() for i, reg in regions]
        xs.append(above[normal].sum() / normal.sum())
        ys.append(sum(overlaps) / len(overlaps))
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_masks_maps(seed, n=4, h=16, w=16, decimals=None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n - 1):  # last image stays defect-free
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(0, h - 3), rng.integers(0, w - 3)
            hh, ww = rng.integers(1, 5, size=2)
            masks[i, y0:y0 + hh, x0:x0 + ww] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks * rng.random(masks.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps


# --------------------------------------------------------------------------- #
# AUROC / AP / F1max vs scikit-learn
# --------------------------------------------------------------------------- #
CASES = [
    dict(seed=0, n=50, pos_rate=0.5),
    dict(seed=1, n=1000, pos_rate=0.1),
    dict(seed=2, n=1000, pos_rate=0.9),
    dict(seed=3, n=500, pos_rate=0.3, decimals=1),  # heavy ties
    dict(seed=4, n=2000, pos_rate=0.05, decimals=0),  # very heavy ties
    dict(seed=5, n=300, pos_rate=0.5, dtype=np.float32),
    dict(seed=6, n=5, pos_rate=0.5),
]


@pytest.mark.parametrize("case", CASES)
def test_against_sklearn(case):
    y, s = random_case(**case)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert f1_max(y, s) == pytest.approx(sk_f1max(y, s), abs=TOL)


def test_against_sklearn_integer_scores_and_int_labels():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, size=400)
    s = rng.integers(0, 5, size=400) + y  # only 6 distinct values
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert f1_max(y, s) == pytest.approx(sk_f1max(y, s), abs=TOL)


def test_all_scores_tied():
    y = np.array([0, 1, 0, 1, 1])
    s = np.full(5, 0.3)
    assert auroc(y, s) == pytest.approx(0.5)
    assert average_precision(y, s) == pytest.approx(0.6)  # precision = prevalence
    assert f1_max(y, s) == pytest.approx(2 * 0.6 / 1.6)  # P=0.6, R=1


def test_infinite_scores_are_ties():
    y = np.array([0, 1, 1, 0])
    s = np.array([np.inf, np.inf, 1.0, 0.0])
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, [10.0, 10.0, 1.0, 0.0]), abs=TOL)


# --------------------------------------------------------------------------- #
# hand-computed cases
# --------------------------------------------------------------------------- #
def test_perfect_and_inverted():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert auroc(y, s) == 1.0
    assert average_precision(y, s) == 1.0
    assert f1_max(y, s) == 1.0
    assert auroc(y, -s) == 0.0


def test_four_samples_by_hand():
    # Sorted by score (desc): 0.8(+) 0.4(-) 0.35(+) 0.1(-); 2 positives.
    # AUROC: pos 0.8 beats both negatives, pos 0.35 beats only 0.1 -> 3/4.
    # PR points (P, R): t=0.8 (1, .5), t=0.4 (.5, .5), t=0.35 (2/3, 1), t=0.1 (.5, 1)
    # AP = .5*1 + 0*.5 + .5*2/3 + 0*.5 = 5/6.
    # F1 = 2PR/(P+R): 2/3, 1/2, 4/5, 2/3 -> max 4/5.
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc(y, s) == pytest.approx(0.75, abs=TOL)
    assert average_precision(y, s) == pytest.approx(5 / 6, abs=TOL)
    assert f1_max(y, s) == pytest.approx(0.8, abs=TOL)


def test_four_samples_with_tie_by_hand():
    # Negatives 0.5, 0.5; positives 0.5, 0.9. Pos 0.9 beats both (2),
    # pos 0.5 ties both (2 * 1/2) -> AUROC 3/4.
    # PR: t=0.9 (1, .5); t=0.5 (.5, 1) -> AP = .5*1 + .5*.5 = 3/4; F1max = max(2/3, 2/3).
    y = np.array([0, 1, 0, 1])
    s = np.array([0.5, 0.5, 0.5, 0.9])
    assert auroc(y, s) == pytest.approx(0.75, abs=TOL)
    assert average_precision(y, s) == pytest.approx(0.75, abs=TOL)
    assert f1_max(y, s) == pytest.approx(2 / 3, abs=TOL)


# --------------------------------------------------------------------------- #
# PRO: analytic cases
# --------------------------------------------------------------------------- #
def _two_region_masks():
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, 1:3, 1:3] = True  # region A: 4 px
    masks[1, 2:8, 2:8] = True  # region B: 36 px
    return masks  # image 2 is defect-free


def test_pro_map_equals_mask_is_one():
    masks = _two_region_masks()
    assert pro_score(masks, masks.astype(float)) == pytest.approx(1.0, abs=TOL)
    assert pro_score(masks, masks.astype(float), num_thresholds=50) == pytest.approx(1.0, abs=TOL)


def test_pro_constant_map():
    # One threshold: curve (0,0) -> (1,1), i.e. PRO = FPR; area to 0.3 is
    # 0.3^2/2, normalised -> 0.15 (fpr_limit / 2 in general).
    masks = _two_region_masks()
    maps = np.full(masks.shape, 0.7)
    assert pro_score(masks, maps) == pytest.approx(0.15, abs=TOL)
    assert pro_score(masks, maps, fpr_limit=0.1) == pytest.approx(0.05, abs=TOL)


def test_pro_one_region_detected_one_missed():
    # Small region A scores 1, big region B scores 0, normal pixels 0.5.
    # t=1: FPR 0, PRO 1/2 (mean over regions, not pixel-weighted, which would be 4/40);
    # t=.5: FPR 1, PRO 1/2. So PRO = 0.5 over [0, 0.3] -> 0.5.
    masks = _two_region_masks()
    maps = np.full(masks.shape, 0.5)
    maps[0][masks[0]] = 1.0
    maps[1][masks[1]] = 0.0
    assert pro_score(masks, maps) == pytest.approx(0.5, abs=TOL)
    # Swap: big region detected, small missed -> still 0.5.
    maps[0][masks[0]] = 0.0
    maps[1][masks[1]] = 1.0
    assert pro_score(masks, maps) == pytest.approx(0.5, abs=TOL)
    assert pro_score(masks, maps, num_thresholds=3) == pytest.approx(0.5, abs=TOL)


def test_pro_uses_8_connectivity():
    # A 3-px L-shape plus a diagonal neighbour: one 4-px region under
    # 8-connectivity (two regions under 4-connectivity). Detect the L only:
    # PRO at the top threshold = 3/4 (it would be 1/2 with 4-connectivity).
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = masks[0, 1, 2] = masks[0, 2, 1] = True
    masks[0, 0, 3] = True  # diagonal to (1, 2)
    maps = np.full(masks.shape, 0.5)
    maps[0, 1, 1] = maps[0, 1, 2] = maps[0, 2, 1] = 1.0
    maps[0, 0, 3] = 0.0
    assert pro_score(masks, maps) == pytest.approx(0.75, abs=TOL)


def test_pro_regions_do_not_connect_across_images():
    # The same pixel is anomalous in two images: two regions, not one.
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, 1, 1] = masks[1, 1, 1] = True
    maps = np.zeros(masks.shape)
    maps[0, 1, 1] = 1.0  # detect only the first -> PRO 1/2 until FPR 1
    maps[1, 1, 1] = -1.0
    assert pro_score(masks, maps) == pytest.approx(0.5, abs=TOL)


def test_pro_interpolates_at_limit():
    # 10 normal pixels scoring 0.9..0.0, one region scoring 0.95 -> PRO = 1 once
    # anything is flagged; curve (0,0)->(0,1)->(0.1,1)->... ; area = 0.3 exactly.
    # With fpr_limit=0.25 (between FPR 0.2 and 0.3) the answer is still 1.
    masks = np.zeros((1, 1, 11), dtype=bool)
    masks[0, 0, 10] = True
    maps = np.concatenate([np.linspace(0.9, 0.0, 10), [0.95]])[None, None]
    assert pro_score(masks, maps, fpr_limit=0.25) == pytest.approx(1.0, abs=TOL)
    # Now the region sits between normal scores 0.8 and 0.7 (FPR 0.2 at its threshold):
    # curve (0,0),(0.1,0),(0.2,0),(0.2,1),(0.3,1)... -> area over [0,0.25] = 0.05.
    maps[0, 0, 10] = 0.75
    assert pro_score(masks, maps, fpr_limit=0.25) == pytest.approx(0.05 / 0.25, abs=TOL)
    # Limit falls inside a segment: region tied with normal pixel 0.7 (FPR .2 -> .3,
    # PRO 0 -> 1). At FPR .25 PRO is .5: area = .05 * .5 / 2 -> /.25 = 0.05.
    maps[0, 0, 10] = maps[0, 0, 2]
    assert pro_score(masks, maps, fpr_limit=0.25) == pytest.approx(0.0125 / 0.25, abs=TOL)


# --------------------------------------------------------------------------- #
# PRO vs slow reference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (2, None)])
def test_pro_against_reference_exact(seed, decimals):
    masks, maps = random_masks_maps(seed, decimals=decimals)
    assert pro_score(masks, maps) == pytest.approx(reference_pro(masks, maps), abs=1e-9)
    assert pro_score(masks, maps, fpr_limit=0.1) == pytest.approx(
        reference_pro(masks, maps, fpr_limit=0.1), abs=1e-9
    )


@pytest.mark.parametrize("seed", [0, 3])
def test_pro_binned_against_reference(seed):
    masks, maps = random_masks_maps(seed)
    k = 200
    thr = np.linspace(maps.min(), maps.max(), k)
    # Same thresholds -> identical result; vs. all thresholds -> discretisation error
    # (FPR steps of ~1/200 of the score range; bounded loosely here).
    assert pro_score(masks, maps, num_thresholds=k) == pytest.approx(
        reference_pro(masks, maps, thresholds=thr), abs=1e-9
    )
    assert pro_score(masks, maps, num_thresholds=k) == pytest.approx(
        reference_pro(masks, maps), abs=0.02
    )


# --------------------------------------------------------------------------- #
# evaluate
# --------------------------------------------------------------------------- #
def test_evaluate_matches_individual_metrics():
    masks, maps = random_masks_maps(5, n=6, decimals=2)
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    out = evaluate(labels, scores, masks, maps)
    assert set(out) == {
        "image_auroc", "image_ap", "image_f1max",
        "pixel_auroc", "pixel_ap", "pixel_f1max", "pro",
    }
    assert all(type(v) is float for v in out.values())
    y, s = masks.ravel(), maps.ravel()
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=TOL)
    assert out["image_f1max"] == pytest.approx(sk_f1max(labels, scores), abs=TOL)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert out["pixel_f1max"] == pytest.approx(sk_f1max(y, s), abs=TOL)
    assert out["pro"] == pytest.approx(reference_pro(masks, maps), abs=1e-9)


def test_evaluate_accepts_uint8_masks_and_float32_maps():
    masks, maps = random_masks_maps(6)
    labels = masks.any(axis=(1, 2)).astype(int)
    out = evaluate(labels, maps.max(axis=(1, 2)), masks.astype(np.uint8), maps.astype(np.float32))
    ref = pro_score(masks, maps.astype(np.float32))
    assert out["pro"] == pytest.approx(ref, abs=TOL)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.astype(np.float32).ravel()), abs=TOL)


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("fn", [auroc, average_precision, f1_max])
def test_binary_metric_errors(fn):
    with pytest.raises(ValueError, match="shape"):
        fn([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        fn([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match=f"{fn.__name__}.*single class"):
        fn([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="single class"):
        fn([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        fn([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


def test_pro_errors():
    masks = _two_region_masks()
    maps = np.random.default_rng(0).random(masks.shape)
    with pytest.raises(ValueError, match="shape"):
        pro_score(masks, maps[:, :5])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pro_score(masks[0], maps[0])
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pro_score(masks, bad)
    with pytest.raises(ValueError, match="no anomalous pixel"):
        pro_score(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        pro_score(np.ones_like(masks), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_score(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        pro_score(masks, maps, num_thresholds=1)


def test_evaluate_errors():
    masks = _two_region_masks()
    maps = np.random.default_rng(0).random(masks.shape)
    labels = np.array([1, 1, 0])
    scores = np.array([0.9, 0.8, 0.1])
    with pytest.raises(ValueError, match="image_labels"):
        evaluate(labels[:2], scores[:2], masks, maps)
    with pytest.raises(ValueError, match="image_scores"):
        evaluate(labels, scores[:2], masks, maps)
    with pytest.raises(ValueError, match="image_auroc.*single class"):
        evaluate(np.ones(3), scores, masks, maps)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(labels, np.array([0.9, np.nan, 0.1]), masks, maps)
    with pytest.raises(ValueError, match="pixel_auroc.*no anomalous pixel"):
        evaluate(labels, scores, np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="shape"):
        evaluate(labels, scores, masks, maps[:, :, :4])
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="maps contain NaN"):
        evaluate(labels, scores, masks, bad)
