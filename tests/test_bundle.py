"""The deployable bundle: the same DiAD loop through torch and onnxruntime, fp16 vs fp32, refusal of
tampered or mismatched bundles, calibration slot, atomic writes.

Measured on the tiny preset with the 20 test frames of data/mtd_sample at 64 px (CPU):
torch vs onnxruntime fp32 scores differ by at most 5.4e-7 (maps 7.7e-7, reconstructions 1.5e-6),
bounded here by 1e-4; fp16 vs fp32 scores by 4.0e-4 (bound 5e-3, maps 1.6e-3), anomaly-map
correlation >= 0.99999 (bound 0.99).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeinspect.runtime.bundle_loading import MANIFEST, BundleError, load_bundle, manifest_digest, verify_bundle
from edgeinspect.runtime.detector import bundle_pipeline
try:  # tests/ as a package (tests/__init__.py) or as plain test files
    from tests.test_export import tiny_bundle, tiny_features
except ImportError:
    from test_export import tiny_bundle, tiny_features

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "mtd_sample"
SCORE_TOL = 1e-4




@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    from edgeinspect.data.mvtec import image_to_tensor, read_image, resize_image

    paths = sorted((SAMPLE / "test").rglob("*.jpg"))
    assert len(paths) >= 8
    return torch.stack([image_to_tensor(resize_image(read_image(p), 64)) for p in paths])


@pytest.fixture(scope="module")
def results(frames):
    from edgeinspect.runtime.run_detector import model_pipeline
    from edgeinspect.runtime.torch_backend import load_diad

    run, bundle_dir = tiny_bundle()
    cfg, model = load_diad(run)
    torch_res = model_pipeline(cfg, model, tiny_features())(frames)
    bundle = load_bundle(bundle_dir)
    ort32 = bundle_pipeline(bundle, "onnxruntime", precision="fp32", intra_op_threads=1)(frames)
    ort16 = bundle_pipeline(bundle, "onnxruntime", precision="fp16", intra_op_threads=1)(frames)
    return torch_res, ort32, ort16


@pytest.fixture
def copy(tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle()[1], dst)
    return dst


def test_manifest_describes_the_bundle():
    b = load_bundle(tiny_bundle()[1])
    m = b.manifest
    assert (m["method"], m["preset"], m["image_size"], m["latent_size"], m["feature_size"]) == ("diad", "tiny", 64, 32, 64)
    assert set(m["versions"]) >= {"edgeinspect", "torch", "onnx", "onnxruntime", "diffusers"}
    assert m["precisions"] == ["fp32", "fp16"] and m["calibration"] is None
    on_disk = {p.relative_to(b.path).as_posix() for p in b.path.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m["files"]) == on_disk and all(len(h) == 64 for h in m["files"].values())
    assert b.context.shape == (1, 4, 16) and b.config.inference.steps == 2
    settings = json.loads((b.path / "settings.json").read_text())
    assert set(settings) >= {"scheduler", "inference", "scoring"}
    assert not [p for p in b.path.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_torch_and_onnxruntime_give_the_same_scores(results):
    torch_res, ort32, _ = results
    assert torch_res.scores.shape == ort32.scores.shape == (20,)
    assert (ort32.scores - torch_res.scores).abs().max() <= SCORE_TOL
    assert (ort32.maps - torch_res.maps).abs().max() <= SCORE_TOL
    assert (ort32.reconstructions - torch_res.reconstructions).abs().max() <= SCORE_TOL
    assert torch_res.scores.std() > 0.05  # scores differ between frames: the comparison means something
    assert set(ort32.timings_ms) == {"encode", "denoise", "decode", "features", "scoring"}


def test_fp16_maps_correlate_and_verdicts_match(results):
    _, ort32, ort16 = results
    assert torch.isfinite(ort16.maps).all()
    for a, b in zip(ort32.maps.numpy(), ort16.maps.numpy()):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99
    # no calibrated threshold yet: take one splitting the frames roughly in half, at the widest gap between
    # consecutive fp32 scores in the middle half (as a calibrated threshold sits between the classes)
    s = ort32.scores.sort().values
    n = len(s)
    lo, hi = n // 4, 3 * n // 4
    i = lo + int((s[lo + 1:hi + 1] - s[lo:hi]).argmax())
    threshold = float(s[i] + s[i + 1]) / 2
    assert torch.equal(ort32.scores > threshold, ort16.scores > threshold)
    assert 0 < int((ort32.scores > threshold).sum()) < n
    assert (ort16.scores - ort32.scores).abs().max() < 5e-3


def test_overrides_change_settings_not_networks(frames):
    pipe = bundle_pipeline(tiny_bundle()[1], overrides={"inference": {"steps": 1}}, intra_op_threads=1)
    assert len(pipe.timesteps) == 1 and pipe(frames[:2]).scores.shape == (2,)
    with pytest.raises(BundleError, match="baked into the graphs"):
        load_bundle(tiny_bundle()[1], overrides={"model": {"image_size": 128}})


def test_torch_backend_cannot_run_from_a_bundle():
    with pytest.raises(BundleError, match="torch backend cannot run from a bundle.*load_diad"):
        bundle_pipeline(tiny_bundle()[1], backend="torch")


def test_a_changed_byte_in_a_graph_is_refused(copy):
    f = copy / "onnx" / "unet.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"file onnx/unet\.onnx does not match its sha256"):
        load_bundle(copy)
    with pytest.raises(BundleError, match=r"onnx/unet\.onnx"):
        bundle_pipeline(copy)


@pytest.mark.parametrize("field,value", [("image_size", 128), ("preset", "edge"), ("calibration", {"image": 0.5})])
def test_an_edited_manifest_is_refused(copy, field, value):
    m = json.loads((copy / MANIFEST).read_text())
    m[field] = value
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest.json was modified after export"):
        load_bundle(copy)


@pytest.mark.parametrize("victim", ["onnx/features.fp16.onnx", "context.safetensors", "config.json"])
def test_a_missing_file_is_refused(copy, victim):
    (copy / victim).unlink()
    with pytest.raises(BundleError, match=f"file {victim} listed in manifest.json is missing"):
        load_bundle(copy)


def _resign(bundle: Path, edit) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    edit(m)
    m["manifest_sha256"] = manifest_digest(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["versions"].update(edgeinspect="1.0.0"), "written by edgeinspect 1.0.0.*major versions differ"),
    (lambda m: m.update(schema_version=99), "schema_version 99 is not supported"),
    (lambda m: m.update(opset=11), "opset 11 is outside what this runtime supports"),
    (lambda m: m.update(format="something-else"), "format is 'something-else'"),
    (lambda m: m.pop("networks"), "field 'networks' is missing"),
    (lambda m: m["files"].pop("onnx/unet.onnx"), r"onnx/unet\.onnx is used but has no sha256"),
    (lambda m: m["files"].update({"../escape": "0" * 64}), "points outside the bundle"),
])
def test_a_mismatched_bundle_is_refused(copy, edit, message):
    _resign(copy, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_calibration_slot(copy):
    from edgeinspect.runtime.bundle_update import set_calibration

    cal = {"image_threshold": 0.91, "normalization": {"mean": 0.8, "std": 0.1}}
    set_calibration(copy, cal, files={"normal_scores.json": b"[0.8, 0.9]"})
    b = load_bundle(copy)
    assert b.calibration == cal and "calibration/normal_scores.json" in b.manifest["files"]
    (copy / "onnx" / "hint_encoder.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="hint_encoder"):  # never re-signs a tampered bundle
        set_calibration(copy, {"image_threshold": 1.0})


def test_engines_folder_is_a_cache_not_part_of_the_bundle(copy):
    (copy / "engines").mkdir()
    (copy / "engines" / "unet.fp16.0123.engine").write_bytes(b"built on the target")
    verify_bundle(copy)


def test_export_is_atomic(tmp_path, monkeypatch):
    import edgeinspect.export.fp16 as fp16
    from edgeinspect.export.bundle import export_bundle

    def broken(*a, **k):
        raise fp16.Fp16ConversionError("simulated failure half-way")

    monkeypatch.setattr(fp16, "convert_onnx_fp16", broken)
    with pytest.raises(fp16.Fp16ConversionError):
        export_bundle(tiny_bundle()[0], tmp_path / "b", ("fp32", "fp16"), features=tiny_features(), threads=1)
    assert list(tmp_path.iterdir()) == []  # neither a half bundle nor a temporary folder


def test_ort_networks_from_onnx_files(frames):
    from edgeinspect.runtime.ort_backend import OrtNetwork, ort_networks

    onnx_dir = tiny_bundle()[1] / "onnx"
    nets = ort_networks({r: onnx_dir / f"{r}.onnx" for r in ("vae_encoder", "vae_decoder")}, intra_op_threads=1)
    assert isinstance(nets["vae_encoder"], OrtNetwork) and nets.device.type == "cpu"
    z = nets["vae_encoder"](image=frames[:2])["latent"]
    assert z.shape == (2, 4, 32, 32) and z.dtype == torch.float32
    assert nets["vae_decoder"](latent=z)["image"].shape == (2, 3, 64, 64)
    with pytest.raises(TypeError, match="missing inputs"):
        nets["vae_encoder"](latent=z)


def test_gpu_providers_need_onnxruntime_gpu():
    import onnxruntime as ort

    from edgeinspect.runtime.ort_backend import ProviderUnavailableError, resolve_providers

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    for request in (["cuda"], ["tensorrt"], [("CUDAExecutionProvider", {"device_id": 0})]):
        with pytest.raises(ProviderUnavailableError, match="pip install 'edgeinspect\\[gpu\\]'.*onnxruntime-gpu"):
            resolve_providers(request)
    with pytest.raises(ProviderUnavailableError):
        bundle_pipeline(tiny_bundle()[1], providers=["cuda"])
    assert resolve_providers(None) == [("CPUExecutionProvider", {})]


def test_bundle_with_external_data(tmp_path, monkeypatch, frames, results):
    """Graphs over 2 GB (sd15) take the external-data path everywhere: export, path-based type inference
    for fp16, hashing, loading. Forced here on the tiny model by lowering the threshold."""
    import edgeinspect.export.onnx as onnx_export
    from edgeinspect.export.bundle import export_bundle

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = export_bundle(tiny_bundle()[0], tmp_path / "b", ("fp32", "fp16"), features=tiny_features(), threads=1)
    b = load_bundle(out)
    # every graph with weights (bank_distance has none: its bank is an input)
    assert all(e["external_data"] for r, e in b.manifest["networks"].items() if r != "bank_distance")
    assert "onnx/unet.fp16.onnx.data" in b.manifest["files"]
    _, ort32, ort16 = results
    for precision, ref in (("fp32", ort32), ("fp16", ort16)):
        got = bundle_pipeline(b, precision=precision, intra_op_threads=1)(frames[:3])
        assert (got.scores - ref.scores[:3]).abs().max() <= SCORE_TOL
    (out / "onnx" / "unet.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"onnx/unet\.onnx\.data listed in manifest.json is missing"):
        load_bundle(out)


def test_provider_fallbacks_and_options(monkeypatch):
    import edgeinspect.runtime.ort_backend as ob

    monkeypatch.setattr(ob, "available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    got = ob.resolve_providers([("trt", {"trt_fp16_enable": False})], device_id=1, trt_options={"trt_engine_cache_enable": True})
    assert [n for n, _ in got] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert got[0][1]["device_id"] == 1 and got[0][1]["trt_engine_cache_enable"] and got[0][1]["trt_fp16_enable"] is False
    assert got[1][1]["device_id"] == 1
    assert [n for n, _ in ob.resolve_providers(["cuda"])] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if not torch.cuda.is_available():  # GPU providers keep tensors on the device: torch must see the GPU
        with pytest.raises(ob.ProviderUnavailableError, match="needs a CUDA GPU visible to torch"):
            ob._device_for(got)


def test_vae_roundtrip_reference_through_the_bundle(frames):
    """scoring.reference is a loop setting: the same graphs serve it, and torch and onnxruntime agree."""
    from edgeinspect.runtime.run_detector import model_pipeline
    from edgeinspect.runtime.torch_backend import load_diad

    over = {"scoring": {"reference": "vae_roundtrip"}}
    cfg, model = load_diad(tiny_bundle()[0], overrides=over)
    ref = model_pipeline(cfg, model, tiny_features())(frames[:3])
    got = bundle_pipeline(tiny_bundle()[1], overrides=over, intra_op_threads=1)(frames[:3])
    assert (got.scores - ref.scores).abs().max() <= SCORE_TOL
