"""GLAD export: its four roles as ONNX, a GLAD bundle (manifest method "glad" with the ADP settings) and
the GLAD loop through onnxruntime from the bundle, against torch.

Measured on the tiny preset (random weights, 20 frames of data/mtd_sample at 64 px, CPU, 1 thread), with
an ADP threshold inside the spread of the step-2 check scores so that some frames fire there (t=249) and
the others at the forced step (t=124, below min_step; 14 and 6 of the 20 frames): fire steps identical
through torch and onnxruntime fp32; max abs differences: scores 8.0e-7, maps 1.1e-6, reconstructions 4.6e-6,
ADP check scores 5.4e-7 (bound 1e-4 for all), against a threshold 5.2e-4 from the nearest check score.
fp16 bundle: the same fire steps, scores within 3.0e-4 of fp32 (bound 5e-3), map correlation >= 0.99.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeinspect.config import build_config, dump_config
from edgeinspect.core.roles import ROLE_SIGNATURES
from edgeinspect.core.runs import TrainState
from edgeinspect.training.checkpoint import save_checkpoint

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "mtd_sample"
SCORE_TOL = 1e-4
FP32_BOUND = (1e-4, 1e-3)
GLAD_ROLES = ("vae_encoder", "unet_plain", "vae_decoder", "features", "bank_distance")




def sample_frames(size: int = 64) -> torch.Tensor:
    from edgeinspect.data.mvtec import image_to_tensor, read_image, resize_image

    paths = sorted((SAMPLE / "test").rglob("*.jpg"))
    return torch.stack([image_to_tensor(resize_image(read_image(p), size)) for p in paths])


def glad_features(cfg, seed: int = 1):
    from edgeinspect.models.features import build_features

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        return build_features(cfg)


def split_threshold(values: torch.Tensor, min_gap: float = 1e-4) -> float:
    """A threshold in the widest gap between consecutive values in their middle half."""
    s = values.sort().values
    n = len(s)
    lo, hi = n // 4, 3 * n // 4
    i = lo + int((s[lo + 1:hi + 1] - s[lo:hi]).argmax())
    assert float(s[i + 1] - s[i]) >= min_gap, "check scores too close together for a robust threshold"
    return float(s[i] + s[i + 1]) / 2


def make_tiny_glad_run(root: Path, frames: torch.Tensor, seed: int = 0) -> Path:
    """A tiny GLAD run folder (config + checkpoint, random weights) whose checkpoint carries an ADP threshold
    inside the spread of the frames' step-2 check scores (as the end of training stores one)."""
    from edgeinspect.models.glad import GLADModel
    from edgeinspect.runtime.run_detector import model_pipeline

    torch.manual_seed(seed)
    cfg = build_config("glad", "tiny", {"train": {"prompt": "a tile", "category": "tile"}})
    model = GLADModel(cfg).eval()
    probe = model_pipeline(cfg, model, glad_features(cfg), threshold=None)
    with torch.no_grad():
        adp = probe(frames).adp_scores
    threshold = split_threshold(adp[:, 2])
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(dump_config(cfg)))
    save_checkpoint(root, "done", model, TrainState("done", 0, extra={
        "scaling_factor": model.scaling_factor, "adp_threshold": threshold,
        "adp_calibration": {"category": "tile", "images": len(frames), "percentile": 50.0, "margin": 1.0,
                            "max_scores": [0.0]}}))
    return root


@functools.cache
def tiny_glad_bundle() -> tuple[Path, Path]:
    """(run folder, bundle folder with fp32 + fp16), built once per test session (read-only)."""
    from edgeinspect.export.bundle import export_bundle

    root = Path(tempfile.mkdtemp(prefix="edgeinspect-glad-export-"))
    atexit.register(shutil.rmtree, root, True)
    run = make_tiny_glad_run(root / "run", sample_frames())
    cfg = build_config("glad", "tiny")
    bundle = export_bundle(run, root / "bundle", ("fp32", "fp16"), features=glad_features(cfg), threads=1)
    return run, bundle


@pytest.fixture(scope="module")
def bundle():
    from edgeinspect.runtime.bundle_loading import load_bundle

    return load_bundle(tiny_glad_bundle()[1])


@pytest.fixture(scope="module")
def torch_model():
    from edgeinspect.runtime.torch_backend import load_glad

    return load_glad(tiny_glad_bundle()[0])


