"""INT8 for TensorRT without a GPU: the calibration data (batches, the keyed cache, the pipeline's
preprocessing, inputs recorded from the pipeline) and the explicit Q/DQ graphs written into a bundle with
onnxruntime's quantize_static, run here on onnxruntime CPU.

Measured on the tiny DiAD bundle (random weights), calibrated with entropy on 8 of data/mtd_sample's
train/good images and evaluated on the 8 test/good images (held out) against the fp32 graphs: relative RMS
error 0.04-0.07 and correlation >= 0.997 for the feature maps, 0.05 / 0.998 for the VAE encoder's latent,
0.11 / 0.994 for the UNet's noise prediction (inputs recorded from the fp32 pipeline on the held-out
images). The bounds below leave about 2x room: rel. RMS <= 0.15 (features, encoder), <= 0.25 (UNet),
correlation >= 0.99 (0.98 for the UNet); the int8 pipeline's anomaly scores correlate with the fp32
pipeline's at >= 0.9.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeinspect.calibration.int8 import (
    CalibrationBatchStream,
    CalibrationCache,
    bundle_image_preprocess,
    calibration_cache_key,
    image_preprocess,
    record_role_inputs,
)

try:
    from tests.test_export import tiny_bundle
except ImportError:
    from test_export import tiny_bundle

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "mtd_sample"




def _items(n: int, shape=(3, 4, 4)) -> list[np.ndarray]:
    return [np.full(shape, i, np.float32) for i in range(n)]


def test_stream_batches_the_last_one_short_or_dropped_and_reset():
    s = CalibrationBatchStream(_items(10), lambda x: x, batch_size=4)
    assert len(s) == 3 and s.input_names == ("image",)
    b1, b2, b3 = s.next_batch(), s.next_batch(), s.next_batch()
    assert s.next_batch() is None
    assert b1["image"].shape == (4, 3, 4, 4) and b1["image"].dtype == np.float32 and b1["image"].flags.c_contiguous
    assert b1["image"][:, 0, 0, 0].tolist() == [0, 1, 2, 3] and b2["image"][:, 0, 0, 0].tolist() == [4, 5, 6, 7]
    assert b3["image"][:, 0, 0, 0].tolist() == [8, 9]  # short: no item repeated
    s.reset()
    assert s.next_batch()["image"][0, 0, 0, 0] == 0
    assert [b["image"][0, 0, 0, 0] for b in s] == [0, 4, 8]  # iterating starts over
    assert s.batch(1)["image"][:, 0, 0, 0].tolist() == [4, 5, 6, 7]
    with pytest.raises(IndexError):
        s.batch(3)
    fixed = CalibrationBatchStream(_items(10), lambda x: x, batch_size=4, drop_last=True)
    assert len(fixed) == 2 and [len(b["image"]) for b in fixed] == [4, 4]
    assert len(CalibrationBatchStream(_items(100), lambda x: x, 4, max_batches=5)) == 5


def test_stream_checks_items():
    with pytest.raises(ValueError, match="fewer than one batch"):
        CalibrationBatchStream(_items(3), lambda x: x, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="no calibration items"):
        CalibrationBatchStream([], lambda x: x, batch_size=1)
    mixed = CalibrationBatchStream([np.zeros((3, 4, 4)), np.zeros((3, 5, 5))], lambda x: x, batch_size=2)
    with pytest.raises(ValueError, match=r"item 1 .*shape \(3, 5, 5\).*\(3, 4, 4\)"):
        mixed.next_batch()
    two = CalibrationBatchStream(_items(2), lambda x: {"sample": x}, 1, input_names=("sample", "timestep"))
    with pytest.raises(KeyError, match="timestep"):
        two.next_batch()


def test_stream_of_named_inputs():
    s = CalibrationBatchStream(range(6), lambda i: {"sample": np.full((4, 2, 2), i), "timestep": np.float32(10 * i)},
                               batch_size=3, input_names=("sample", "timestep"))
    b = s.next_batch()
    assert b["sample"].shape == (3, 4, 2, 2) and b["timestep"].tolist() == [0.0, 10.0, 20.0]


def test_image_preprocessing_is_the_pipelines():
    from edgeinspect.data.mvtec import image_to_tensor, read_image, resize_image

    p = sorted((SAMPLE / "train" / "good").glob("*.jpg"))[0]
    got = image_preprocess(64)(p)["image"]
    ref = image_to_tensor(resize_image(read_image(p), 64)).numpy()
    assert got.shape == (3, 64, 64) and np.array_equal(got, ref)
    from edgeinspect.runtime.bundle_loading import load_bundle

    b = load_bundle(tiny_bundle()[1])
    assert bundle_image_preprocess(b, "features")(p)["image"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="record_role_inputs"):
        bundle_image_preprocess(b, "unet")


def test_cache_round_trip_and_key(tmp_path):
    path = tmp_path / "engines" / "int8" / "vae_encoder.ranges.json"
    key = calibration_cache_key(onnx_sha256="ab" * 32, images=["a.png", "b.png"], method="entropy")
    assert key != calibration_cache_key(onnx_sha256="ab" * 32, images=["a.png"], method="entropy")
    assert key != calibration_cache_key(onnx_sha256="ab" * 32, images=["a.png", "b.png"], method="minmax")
    c = CalibrationCache(path, key)
    assert c.read() is None
    c.write(b'{"ranges": 1}')
    assert c.read() == b'{"ranges": 1}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["vae_encoder.ranges.json", "vae_encoder.ranges.json.json"]
    assert CalibrationCache(path, "another key").read() is None  # made for another graph/images: recalibrate
    assert CalibrationCache(path).read() is not None  # unkeyed: any result
    path.write_bytes(b'{"ranges": 2}')  # replaced without its key (a write killed in between): not trusted
    assert c.read() is None
    c.write(b'{"ranges": 1}')
    c.meta_path.write_text("{broken")
    assert c.read() is None


def test_unet_inputs_recorded_from_the_pipeline():
    from edgeinspect.data.mvtec import image_to_tensor, read_image, resize_image
    from edgeinspect.runtime.detector import bundle_pipeline

    pipe = bundle_pipeline(tiny_bundle()[1], intra_op_threads=1)
    frames = torch.stack([image_to_tensor(resize_image(read_image(p), 64))
                          for p in sorted((SAMPLE / "train" / "good").glob("*.jpg"))[:3]])
    before = pipe.nets
    items = record_role_inputs(pipe, "unet", frames, batch_size=2)
    assert pipe.nets is before
    steps = len(pipe.timesteps)
    assert len(items) == 3 * steps
    assert set(items[0]) == {"sample", "timestep", "encoder_hidden_states", "hint"}
    assert items[0]["sample"].shape == (4, 32, 32) and items[0]["timestep"].shape == ()
    stream = CalibrationBatchStream(items, lambda x: x, 2, input_names=tuple(items[0]))
    b = stream.next_batch()
    assert b["sample"].shape == (2, 4, 32, 32) and b["timestep"].shape == (2,)
    assert record_role_inputs(pipe, "unet", frames, max_items=2).__len__() == 2


# --------------------------------------------------------------------------- explicit Q/DQ graphs

TRAIN = sorted((SAMPLE / "train" / "good").glob("*.jpg"))  # 40 normals: the calibration images
HELD = sorted((SAMPLE / "test" / "good").glob("*.jpg"))  # 8 normals never calibrated on


@pytest.fixture
def calibrator_calls(monkeypatch):
    """Every onnxruntime calibrator quantize_static creates (none: the ranges came from the cache)."""
    import importlib

    ortq = importlib.import_module("onnxruntime.quantization.quantize")  # the package exports a function of that name
    calls, real = [], ortq.create_calibrator

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ortq, "create_calibrator", counting)
    return calls


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """The tiny bundle with int8 graphs of the default roles, calibrated (entropy) on 8 train/good images."""
    from edgeinspect.calibration.qdq import quantize_bundle

    dst = tmp_path_factory.mktemp("int8") / "bundle"
    shutil.copytree(tiny_bundle()[1], dst)
    return dst, quantize_bundle(dst, TRAIN[:8], threads=1)


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _errors(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(relative RMS error, Pearson correlation)"""
    ref, got = ref.ravel().astype(np.float64), got.ravel().astype(np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), float(np.corrcoef(ref, got)[0, 1])


