"""benchmarks/sweep_mtd.py: one table from several detection_mtd.py evaluations, on known inputs."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import load_benchmark

METRICS = {"image_auroc": 0.5, "pixel_auroc": 0.6, "pixel_ap": 0.1, "pro": 0.4}


def write_eval(folder, name, sets, scores, held=None):
    """A detection_mtd.py evaluation as it leaves its files: summary JSON + markdown, raw eval JSON."""
    results, evals = folder / "results", folder / "evals"
    results.mkdir(exist_ok=True)
    evals.mkdir(exist_ok=True)
    summary = {**METRICS, "n_images": len(scores), "settings": {}}
    if held is not None:
        summary["held_out"] = held
    (results / f"{name}.json").write_text(json.dumps(summary))
    flags = "".join(f" --set {s}" for s in sets)
    (results / f"{name}.md").write_text(f"# x\n\n    python benchmarks/detection_mtd.py --model m --data d --name {name}{flags}\n")
    per_image = [{"image": f"{i}.png", "type": t, "score": s} for i, (t, s) in enumerate(scores)]
    (evals / f"{name}_eval.json").write_text(json.dumps({"checkpoint": "/w/v2/checkpoints/atp-final",
                                                          "per_image": per_image}))


def test_selection_auroc_counts_only_the_named_images():
    sw = load_benchmark("sweep_mtd")
    raw = {"per_image": [{"image": "a.png", "type": "good", "score": 0.1},
                         {"image": "b.png", "type": "crack", "score": 0.9},
                         {"image": "c.png", "type": "good", "score": 0.8},     # not named: left out
                         {"image": "d.png", "type": "break", "score": 0.05}]}
    value, n = sw.selection_image_auroc(raw, {"good/a.png", "b.png", "break/d.png"})
    assert n == 3 and value == pytest.approx(0.5)   # 1 normal at 0.1: above one defect, below the other
    with pytest.raises(SystemExit, match="none of its names"):
        sw.selection_image_auroc(raw, {"crack/zzz.png"})


def test_table_rows_flags_and_selection(tmp_path, monkeypatch):
    sw = load_benchmark("sweep_mtd")
    scores = [("good", 0.2), ("crack", 0.9), ("good", 0.3), ("crack", 0.1)]
    write_eval(tmp_path, "g_base", ["runtime.device=cuda"], scores, held={**METRICS, "image_auroc": 0.75})
    write_eval(tmp_path, "g_t0", ["runtime.device=cuda", "inference.t0=600"], scores[:2] + [("good", 0.95)] + scores[3:],
               held={**METRICS, "image_auroc": 0.25})
    (tmp_path / "sel.txt").write_text("# chosen on\n0.png\ncrack/1.png  # the crack\n2.png\n")
    (tmp_path / "note.md").write_text("How it ran.\n")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["sweep_mtd.py", "--name", "s", "--results", str(tmp_path / "results"),
                                      "--evals", str(tmp_path / "evals"), "--selection", str(tmp_path / "sel.txt"),
                                      "--prefix", "g_", "--out", str(out), "--note", str(tmp_path / "note.md"),
                                      "g_base", "g_t0"])
    assert sw.main() == 0
    data = json.loads((out / "s.json").read_text())
    rows = data["rows"]
    assert [r["name"] for r in rows] == ["base", "t0"]
    assert rows[0]["overrides"] == [] and rows[1]["overrides"] == ["inference.t0=600"]   # runtime.* left out
    assert rows[0]["selection_image_auroc"] == pytest.approx(1.0)     # 0.2, 0.3 normals below the 0.9 crack
    assert rows[1]["selection_image_auroc"] == pytest.approx(0.5)     # the 0.95 normal outranks it
    assert rows[0]["n_selection"] == 3 and rows[1]["held_out"]["image_auroc"] == 0.25
    md = (out / "s.md").read_text()
    assert "How it ran." in md and "`inference.t0=600`" in md and "(the run's own)" in md
    assert "| base | `v2` |" in md and "0.7500 / 0.6000" in md and (out / "s.png").stat().st_size > 0


def test_missing_evaluation_names_the_file(tmp_path, monkeypatch):
    sw = load_benchmark("sweep_mtd")
    write_eval(tmp_path, "a", [], [("good", 0.1), ("crack", 0.2)])
    monkeypatch.setattr(sys, "argv", ["sweep_mtd.py", "--name", "s", "--results", str(tmp_path / "results"),
                                      "--evals", str(tmp_path / "evals"), "--out", str(tmp_path / "o"), "a", "b"])
    with pytest.raises(SystemExit, match=r"b\.json: missing"):
        sw.main()
