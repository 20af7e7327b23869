"""The generator reports' measures on known inputs: throughput and mask-image alignment."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgeinspect.generation.writer import GenerationWriter
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def report():
    return load_benchmark("generators_mtd")


def _tile(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur((rng.random((64, 64)) * 40 + 100).astype(np.float32), (0, 0), 2)
    return np.repeat(base.astype(np.uint8)[:, :, None], 3, axis=2)


def test_background_difference_finds_the_added_defect(report):
    background = _tile(0)
    whole = background.copy()
    whole[20:32, 30:44] = 20
    region = report.background_difference_mask(whole, background)
    truth = np.zeros((64, 64), bool)
    truth[20:32, 30:44] = True
    assert (region & truth).sum() / (region | truth).sum() > 0.7


def test_inside_vs_ring_is_one_without_a_defect_under_the_mask(report):
    diff = np.full((40, 40), 5.0)
    mask = np.zeros((40, 40), bool)
    mask[15:25, 15:25] = True
    assert report.inside_vs_ring(diff, mask) == pytest.approx(1.0)
    diff[mask] = 59.0
    assert report.inside_vs_ring(diff, mask) == pytest.approx(10.0)


def test_alignment_and_throughput_from_a_generation_folder(report, tmp_path):
    data = tmp_path / "data"
    (data / "train" / "good").mkdir(parents=True)
    gen = tmp_path / "gen"
    w = GenerationWriter(gen, {"method": "dualanodiff"}, total=2)
    for i in range(2):
        background = _tile(i)
        cv2.imwrite(str(data / "train" / "good" / f"{i}.png"), background)
        whole = background.copy()
        mask = np.zeros((64, 64), bool)
        mask[10 + 20 * i:24 + 20 * i, 10:30] = True
        whole[mask] = 15
        part = np.full_like(whole, 127)
        part[mask] = whole[mask]
        # item 1's mask is misplaced: it covers half the real defect
        written = mask if i == 0 else np.roll(mask, 10, axis=1)
        w.write(i, whole, written, {"seed": i, "background": f"{i}.png", "defect_type": "hole",
                                    "sampling_s": 0.5 + i}, extras={"part": part})
    items = report.folder_items([gen])
    align = report.mask_alignment(items, data)
    ious = [1.0, 1 / 3]  # 20x14 region vs the same shifted by 10 px: overlap 10x14, union 30x14
    assert align["mask_iou"] == pytest.approx(np.mean(ious), abs=0.08)
    assert align["empty_masks"] == 0
    # item 0: the defect exactly under its mask (inside ~100 grey levels off, the ring ~0); item 1's mask
    # half off it: the ring holds the other half
    assert align["inside_vs_ring_difference_median"] > 3
    assert align["mask_fill_mean"] == pytest.approx((1.0 + 0.5) / 2, abs=0.05)  # item 1's mask half on the defect
    thr = report.throughput(items, ("sampling",))
    assert thr["images_per_s"] == pytest.approx(2 / 2.0)
    assert thr["seconds_per_image_by_stage"]["sampling"] == pytest.approx(1.0)


@pytest.mark.parametrize("weight, says", [(0.0, False), (20.0, True)])
def test_training_line_names_the_defect_loss_weight(report, tmp_path, weight, says):
    import json

    run = tmp_path / "run"
    (run / "checkpoints" / "done").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"steps": 600, "lr": 1e-3, "batch_size": 4,
                                                           "background": "inpainted",
                                                           "defect_loss_weight": weight}}))
    gen = tmp_path / "gen"
    GenerationWriter(gen, {"method": "dualanodiff", "model": str(run / "checkpoints" / "done")}, total=1)
    line = report._training(gen)
    assert line.startswith("600 steps, lr 0.001, batch 4, BCM background inpainted")
    assert ("noise loss weighted 1 + 20 on the defect" in line) == says


def test_also_rows_split_at_the_last_equals_sign_and_must_exist():
    gm = load_benchmark("generators_mtd")
    results = {"cutpaste_ae_f4": {}, "adabldm_f8": {}}
    assert gm.parse_also(["through the f = 4 autoencoder=cutpaste_ae_f4", "f8=adabldm_f8"], results) == {
        "through the f = 4 autoencoder": "cutpaste_ae_f4", "f8": "adabldm_f8"}
    with pytest.raises(SystemExit, match="no entry 'missing'"):
        gm.parse_also(["a row=missing"], results)
    with pytest.raises(SystemExit, match="LABEL=ENTRY"):
        gm.parse_also(["no separator"], results)


def test_seed_spread_gives_mean_min_max_per_metric():
    gm = load_benchmark("generators_mtd")
    results = {f"s{i}": {"pixel_ap": ap, "pixel_auroc": 0.5 + i / 10, "image_auroc": 0.9, "pro": 0.7,
                         "settings": {"seed": i}} for i, ap in enumerate((0.1, 0.4, 0.25))}
    groups = gm.parse_spread(["edge, a = b=s0,s1,s2"], results)
    assert groups == {"edge, a = b": ["s0", "s1", "s2"]}
    table, lines = gm.seed_spread(results, groups)
    row = table["edge, a = b"]
    assert row["seeds"] == [0, 1, 2]
    assert row["pixel_ap"] == pytest.approx({"mean": 0.25, "min": 0.1, "max": 0.4})
    assert row["pixel_auroc"]["mean"] == pytest.approx(0.6)
    assert lines[-1].startswith("| edge, a = b | 0.250 (0.100-0.400) | 0.600 (0.500-0.700) |") and lines[-1].endswith("| 3 |")
    assert gm.seed_spread(results, {}) == ({}, [])
    with pytest.raises(SystemExit, match="two or more"):
        gm.parse_spread(["one=s0"], results)
    with pytest.raises(SystemExit, match="no entries"):
        gm.parse_spread(["x=s0,gone"], results)


def _entry(ap: float, folder: str) -> dict:
    return {"pixel_ap": ap, "pixel_auroc": 0.6, "image_auroc": 0.9, "pro": 0.7, "n_defect_images": 1,
            "per_type": {"hole": {"pixel_ap": ap}}, "train_seconds": 1.0, "steps": 10, "defects": folder,
            "n_defect_images_evaluated": 5, "n_normal_images": 3}


def test_adabldm_report_reads_the_named_entry_and_says_where_it_was_generated(report, tmp_path):
    import json

    data = tmp_path / "data"
    (data / "train" / "good").mkdir(parents=True)
    cv2.imwrite(str(data / "train" / "good" / "0.png"), _tile(0))
    gen = tmp_path / "gen"
    w = GenerationWriter(gen, {"method": "adabldm", "sampling": {
        "free_steps": 2, "latent_steps": 2, "pixel_steps": 1, "guidance_scale": 1.0, "adapt_steps": 3,
        "adapt_lr": 1e-4, "lambda_con": 100.0, "adapt_scope": "decoder", "batch_size": 1}}, total=1)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 10:20] = True
    w.write(0, _tile(0), mask, {"seed": 0, "source_image": "0.png", "defect_type": "hole", "sampling_s": 2.0,
                                "adaptation_s": 3.0},
            extras={"trimap": np.where(mask, 255, 127).astype(np.uint8), "before_adaptation": _tile(1)})
    downstream = {"cutpaste_edge": _entry(0.3, "cp"), "adabldm": _entry(0.1, "old"), "adabldm_gpu": _entry(0.4, "new")}
    out = tmp_path / "adabldm_mtd"
    r = report.adabldm_report([gen], downstream, data, out, cutpaste_name="cutpaste_edge",
                              generated_name="adabldm_gpu", gen_machine="GPU X, 6 jobs sharing it")
    assert r["downstream"]["generated"]["pixel_ap"] == 0.4 and r["downstream"]["cutpaste"]["pixel_ap"] == 0.3
    assert r["generation_machine"] == "GPU X, 6 jobs sharing it"
    assert r["images_per_s"] == pytest.approx(1 / 5.0)
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# AdaBLDM on MTD (edge preset)\n") and "PyTorch, on GPU X, 6 jobs sharing it." in md
    assert json.loads(out.with_suffix(".json").read_text())["downstream"]["generated"]["source"] == "new"
    r = report.adabldm_report([gen], downstream, data, out, cutpaste_name="cutpaste_edge")
    assert r["downstream"]["generated"]["pixel_ap"] == 0.1
    assert "shared the two cores" in out.with_suffix(".md").read_text()