def test_int8_graphs_are_symmetric_qdq_for_tensorrt(int8_bundle):
    import onnx
    from onnx import numpy_helper

    dst, results = int8_bundle
    assert list(results) == ["unet", "vae_encoder", "features"]  # the defaults: not the VAE decoder
    assert all(r["status"] == "calibrated" and r["method"] == "entropy" for r in results.values())
    assert results["unet"]["calibration"]["items"] == 8 * 2 and results["features"]["calibration"]["items"] == 8
    for role in results:
        path = dst / results[role]["file"]
        onnx.checker.check_model(str(path))
        m = onnx.load(str(path))
        inits = {t.name: t for t in m.graph.initializer}
        producer = {o: n for n in m.graph.node for o in n.output}
        qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert {n.op_type for n in qdq} == {"QuantizeLinear", "DequantizeLinear"}
        for n in qdq:  # symmetric int8: every zero point an int8 0 (no int32 bias DQ either)
            zp = numpy_helper.to_array(inits[n.input[2]])
            assert zp.dtype == np.int8 and not zp.any(), (role, n.name)
        for n in m.graph.node:
            if n.op_type == "Conv":  # activation and weight through DQ; weights int8 per output channel
                dq_x, dq_w = producer[n.input[0]], producer[n.input[1]]
                assert dq_x.op_type == dq_w.op_type == "DequantizeLinear", (role, n.name)
                w = numpy_helper.to_array(inits[dq_w.input[0]])
                assert w.dtype == np.int8 and numpy_helper.to_array(inits[dq_w.input[1]]).shape == (w.shape[0],)
            if n.op_type == "MatMul" and producer.get(n.input[1]) is not None \
                    and producer[n.input[1]].op_type != "DequantizeLinear":
                assert producer.get(n.input[0]) is None or producer[n.input[0]].op_type != "DequantizeLinear"
        layers = results[role]["quantization"]["layers"]
        assert layers["Conv"]["quantized"] == layers["Conv"]["total"] > 0
    unet = results["unet"]["quantization"]["layers"]
    assert 0 < unet["MatMul"]["quantized"] < unet["MatMul"]["total"]  # attention products stay float