def test_glad_bundle_manifest(bundle):
    m = bundle.manifest
    assert m["method"] == "glad" and m["preset"] == "tiny" and m["image_size"] == 64
    assert set(bundle.networks) == set(GLAD_ROLES) and set(bundle.pipeline_roles()) == set(GLAD_ROLES)
    for role in ("vae_encoder", "unet_plain", "vae_decoder"):
        e = bundle.network(role)
        assert (e.input_names, e.output_names) == ROLE_SIGNATURES[role]
    assert bundle.network("features").batch_multiplier == 2
    assert bundle.network("unet_plain").precision["fp16"] == "fp16"
    assert bundle.network("vae_decoder").precision["fp16"] == "fp32"
    ms = m["method_settings"]
    ckpt = json.loads((tiny_glad_bundle()[0] / "checkpoints" / "done" / "state.json").read_text())
    assert ms["adp_threshold"] == pytest.approx(ckpt["extra"]["adp_threshold"])
    assert ms["adp_threshold_source"] == "checkpoint" and ms["category"] == "tile"
    assert (ms["t0"], ms["steps"], ms["min_step"], ms["top_k"], ms["adp_top_k"]) == (500, 4, 150, 16, 16)
    assert json.loads((bundle.path / "settings.json").read_text())["method_settings"] == ms
    assert m["calibration"] is None


@pytest.mark.parametrize("role", GLAD_ROLES)
def test_glad_roles_match_torch_in_onnxruntime(bundle, torch_model, role):
    import edgeinspect.export.glad  # noqa: F401  (registers the GLAD roles: roles.py loads only DiAD's itself)
    from edgeinspect.export.onnx import parity_report
    from edgeinspect.export.roles import ExportContext
    from edgeinspect.export.methods import build_role_exports

    cfg, model, _ = torch_model
    with torch.no_grad():
        ctx = model.context(cfg.train.prompt)
    spec = build_role_exports("glad", ExportContext(cfg, model, glad_features(cfg), ctx), [role])[role]
    err, scale = parity_report(spec.module, bundle.onnx_path(role, "fp32"), [spec.inputs, spec.probe],
                               spec.output_names, threads=1)
    for name in spec.output_names:
        assert err[name] <= FP32_BOUND[0] + FP32_BOUND[1] * scale[name], (role, name, err[name])
        assert scale[name] > 0.01
    assert err == pytest.approx(bundle.manifest["parity"]["max_abs_error"][role]["fp32"], abs=1e-6)


@pytest.fixture(scope="module")
def glad_results(bundle, torch_model):
    from edgeinspect.runtime.detector import bundle_pipeline
    from edgeinspect.runtime.run_detector import model_pipeline

    cfg, model, extra = torch_model
    frames = sample_frames()
    torch_pipe = model_pipeline(cfg, model, glad_features(cfg), threshold=extra["adp_threshold"])
    ort_pipe = bundle_pipeline(bundle, "onnxruntime", precision="fp32", intra_op_threads=1)
    return torch_pipe, ort_pipe, torch_pipe(frames), ort_pipe(frames)


def test_glad_scores_and_fire_steps_equal_torch_vs_onnxruntime(glad_results):
    from edgeinspect.runtime.glad import STAGES, GLADPipeline

    torch_pipe, ort_pipe, ref, got = glad_results
    assert isinstance(ort_pipe, GLADPipeline) and ort_pipe.nets.name == "onnxruntime"
    assert ort_pipe.threshold == torch_pipe.threshold and ort_pipe.timesteps == torch_pipe.timesteps
    assert torch.equal(got.fire_step, ref.fire_step) and torch.equal(got.fired_by_threshold, ref.fired_by_threshold)
    # frames fire at the threshold step and at the forced one (t < min_step): both paths compared
    steps = ref.fire_step.tolist()
    assert set(steps) == {ort_pipe.timesteps[2], ort_pipe.timesteps[3]}, steps
    assert ort_pipe.timesteps[3] < ort_pipe.inference.min_step <= ort_pipe.timesteps[2]
    assert (got.scores - ref.scores).abs().max() <= SCORE_TOL
    assert (got.maps - ref.maps).abs().max() <= SCORE_TOL
    assert (got.reconstructions - ref.reconstructions).abs().max() <= SCORE_TOL
    nan_equal = torch.isnan(got.adp_scores) == torch.isnan(ref.adp_scores)
    assert nan_equal.all()
    assert float(torch.nan_to_num(got.adp_scores - ref.adp_scores).abs().max()) <= SCORE_TOL
    assert ref.scores.std() > 0.01
    assert set(got.timings_ms) == set(STAGES)
    assert got.verdicts is None and got.normalized_scores is None  # not calibrated


