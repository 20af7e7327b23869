"""benchmarks/reference_mtd.py on tiny detectors: the DiAD/GLAD x reference ablation runs with one command on a
run folder or a bundle (a missing bank is built and stored first) and writes the issue's keys."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from edgeinspect.runtime.bank import BANK_FILE
from edgeinspect.runtime.bundle_loading import load_bundle
from tests.conftest import SAMPLE, load_benchmark

try:
    from tests.test_export import make_tiny_run, tiny_bundle
    from tests.test_export_glad import tiny_glad_bundle
except ImportError:  # run from inside tests/
    from test_export import make_tiny_run, tiny_bundle
    from test_export_glad import tiny_glad_bundle


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("reference_mtd")


def test_ablation_on_a_run_and_a_bundle_writes_every_key(bench, tmp_path, monkeypatch, capsys):
    run = make_tiny_run(tmp_path / "diad_run")
    glad = tmp_path / "glad_bundle"
    shutil.copytree(tiny_glad_bundle()[1], glad)
    monkeypatch.setattr(sys, "argv", ["reference_mtd.py", "--data", str(SAMPLE), "--diad", str(run), "--glad",
                                      str(glad), "--batch", "4", "--threads", "1", "--results", str(tmp_path),
                                      "--title", "References on the sample", "--note", "What the sample is."])
    assert bench.main() == 0
    # the banks were built from the training normals and stored: beside the run's weights, in the bundle
    assert (run / "checkpoints" / "done" / BANK_FILE).is_file()
    assert load_bundle(glad).manifest["payload"]["bank"] == "bank.safetensors"
    doc = json.loads((tmp_path / "reference_mtd.json").read_text())
    for method in ("diad", "glad"):
        for ref in ("reconstruction", "bank", "hybrid"):
            for key in ("image_auroc", "pixel_auroc", "ms_per_frame", "bundle_mb"):
                assert f"{method}.{ref}.{key}" in doc
            assert 0 <= doc[f"{method}.{ref}.image_auroc"] <= 1 and doc[f"{method}.{ref}.ms_per_frame"] > 0
        assert doc[f"glad.{ref}.bundle_mb"] > 0 and doc[f"diad.{ref}.bundle_mb"] is None  # a run is no bundle
    assert doc["default_reference"] == "reconstruction"
    # the three references score differently (they are not one map under three names)
    assert len({doc[f"diad.{r}.pixel_auroc"] for r in ("reconstruction", "bank", "hybrid")}) == 3
    md = (tmp_path / "reference_mtd.md").read_text()
    assert "| diad | hybrid |" in md and "the diffusion's contribution (hybrid - bank)" in md
    assert "Not measured yet" not in md
    assert md.startswith("# References on the sample\n\nWhat the sample is.")
    assert "(reference_mtd.png)" in md and (tmp_path / "reference_mtd.png").stat().st_size > 1000


def test_bank_rows_alone_leave_the_others_pending_and_later_runs_add_to_them(bench, tmp_path, monkeypatch):
    doc = {"rows": {"diad.bank": {"image_auroc": 0.9, "pixel_auroc": 0.9, "pixel_ap": 0.3, "pro": 0.6,
                                  "image_auroc_by_type": {"crack": 0.9}, "ms_per_frame": 10.0, "bundle_mb": 2.0,
                                  "bank_size": 4096, "bank_mb": 3.0, "source": "no model"}},
           "commands": ["first"], "default_reference": "reconstruction",
           "machine": {"cpu": "x", "threads": 1, "torch": "t"}}
    md = bench.report(doc)
    assert "Not measured yet (need trained models): diad.reconstruction, diad.hybrid, glad.reconstruction" in md
    assert "--diad RUN_OR_BUNDLE --glad RUN_OR_BUNDLE" in md
    (tmp_path / "reference_mtd.json").write_text(json.dumps(doc))
    bundle = tmp_path / "diad_bundle"
    shutil.copytree(tiny_bundle()[1], bundle)
    monkeypatch.setattr(sys, "argv", ["reference_mtd.py", "--data", str(SAMPLE), "--diad", str(bundle), "--batch", "4",
                                      "--threads", "1", "--results", str(tmp_path)])
    assert bench.main() == 0
    new = json.loads((tmp_path / "reference_mtd.json").read_text())
    assert new["commands"][0] == "first" and len(new["commands"]) == 2
    assert new["diad.bank.bundle_mb"] > 0 and "glad.bank" not in new["rows"]