def test_int8_outputs_follow_fp32_on_held_out_images(int8_bundle):
    from edgeinspect.calibration.calibrate import load_frames
    from edgeinspect.runtime.detector import bundle_pipeline
    from edgeinspect.runtime.bundle_loading import load_bundle

    dst, _ = int8_bundle
    b = load_bundle(dst)
    for role in ("vae_encoder", "features"):
        x = CalibrationBatchStream(HELD, bundle_image_preprocess(b, role), len(HELD)).batch(0)
        ref, got = _session(b.onnx_path(role)).run(None, x), _session(b.onnx_path(role, "int8")).run(None, x)
        for r, g in zip(ref, got):
            rel, corr = _errors(r, g)
            assert rel <= 0.15 and corr >= 0.99, (role, rel, corr)
    pipe = bundle_pipeline(b, intra_op_threads=1, verdict=False)
    items = record_role_inputs(pipe, "unet", load_frames(HELD[:4], 64), batch_size=4)
    x = CalibrationBatchStream(items, lambda i: i, len(items), b.network("unet").input_names).batch(0)
    ref, got = (_session(b.onnx_path("unet", p)).run(None, x)[0] for p in ("fp32", "int8"))
    rel, corr = _errors(ref, got)
    assert rel <= 0.25 and corr >= 0.98, (rel, corr)
    # the whole pipeline with precision "int8" (the VAE decoder and hint encoder from their fp16/fp32 graphs)
    frames = load_frames(sorted((SAMPLE / "test").rglob("*.jpg")), 64)
    fp32, int8 = pipe(frames), bundle_pipeline(b, precision="int8", intra_op_threads=1, verdict=False)(frames)
    assert np.corrcoef(fp32.scores.numpy(), int8.scores.numpy())[0, 1] >= 0.9
    assert _errors(fp32.maps.numpy(), int8.maps.numpy())[1] >= 0.97


