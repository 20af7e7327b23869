import json

import cv2
import numpy as np
import pytest

from edgeinspect.cli import main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.conftest import SAMPLE

    run = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", "diad", "--preset", "tiny", "--data", str(SAMPLE), "--run", str(run), "--quiet",
               "--set", "train.autoencoder_steps=3", "--set", "train.unet_steps=3", "--set", "train.guidance_steps=3"])
    assert rc == 0
    return run


def test_test_command_reports_all_metrics(trained_run, tmp_path, capsys):
    from tests.conftest import SAMPLE

    out = tmp_path / "metrics.json"
    rc = main(["test", "--model", str(trained_run), "--data", str(SAMPLE), "--out", str(out), "--quiet",
               "--overlays", str(tmp_path / "ov"), "--max-overlays", "4", "--set", "inference.batch_size=10"])
    assert rc == 0
    res = json.loads(out.read_text())
    keys = {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pro"}
    assert set(res["metrics"]) == keys
    assert all(0.0 <= v <= 1.0 for v in res["metrics"].values())
    assert res["n_images"] == 20 and res["n_defective"] == 12
    assert set(res["latency_batch1"]["stage_ms"]) == {"encode", "denoise", "decode", "features", "scoring"}
    assert res["latency_batch1"]["ms_per_frame"] > 0 and res["peak_rss_mb"] > 0
    assert len(list((tmp_path / "ov").glob("*.png"))) == 4
    for png in (tmp_path / "ov").glob("*.png"):  # each image at its own aspect beside its heat map, captioned
        kind, stem = png.stem.split("_", 1)
        src = next((SAMPLE / "test" / kind).glob(stem + ".*"))
        h, w = cv2.imread(str(src)).shape[:2]
        assert cv2.imread(str(png)).shape[:2] == (h + 18, 2 * w)
    printed = json.loads(capsys.readouterr().out)
    assert printed == res["metrics"]
    saved = np.load(out.with_suffix(".maps.npz"))
    assert saved["maps"].shape == (20, 64, 64)


def test_exclude_file_leaves_images_out(trained_run, tmp_path):
    from tests.conftest import SAMPLE

    names = sorted(p.name for p in (SAMPLE / "test" / "crack").iterdir())[:2]
    excl = tmp_path / "seeds.txt"
    excl.write_text("# generator seeds\n" + "\n".join(names) + "\n")
    out = tmp_path / "m.json"
    assert main(["test", "--model", str(trained_run), "--data", str(SAMPLE), "--out", str(out), "--quiet",
                 "--exclude", str(excl)]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 18 and not {r["image"] for r in res["per_image"]} & set(names)


def test_threads_flag_sets_inference_threads(trained_run, tmp_path, monkeypatch):
    import torch

    from tests.conftest import SAMPLE

    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    calls: list[int] = []
    out = tmp_path / "m.json"
    assert main(["test", "--model", str(trained_run), "--data", str(SAMPLE), "--out", str(out), "--quiet",
                 "--threads", "3"]) == 0
    assert calls == [3]  # --threads wins over the run's train.threads
    with pytest.raises(SystemExit):
        main(["test", "--model", str(trained_run), "--data", str(SAMPLE), "--threads", "0"])


def test_predict_writes_overlays_and_verdicts(trained_run, tmp_path, capsys):
    from tests.conftest import SAMPLE

    imgs = sorted((SAMPLE / "test" / "break").iterdir())[:2]
    rc = main(["predict", "--model", str(trained_run), *map(str, imgs), "--out", str(tmp_path / "p"),
               "--threshold", "0.0"])
    assert rc == 0
    scores = json.loads((tmp_path / "p" / "scores.json").read_text())
    assert [r["verdict"] for r in scores["results"]] == ["NG", "NG"]
    import cv2

    ov = cv2.imread(scores["results"][0]["overlay"])
    assert ov.shape == (64, 3 * 64, 3)  # input | reconstruction | heat map
    assert "NG" in capsys.readouterr().out


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lerning_rate: 1\n")
    assert main(["train", "diad", "--config", str(cfg), "--run", str(tmp_path / "r")]) == 2
    assert "train.lerning_rate" in capsys.readouterr().err


def test_override_of_model_is_refused(trained_run, tmp_path):
    from tests.conftest import SAMPLE

    with pytest.raises(ValueError, match="cannot override"):
        main(["test", "--model", str(trained_run), "--data", str(SAMPLE), "--set", "model.image_size=128"])


def test_test_and_predict_score_a_bundle_on_onnxruntime_as_the_run_on_torch(trained_run, tmp_path):
    """Run-vs-bundle parity through the one detector assembly: the run exported to a bundle, then `test` and
    `predict` with --bundle on onnxruntime give the scores `--model` gives on torch (the tiny preset's
    extractor has random weights: seeded alike on both sides, it is the same extractor)."""
    import torch

    from tests.conftest import SAMPLE

    bundle = tmp_path / "bundle"
    torch.manual_seed(0)
    assert main(["export", "--model", str(trained_run), "--out", str(bundle), "--quiet", "--threads", "1"]) == 0
    results = {}
    for name, source in (("run", ["--model", str(trained_run)]),
                         ("bundle", ["--bundle", str(bundle), "--backend", "onnxruntime"])):
        torch.manual_seed(0)
        out = tmp_path / f"{name}.json"
        assert main(["test", *source, "--data", str(SAMPLE), "--out", str(out), "--quiet", "--threads", "1"]) == 0
        results[name] = json.loads(out.read_text())
    run, onnx = results["run"], results["bundle"]
    assert [r["image"] for r in run["per_image"]] == [r["image"] for r in onnx["per_image"]]
    diff = max(abs(a["score"] - b["score"]) for a, b in zip(run["per_image"], onnx["per_image"]))
    assert diff <= 1e-4, diff
    assert onnx["metrics"]["image_auroc"] == pytest.approx(run["metrics"]["image_auroc"], abs=1e-6)
    assert set(onnx) == set(run) and onnx["train_minutes"] is None

    imgs = sorted((SAMPLE / "test" / "break").iterdir())[:2]
    rows = {}
    for name, source in (("run", ["--model", str(trained_run)]), ("bundle", ["--bundle", str(bundle)])):
        torch.manual_seed(0)
        assert main(["predict", *source, *map(str, imgs), "--out", str(tmp_path / name), "--threads", "1"]) == 0
        rows[name] = json.loads((tmp_path / name / "scores.json").read_text())["results"]
    assert [r["score"] for r in rows["bundle"]] == pytest.approx([r["score"] for r in rows["run"]], abs=1e-4)
    assert all(r["verdict"] is None for r in rows["bundle"])  # an uncalibrated bundle and no --threshold

    # a run folder runs on torch only: the error says to export it
    assert main(["test", "--model", str(trained_run), "--backend", "onnxruntime", "--data", str(SAMPLE)]) == 2
