"""benchmarks/adp_mtd.py: firing simulated from recorded check scores, and the report end to end on a tiny
GLAD run (random weights: the numbers mean nothing, the structure and the firing logic do)."""

from __future__ import annotations

import json

import numpy as np

try:
    from tests.conftest import SAMPLE, load_benchmark
    from tests.test_export_glad import make_tiny_glad_run, sample_frames
except ImportError:
    from conftest import SAMPLE, load_benchmark
    from test_export_glad import make_tiny_glad_run, sample_frames


def test_fire_steps_from_recorded_scores():
    adp = load_benchmark("adp_mtd")
    ts = [750, 600, 450, 300, 150, 0]
    nan = np.nan
    scores = np.array([[nan, 0.1, 0.2, 0.1, 0.1, 0.3],   # never over 0.25 above min_step: forced at t=0
                       [nan, 0.1, 0.5, 0.9, nan, nan],   # first over at 450
                       [nan, 0.3, nan, nan, nan, nan]])  # over at 600 (later steps unrecorded)
    steps, by_thr = adp.fire_steps(scores, ts, min_step=100, threshold=0.25)
    assert steps.tolist() == [0, 450, 600] and by_thr.tolist() == [False, True, True]
    # a score over the threshold below min_step is the forced fire, not one by threshold
    steps, by_thr = adp.fire_steps(scores, ts, min_step=200, threshold=0.25)
    assert steps.tolist() == [150, 450, 600] and by_thr.tolist() == [False, True, True]
    # min_step 0: nothing is forced; a frame that never crosses never fires
    steps, _ = adp.fire_steps(scores, ts, min_step=0, threshold=0.95)
    assert steps.tolist() == [-1, -1, -1]


def test_adp_report_end_to_end(tmp_path):
    adp = load_benchmark("adp_mtd")
    run = make_tiny_glad_run(tmp_path / "glad", sample_frames()[:8])
    res = adp.main(["--model", str(run), "--data", str(SAMPLE), "--every", "2", "--calibration-images", "4",
                    "--threads", "1", "--results", str(tmp_path / "results")])
    saved = json.loads((tmp_path / "results" / "adp_mtd.json").read_text())
    assert set(saved["spaces"]) == {"features", "latent"} and saved["test_images"] == res["test_images"]
    for space, r in saved["spaces"].items():
        n = len(r["labels"])
        assert np.array(r["scores"], float).shape == (n, len(r["timesteps"]))
        hist = r["fire_histogram"]
        assert sum(v["n"] for v in hist.values()) == n
        assert all(sum(v["fire_step_counts"].values()) == v["n"] for v in hist.values())
        assert 0 <= r["check_auroc"] <= 1 and r["threshold"] > 0
    md = (tmp_path / "results" / "adp_mtd.md").read_text()
    assert "| features |" in md and "| latent |" in md and (tmp_path / "results" / "adp_mtd.png").is_file()