def test_int8_ranges_cached_and_invalidated(int8_bundle, tmp_path, calibrator_calls):
    from edgeinspect.calibration.qdq import quantize_bundle
    from edgeinspect.core.atomic import write_json_atomic
    from edgeinspect.runtime.bundle_loading import MANIFEST
    from edgeinspect.runtime.bundle_update import finalize_manifest
    from edgeinspect.runtime.bundle_loading import load_bundle

    import onnx
    from onnx import numpy_helper

    dst = tmp_path / "bundle"
    shutil.copytree(int8_bundle[0], dst)
    graph = dst / load_bundle(dst).network("vae_encoder").files["int8"]
    before = graph.read_bytes()
    r = quantize_bundle(dst, TRAIN[:8], ["vae_encoder"], threads=1)["vae_encoder"]
    assert r["status"] == "up to date" and calibrator_calls == [] and graph.read_bytes() == before
    r = quantize_bundle(dst, TRAIN[:8], ["vae_encoder"], threads=1, force=True)["vae_encoder"]
    assert r["status"] == "from cache" and calibrator_calls == []  # rewritten from the cached ranges
    assert dst / r["file"] == graph and graph.read_bytes() == before  # same graph, same place
    key = r["key"]
    # other images: recalibrated, and the cache now holds their ranges
    r = quantize_bundle(dst, TRAIN[8:16], ["vae_encoder"], threads=1)["vae_encoder"]
    assert r["status"] == "calibrated" and len(calibrator_calls) == 1 and r["key"] != key
    assert r["file"] != graph.relative_to(dst).as_posix() and not graph.parent.exists()  # the replaced one is gone
    meta = json.loads((dst / "engines" / "int8" / "vae_encoder.ranges.json.json").read_text())
    assert meta["key"] == r["key"] == load_bundle(dst).manifest["networks"]["vae_encoder"]["int8"]["key"]
    # another graph (as a new export would write it): the cached ranges are not used
    m = onnx.load(str(dst / "onnx" / "vae_encoder.onnx"))
    w = next(t for t in m.graph.initializer if t.dims and len(t.dims) == 4)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.5, w.name))
    onnx.save(m, str(dst / "onnx" / "vae_encoder.onnx"))
    write_json_atomic(dst / MANIFEST, finalize_manifest(dst, json.loads((dst / MANIFEST).read_text())))
    r = quantize_bundle(dst, TRAIN[8:16], ["vae_encoder"], threads=1)["vae_encoder"]
    assert r["status"] == "calibrated" and len(calibrator_calls) == 2


def test_a_kill_while_storing_an_int8_graph_leaves_a_valid_bundle(int8_bundle, tmp_path, monkeypatch):
    import edgeinspect.runtime.bundle_update as bundle_mod
    from edgeinspect.calibration.qdq import quantize_bundle
    from edgeinspect.runtime.bundle_loading import load_bundle

    dst = tmp_path / "bundle"
    shutil.copytree(int8_bundle[0], dst)
    old = load_bundle(dst).network("vae_encoder").files["int8"]
    real = bundle_mod.finalize_manifest

    def killed(*args, **kwargs):  # the new graph is in the bundle, the manifest not yet replaced
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod, "finalize_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        quantize_bundle(dst, TRAIN[8:16], ["vae_encoder"], threads=1)
    b = load_bundle(dst)  # still verifies: the old graph was not overwritten
    assert b.network("vae_encoder").files["int8"] == old and (dst / old).is_file()
    assert len(list((dst / "onnx" / "int8").glob("vae_encoder-*"))) == 2  # the orphan, until the next call
    monkeypatch.setattr(bundle_mod, "finalize_manifest", real)
    r = quantize_bundle(dst, TRAIN[8:16], ["vae_encoder"], threads=1)["vae_encoder"]
    assert load_bundle(dst).network("vae_encoder").files["int8"] == r["file"] != old
    assert [p.name for p in (dst / "onnx" / "int8").glob("vae_encoder-*")] == [Path(r["file"]).parent.name]


