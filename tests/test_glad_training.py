"""GLAD training through the shared Trainer: init from a DiAD base, ATP, resume, CLI."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgeinspect.data.batches import TrainingBatches
from edgeinspect.cli import main
from edgeinspect.config import build_config
from edgeinspect.core.runs import CheckpointError, latest_checkpoint, load_state
from edgeinspect.training.diad import train_diad
from edgeinspect.runtime.torch_backend import load_glad
from edgeinspect.training.glad import train_glad
from tests.conftest import check_resume_bit_for_bit


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from tests.conftest import make_mvtec

    return make_mvtec(tmp_path_factory.mktemp("glad") / "cat", n_train=6, n_good=2, n_defect=2)


@pytest.fixture(scope="module")
def diad_base(data_root, tmp_path_factory):
    """A tiny DiAD run through its UNet stage (the GLAD base)."""
    cfg = build_config("diad", "tiny", {"train": {"data_root": str(data_root), "prompt": "a tile",
                                                  "autoencoder_steps": 2, "unet_steps": 2, "guidance_steps": 0}})
    run = tmp_path_factory.mktemp("diad") / "run"
    train_diad(cfg, run, progress=False)
    return run


def _glad_cfg(data_root, base, **train):
    t = {"data_root": str(data_root), "init_from": str(base), "atp_steps": 4, "checkpoint_every": 2}
    t.update(train)
    return build_config("glad", "tiny", {"train": t})


def _weights(run):
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def test_atp_from_a_diad_base_trains_only_the_unet(tmp_path, data_root, diad_base):
    ckpt = train_glad(_glad_cfg(data_root, diad_base), tmp_path / "run", progress=False)
    assert ckpt.name == "done"
    base = load_file(str(diad_base / "checkpoints" / "unet-final" / "model.safetensors"))
    after = _weights(tmp_path / "run")
    assert set(after) == {k for k in base if k.startswith(("vae.", "unet.", "prompt_encoder."))}
    changed = {k for k in after if not torch.equal(after[k], base[k])}
    assert changed and all(k.startswith("unet.") for k in changed)
    extra = load_state(ckpt).extra
    base_sf = load_state(diad_base / "checkpoints" / "unet-final").extra["scaling_factor"]
    assert extra["scaling_factor"] == pytest.approx(base_sf)
    assert extra["adp_threshold"] > 0 and extra["adp_calibration"]["images"] == 2
    low, high = extra["adp_weight_bounds"]  # calibration.weight_margin 2
    assert low > 0 and high == pytest.approx(2 * low)
    cfg, model, _ = load_glad(tmp_path / "run")
    assert cfg.train.prompt == "a tile" and cfg.train.category == "cat"  # prompt from the base run
    assert model.scaling_factor == pytest.approx(base_sf)
    log = [json.loads(ln) for ln in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "atp"][-1] == 4


def test_interrupted_atp_resumes_bit_for_bit(tmp_path, data_root, diad_base, monkeypatch):
    cfg = _glad_cfg(data_root, diad_base, atp_steps=5)
    check_resume_bit_for_bit(train_glad, cfg, tmp_path, TrainingBatches, monkeypatch, "atp")
    assert load_state(latest_checkpoint(tmp_path / "cut")).extra["adp_threshold"] == pytest.approx(
        load_state(latest_checkpoint(tmp_path / "ref")).extra["adp_threshold"])


def test_base_must_exist_and_match(tmp_path, data_root, diad_base):
    with pytest.raises(CheckpointError, match="unet-final"):
        (tmp_path / "half" / "checkpoints").mkdir(parents=True)
        train_glad(_glad_cfg(data_root, tmp_path / "half"), tmp_path / "r1", progress=False)
    other = _glad_cfg(data_root, diad_base).model_dump(mode="json")
    other["model"]["unet"]["layers_per_block"] = 2
    other.pop("method")
    with pytest.raises(CheckpointError, match="different model config"):
        train_glad(build_config("glad", "tiny", other), tmp_path / "r2", progress=False)


def test_cli_train_without_base_then_test_and_threshold(tmp_path, data_root, capsys):
    run = tmp_path / "run"
    rc = main(["train", "glad", "--preset", "tiny", "--data", str(data_root), "--run", str(run), "--quiet",
               "--set", "train.atp_steps=2"])
    assert rc == 0
    assert load_state(latest_checkpoint(run / "base")).stage == "done"  # DiAD stages 1-2 ran in <run>/base
    assert (run / "base" / "checkpoints" / "unet-final").is_dir()
    capsys.readouterr()
    out = tmp_path / "m.json"
    assert main(["test", "--model", str(run), "--data", str(data_root), "--out", str(out), "--quiet",
                 "--overlays", str(tmp_path / "ov"), "--max-overlays", "2"]) == 0
    res = json.loads(out.read_text())
    assert set(res["metrics"]) == {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
                                   "pixel_f1max", "pro"}
    assert res["n_images"] == 4 and res["settings"]["threshold_source"] == "calibrated"
    stages = res["latency_batch1"]["stage_ms"]
    assert {"adp_unet", "adp_decode", "adp_features", "adp_scoring", "saff", "denoise"} <= set(stages)
    assert res["latency_batch1"]["adp_checks_ms"] > 0
    assert all("fire_step" in r for r in res["per_image"]) and res["adp"]["all"]["n"] == 4
    saved = np.load(out.with_suffix(".maps.npz"))
    assert saved["maps"].shape == (4, 64, 64) and saved["adp_scores"].shape == (4, len(saved["timesteps"]))
    assert saved["fire_step"].tolist() == [r["fire_step"] for r in res["per_image"]]
    assert np.allclose(saved["scores"], [r["score"] for r in res["per_image"]]) and saved["draw_scores"].shape == (4, 1)
    assert len(list((tmp_path / "ov").glob("*.png"))) == 2
    capsys.readouterr()
    prop = tmp_path / "thr.json"
    assert main(["glad-threshold", "--model", str(run), "--out", str(prop), "--percentile", "100",
                 "--margin", "1.0"]) == 0
    printed = capsys.readouterr().out
    p = json.loads(prop.read_text())
    assert p["threshold"] == pytest.approx(p["max_scores"]["max"])
    assert "--set inference.categories.cat.threshold=" in printed
    assert p["weight_low"] > 0 and p["weight_high"] == pytest.approx(2 * p["weight_low"])
    assert (f"--set inference.weight_mode=linear --set inference.categories.cat.weight_low={p['weight_low']:.6g} "
            f"--set inference.categories.cat.weight_high={p['weight_high']:.6g}") in printed
    # the proposal applies through the category settings
    assert main(["predict", "--model", str(run), str(data_root / "test" / "scratch"), "--out",
                 str(tmp_path / "p"), "--set", f"inference.categories.cat.threshold={p['threshold']}"]) == 0
    scores = json.loads((tmp_path / "p" / "scores.json").read_text())
    assert len(scores["results"]) == 2 and all(r["fire_step"] >= 0 for r in scores["results"])
