"""The detection report's held-out metrics: numbers over the test images a setting was not chosen on."""

from __future__ import annotations

import numpy as np
import pytest

from edgeinspect.data.mvtec import MVTecFolder
from edgeinspect.evaluation.metrics import auroc
from tests.conftest import load_benchmark, make_mvtec


@pytest.fixture(scope="module")
def report():
    return load_benchmark("detection_mtd")


def _stored(tmp_path, root, size=32):
    """Maps stored as the evaluation does: perfect on good/000 + scratch/000 (held out), inverted
    on good/001 + scratch/001 (the selection)."""
    data = MVTecFolder(root, "test", size)
    n = len(data.samples)
    labels = np.array([s.label for s in data.samples])
    masks = np.stack([data.load(i)[1] for i in range(n)])
    held = np.array([s.path.stem == "000" for s in data.samples])
    maps = np.where(held[:, None, None], masks, ~masks).astype(np.float16)
    scores = np.where(held, labels, 1 - labels).astype(np.float32)
    path = tmp_path / "eval.maps.npz"
    np.savez_compressed(path, maps=maps, scores=scores, labels=labels)
    return path, {"settings": {"image_size": size}}


def test_heldout_metrics_leave_out_the_selection(report, tmp_path):
    root = make_mvtec(tmp_path / "cat", n_good=2, n_defect=2)
    maps_file, res = _stored(tmp_path, root)
    sel = tmp_path / "selection.txt"
    sel.write_text("# chosen on\ngood/001.png\nscratch/001.png  # a defect\n")
    held, n_chosen = report.heldout_metrics(res, root, sel, maps_file)
    assert n_chosen == 2
    assert held["n_images"] == 2 and held["n_defective"] == 1
    assert held["image_auroc"] == 1.0 and held["pixel_auroc"] == 1.0
    # the full split mixes in the inverted selection and is far from perfect
    d = np.load(maps_file)
    assert auroc(d["labels"], d["scores"]) == 0.5
    md = report.selection_section(held, n_chosen, sel)
    assert "2 test images" in md and "| image_auroc | 1.0000 |" in md


def test_heldout_metrics_refuse_a_selection_that_names_nothing(report, tmp_path):
    root = make_mvtec(tmp_path / "cat")
    maps_file, res = _stored(tmp_path, root)
    sel = tmp_path / "selection.txt"
    sel.write_text("crack/123.png\n")
    with pytest.raises(SystemExit, match="none of its names"):
        report.heldout_metrics(res, root, sel, maps_file)


def _fake_run(root, train: dict, seconds: float, unet_seconds: float | None = None):
    import json

    for name, secs in (("done", seconds), *((("unet-final", unet_seconds),) if unet_seconds else ())):
        ckpt = root / "checkpoints" / name
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"")
        (ckpt / "state.json").write_text(json.dumps({"stage": name, "train_seconds": secs}))
    (root / "checkpoints" / "latest").write_text("done")
    (root / "config.json").write_text(json.dumps({"train": train}))
    return root


def test_base_training_minutes_follow_the_chain_of_runs(report, tmp_path):
    ae = _fake_run(tmp_path / "ae", {}, 3000.0)
    diad = _fake_run(tmp_path / "diad", {"init_autoencoder_from": str(ae)}, 1200.0, unet_seconds=600.0)
    glad_cfg = {"init_from": str(diad), "init_autoencoder_from": None}
    # GLAD starts from the DiAD run's UNet stage: its minutes up to unet-final, not the SG stage after it
    assert report.base_train_minutes({"train": glad_cfg}) == {f"{diad} (to its UNet stage)": 10.0, str(ae): 50.0}
    assert report.base_train_minutes({"train": {"init_from": str(tmp_path / "gone")}}) == {}
    assert "`" + str(ae) + "` 50.0 min" in report.base_note({str(ae): 50.0}) and report.base_note({}) == ""