def test_int8_graphs_are_hashed_and_tampering_refused(int8_bundle, tmp_path):
    from edgeinspect.calibration.qdq import quantize_bundle
    from edgeinspect.runtime.bundle_loading import MANIFEST, BundleError, load_bundle, sha256_file

    dst, results = int8_bundle
    b = load_bundle(dst)
    assert b.precisions == ["fp32", "fp16", "int8"]
    for role in results:
        rel = results[role]["file"]
        assert re.fullmatch(rf"onnx/int8/{role}-[0-9a-f]{{16}}/{role}\.int8\.onnx", rel)
        assert b.network(role).files["int8"] == rel and b.network(role).precision["int8"] == "int8"
        assert b.manifest["files"][rel] == sha256_file(dst / rel)
        assert b.manifest["networks"][role]["int8"]["vs_fp32"]["outputs"]
    assert "int8" not in b.network("vae_decoder").files
    tampered = tmp_path / "tampered"
    shutil.copytree(dst, tampered)
    unet_int8 = tampered / results["unet"]["file"]
    data = bytearray(unet_int8.read_bytes())
    data[-20] ^= 0xFF
    unet_int8.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"unet\.int8\.onnx does not match its sha256"):
        load_bundle(tampered)
    with pytest.raises(BundleError, match=r"unet\.int8\.onnx"):  # never re-signs a tampered bundle
        quantize_bundle(tampered, TRAIN[:8], ["vae_encoder"])
    edited = tmp_path / "edited"
    shutil.copytree(dst, edited)
    m = json.loads((edited / MANIFEST).read_text())
    m["networks"]["unet"]["files"]["int8"] = "onnx/unet.onnx"  # quietly run fp32 as "int8"
    (edited / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="modified after export"):
        load_bundle(edited)


def test_calibrate_verb_with_int8(tmp_path, capsys):
    import argparse

    from edgeinspect.calibration.cli import add_calibrate_parser
    from edgeinspect.runtime.bundle_loading import load_bundle

    ap = argparse.ArgumentParser(prog="edgeinspect")
    add_calibrate_parser(ap.add_subparsers(dest="verb", required=True))
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle()[1], dst)
    base = ["calibrate", "--bundle", str(dst), "--normals", str(SAMPLE / "train" / "good"), "--limit", "20",
            "--target-frr", "0.1", "--threads", "1", "--quiet"]
    args = ap.parse_args(base + ["--int8", "vae_encoder", "features", "--int8-images", "6"])
    assert args.int8 == ["vae_encoder", "features"] and args.precision is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "INT8 Q/DQ graphs from 6 of the normal images" in out
    assert "int8 vae_encoder" in out and "features.int8.onnx" in out and "calibrated (entropy" in out
    assert "calibrated on 20 normal images, scored with the int8 graphs" in out
    b = load_bundle(dst)
    assert b.calibration["settings"]["precision"] == "int8"
    assert {r for r, e in b.networks.items() if "int8" in e.files} == {"vae_encoder", "features"}
    args = ap.parse_args(base + ["--int8", "--dry-run"])
    assert args.int8 == [] and args.func(args) == 2
    assert "--dry-run" in capsys.readouterr().err
    args = ap.parse_args(base + ["--int8", "vae_decoder", "guidance"])
    assert args.func(args) == 2
    assert "'guidance' is not run by the pipeline" in capsys.readouterr().err