def test_glad_fp16_bundle_agrees(bundle, glad_results):
    from edgeinspect.runtime.detector import bundle_pipeline

    _, _, _, ort32 = glad_results
    frames = sample_frames()[:6]
    ort16 = bundle_pipeline(bundle, precision="fp16", intra_op_threads=1)(frames)
    assert torch.isfinite(ort16.maps).all() and torch.isfinite(ort16.scores).all()
    assert (ort16.scores - ort32.scores[:6]).abs().max() < 5e-3
    for a, b in zip(ort32.maps[:6].numpy(), ort16.maps.numpy()):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99


def test_glad_settings_overrides_through_the_bundle(bundle):
    from edgeinspect.runtime.detector import bundle_pipeline

    pipe = bundle_pipeline(bundle, overrides={"inference": {"threshold": 1e9}}, intra_op_threads=1)
    r = pipe(sample_frames()[:2])
    assert pipe.threshold == 1e9 and not r.fired_by_threshold.any()
    assert r.fire_step.tolist() == [124, 124]  # forced below min_step


def test_glad_pipeline_sizes_backend_batches_for_its_stacked_draws(bundle, monkeypatch):
    """TensorRT profiles come from the max_batch the pipeline asks its networks for: frames x 2 (the ADP
    check decodes two estimates per row) x draws (run as one batch), per the category's settings."""
    import edgeinspect.runtime.detector as bl

    asked = []
    real = bl.bundle_networks

    def recording(*args, **kwargs):
        asked.append(kwargs["max_batch"])
        return real(*args, **kwargs)

    monkeypatch.setattr(bl, "bundle_networks", recording)
    one = bl.bundle_pipeline(bundle, max_batch=3, intra_op_threads=1)
    three = bl.bundle_pipeline(bundle, max_batch=3, overrides={"inference": {"draws": 3}}, intra_op_threads=1)
    assert asked == [3 * 2, 3 * 2 * 3] and one.inference.draws == 1 and three.inference.draws == 3
    r = three(sample_frames()[:2])
    assert r.draw_scores.shape == (2, 3) and r.draw_fire_steps.shape == (2, 3)


def test_glad_method_settings_threshold_sources():
    from edgeinspect.export.glad import glad_method_settings

    cfg = build_config("glad", "tiny", {"train": {"category": "tile"}})
    assert glad_method_settings(cfg, {})["adp_threshold_source"] == "none"
    assert glad_method_settings(cfg, {"adp_threshold": 0.3})["adp_threshold"] == 0.3
    cfg2 = build_config("glad", "tiny", {"train": {"category": "tile"}, "inference": {
        "categories": {"tile": {"threshold": 0.7, "t0": 300, "steps": 3}}}})
    s = glad_method_settings(cfg2, {"adp_threshold": 0.3})
    assert (s["adp_threshold"], s["adp_threshold_source"], s["t0"], s["steps"]) == (0.7, "config", 300, 3)


def test_glad_method_settings_weight_bounds_sources():
    from edgeinspect.export.glad import glad_method_settings

    linear = {"train": {"category": "tile"}, "inference": {"weight_mode": "linear"}}
    with pytest.raises(ValueError, match="without its bounds.*glad-threshold"):
        glad_method_settings(build_config("glad", "tiny", linear), {})
    s = glad_method_settings(build_config("glad", "tiny", linear), {"adp_weight_bounds": [0.2, 0.4]})
    assert (s["weight_low"], s["weight_high"], s["weight_bounds_source"]) == (0.2, 0.4, "checkpoint")
    linear["inference"]["categories"] = {"tile": {"weight_low": 0.1, "weight_high": 0.5}}
    s = glad_method_settings(build_config("glad", "tiny", linear), {"adp_weight_bounds": [0.2, 0.4]})
    assert (s["weight_low"], s["weight_high"], s["weight_bounds_source"]) == (0.1, 0.5, "config")
    s = glad_method_settings(build_config("glad", "tiny", {"train": {"category": "tile"}}), {})
    assert (s["weight_mode"], s["weight_low"], s["weight_bounds_source"]) == ("minmax", None, "none")


def test_glad_export_verb(tmp_path, capsys):
    import argparse

    from edgeinspect.export.cli import add_export_parser

    ap = argparse.ArgumentParser(prog="edgeinspect")
    add_export_parser(ap.add_subparsers(dest="verb", required=True))
    args = ap.parse_args(["export", "--model", str(tiny_glad_bundle()[0]), "--out", str(tmp_path / "b"), "--quiet",
                          "--threads", "1"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "(glad, preset tiny" in out and "unet_plain" in out
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["method"] == "glad" and manifest["precisions"] == ["fp32"]
    assert manifest["method_settings"]["adp_threshold"] is not None


def test_glad_bundle_calibrates_and_gives_verdicts(tmp_path):
    from edgeinspect.calibration.calibrate import calibrate_bundle
    from edgeinspect.runtime.detector import bundle_pipeline

    dst = tmp_path / "bundle"
    shutil.copytree(tiny_glad_bundle()[1], dst)
    normals = sorted((SAMPLE / "train" / "good").glob("*.jpg"))[:20]
    cal = calibrate_bundle(dst, normals, target_frr=0.1, threads=1)
    assert cal["image"]["n"] == 20 and cal["image"]["guaranteed"] and cal["settings"]["method"] == "glad"
    r = bundle_pipeline(dst, intra_op_threads=1)(sample_frames()[:4])
    thr = cal["verdict"]["image_threshold"]
    assert r.verdicts == ["NG" if s > thr else "OK" for s in r.scores.tolist()]
    assert r.normalized_scores.shape == (4,) and (r.fire_step >= 0).all()


def test_glad_vae_roundtrip_reference_through_the_bundle(bundle):
    """scoring.reference is a loop setting: the bundle's graphs serve it, torch and onnxruntime agree."""
    from edgeinspect.runtime.detector import bundle_pipeline
    from edgeinspect.runtime.run_detector import model_pipeline
    from edgeinspect.runtime.torch_backend import load_glad

    over = {"scoring": {"reference": "vae_roundtrip"}}
    cfg, model, extra = load_glad(tiny_glad_bundle()[0], over)
    frames = sample_frames()[:3]
    ref = model_pipeline(cfg, model, glad_features(cfg), threshold=extra["adp_threshold"])(frames)
    got = bundle_pipeline(bundle, overrides=over, intra_op_threads=1)(frames)
    assert got.timings_ms["decode"] > 0
    assert (got.scores - ref.scores).abs().max() <= SCORE_TOL
    assert (got.maps - ref.maps).abs().max() <= SCORE_TOL
    plain = bundle_pipeline(bundle, intra_op_threads=1)(frames)
    assert torch.equal(plain.fire_step, got.fire_step) and not torch.allclose(plain.maps, got.maps)


def test_an_anchored_glad_model_exports_its_anchor_roles(tmp_path):
    """GLAD registers the anchored autoencoder's resize encoder and decoder (scoring.encoder/decoder anchor) like
    DiAD: exported with their role signatures, the encoder's graph matching torch; a KL autoencoder has none."""
    import edgeinspect.export.glad  # noqa: F401  (registers the GLAD roles: roles.py loads only DiAD's itself)
    from edgeinspect.export.methods import build_role_exports
    from edgeinspect.export.onnx import export_onnx, parity_report
    from edgeinspect.export.roles import ExportContext
    from edgeinspect.models.glad import GLADModel

    roles = ["vae_anchor_encoder", "vae_anchor_decoder"]
    torch.manual_seed(0)
    cfg = build_config("glad", "tiny", {"model": {"vae": {"kind": "anchored"}}})
    specs = build_role_exports("glad", ExportContext(cfg, GLADModel(cfg).eval(), None, None), roles)
    for role in roles:
        assert (specs[role].input_names, specs[role].output_names) == ROLE_SIGNATURES[role]
        assert not specs[role].fp16 and specs[role].pipeline
    spec = specs["vae_anchor_encoder"]
    graph = export_onnx(spec.module, spec.inputs, tmp_path / "enc.onnx", spec.output_names, spec.dynamic_axes,
                        probe=spec.probe)
    err, scale = parity_report(spec.module, graph.path, [spec.inputs, spec.probe], spec.output_names, threads=1)
    assert err["latent"] <= FP32_BOUND[0] + FP32_BOUND[1] * scale["latent"] and scale["latent"] > 0.01
    kl = build_config("glad", "tiny")
    with pytest.raises(KeyError, match="does not apply"):
        build_role_exports("glad", ExportContext(kl, GLADModel(kl).eval(), None, None), roles[:1])
