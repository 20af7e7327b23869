"""TensorRT paths that need no GPU: optimisation profiles from the manifest, engine cache keys, the
engine cache lookup, the graphs and builder settings an int8 engine is built from (against a stand-in
tensorrt), and the clear error when tensorrt or a GPU is missing."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from edgeinspect.runtime.tensorrt_engines import (
    GpuIdentity, TensorRTUnavailableError, build_profile, bundle_profiles, engine_cache_key, engine_filename,
    engine_precision_file, engine_support_problems, ensure_engine, require_engine_support,
)
from edgeinspect.runtime.bundle_loading import BundleError, TensorSpec, load_bundle
try:  # tests/ as a package (tests/__init__.py) or as plain test files
    from tests.test_export import tiny_bundle
except ImportError:
    from test_export import tiny_bundle

NO_ENGINES = bool(engine_support_problems())
needs_no_engine_support = pytest.mark.skipif(not NO_ENGINES, reason="tensorrt and a GPU are present here")




@pytest.fixture(scope="module")
def bundle():
    return load_bundle(tiny_bundle()[1])


def test_profile_from_the_manifest(bundle):
    unet = build_profile(bundle.network("unet").inputs, max_batch=8, opt_batch=4)
    shapes = dict(unet.shapes)
    assert list(shapes) == ["sample", "timestep", "encoder_hidden_states", "hint"]
    assert (shapes["sample"].min, shapes["sample"].opt, shapes["sample"].max) == ((1, 4, 32, 32), (4, 4, 32, 32), (8, 4, 32, 32))
    assert (shapes["timestep"].min, shapes["timestep"].max) == ((1,), (8,))
    assert shapes["encoder_hidden_states"].max == (8, 4, 16)
    assert shapes["hint"].opt == (4, 16, 32, 32)
    # the features network sees frames and reconstructions together: twice the batch
    feats = dict(build_profile(bundle.network("features").inputs, 8, 4, batch_multiplier=2).shapes)
    assert (feats["image"].min, feats["image"].opt, feats["image"].max) == ((2, 3, 64, 64), (8, 3, 64, 64), (16, 3, 64, 64))


def test_bundle_profiles_default_to_the_inference_batch(bundle):
    profiles = bundle_profiles(bundle)
    assert set(profiles) == {"vae_encoder", "hint_encoder", "unet", "vae_decoder", "features", "bank_distance"}  # not guidance
    b = bundle.config.inference.batch_size
    assert dict(profiles["vae_encoder"].shapes)["image"].max == (b, 3, 64, 64)
    assert dict(profiles["features"].shapes)["image"].max == (2 * b, 3, 64, 64)
    assert dict(bundle_profiles(bundle, max_batch=16, opt_batch=2)["vae_decoder"].shapes)["latent"].opt == (2, 4, 32, 32)


def test_profile_validation_and_onnxruntime_options():
    spec = TensorSpec("image", ("batch", 3, "height", "width"), (1, 3, 128, 128))
    p = build_profile([spec], max_batch=4, opt_batch=2)
    assert p.ort_trt_options() == {"trt_profile_min_shapes": "image:1x3x128x128",
                                   "trt_profile_opt_shapes": "image:2x3x128x128",
                                   "trt_profile_max_shapes": "image:4x3x128x128"}
    assert p.to_json() == {"image": {"min": [1, 3, 128, 128], "opt": [2, 3, 128, 128], "max": [4, 3, 128, 128]}}
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        build_profile([spec], max_batch=2, opt_batch=4)


def test_cache_key_changes_with_every_component(bundle):
    profile = bundle_profiles(bundle)["unet"]
    base = dict(onnx_sha256="a" * 64, profile=profile, gpu=GpuIdentity("NVIDIA H100 80GB HBM3", "9.0"),
                trt_version="11.4.0.106", precision="fp16", builder_options={})
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**base) and len(key) == 64
    variants = {
        "onnx": dict(onnx_sha256="b" * 64),
        "profile": dict(profile=bundle_profiles(bundle, max_batch=8)["unet"]),
        "gpu name": dict(gpu=GpuIdentity("NVIDIA L4", "9.0")),
        "compute capability": dict(gpu=GpuIdentity("NVIDIA H100 80GB HBM3", "8.9")),
        "tensorrt": dict(trt_version="11.4.1.2"),
        "precision": dict(precision="fp32"),
        "builder": dict(builder_options={"workspace_bytes": 1 << 30}),
    }
    keys = {name: engine_cache_key(**{**base, **change}) for name, change in variants.items()}
    assert all(k != key for k in keys.values()), keys
    assert len(set(keys.values())) == len(keys)
    assert engine_filename("unet", "fp16", key) == f"unet.fp16.{key[:24]}.engine"


def test_engine_source_graphs(bundle):
    path, precision = engine_precision_file(bundle, "unet", "fp16")
    assert path.name == "unet.fp16.onnx" and precision == "fp16"
    path, precision = engine_precision_file(bundle, "vae_decoder", "fp16")  # the VAE stays fp32
    assert path.name == "vae_decoder.onnx" and precision == "fp32"
    with pytest.raises(BundleError, match=r"no int8 \(Q/DQ\) graphs.*calibrate .*--int8"):
        engine_precision_file(bundle, "unet", "int8")  # not calibrated for INT8: nothing to build from


@pytest.fixture
def fake_tensorrt(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "11.4.0.106"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def test_engine_cache_hit_and_miss(bundle, tmp_path, fake_tensorrt):
    gpu = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
    profile = bundle_profiles(bundle)["unet"]
    key = engine_cache_key(bundle.manifest["files"]["onnx/unet.fp16.onnx"], profile, gpu, "11.4.0.106", "fp16", {})
    with pytest.raises(FileNotFoundError, match="no TensorRT engine for unet.*--engines"):
        ensure_engine(bundle, "unet", "fp16", profile, tmp_path, gpu=gpu, build=False)
    cached = tmp_path / engine_filename("unet", "fp16", key)
    cached.write_bytes(b"engine")
    assert ensure_engine(bundle, "unet", "fp16", profile, tmp_path, gpu=gpu, build=False) == cached
    fake_tensorrt.__version__ = "11.5.0.1"  # another TensorRT: another key, the old engine is not used
    with pytest.raises(FileNotFoundError):
        ensure_engine(bundle, "unet", "fp16", profile, tmp_path, gpu=gpu, build=False)
    other_gpu = dataclasses.replace(gpu, compute_capability="8.9")
    fake_tensorrt.__version__ = "11.4.0.106"
    with pytest.raises(FileNotFoundError):
        ensure_engine(bundle, "unet", "fp16", profile, tmp_path, gpu=other_gpu, build=False)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """The tiny bundle with an int8 (Q/DQ) VAE encoder, as `edgeinspect calibrate --int8 vae_encoder` writes it."""
    import shutil
    from pathlib import Path

    from edgeinspect.calibration.qdq import quantize_bundle

    dst = tmp_path_factory.mktemp("trt-int8") / "bundle"
    shutil.copytree(tiny_bundle()[1], dst)
    train = sorted((Path(__file__).resolve().parents[1] / "data" / "mtd_sample" / "train" / "good").glob("*.jpg"))
    quantize_bundle(dst, train[:2], ["vae_encoder"], batch_size=2, threads=1)
    return load_bundle(dst)


def test_int8_engines_build_from_the_qdq_graphs(int8_bundle):
    from edgeinspect.runtime.tensorrt_engines import _has_qdq

    path, precision = engine_precision_file(int8_bundle, "vae_encoder", "int8")
    assert path.name == "vae_encoder.int8.onnx" and precision == "int8" and _has_qdq(path)
    # roles left unquantised: their fp16 graph (the VAE decoder's fp16 entry is its fp32 graph)
    path, precision = engine_precision_file(int8_bundle, "unet", "int8")
    assert path.name == "unet.fp16.onnx" and precision == "fp16" and not _has_qdq(path)
    path, precision = engine_precision_file(int8_bundle, "vae_decoder", "int8")
    assert path.name == "vae_decoder.onnx" and precision == "fp32"


def _stand_in_tensorrt(calls: dict) -> types.ModuleType:
    """Just enough of the tensorrt 11 builder API for build_engine, recording what it is asked."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.4.0.106"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Config:
        def set_flag(self, flag):
            calls.setdefault("builder_flags", []).append(flag)

        def add_optimization_profile(self, profile):
            pass

        def create_timing_cache(self, data):
            return data

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"timing")

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.setdefault("shapes", {})[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return "network"

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"serialized engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.setdefault("parsed", []).append(path)
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace(FP16=0, INT8=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    return trt


def test_int8_engine_build_configuration(int8_bundle, tmp_path, monkeypatch):
    """ensure_engine for precision int8 parses the Q/DQ graph into a strongly typed network with no
    builder precision flags (TensorRT 11 has none), and caches it under the int8 graph's hash."""
    import json

    import edgeinspect.runtime.tensorrt_engines as trt_mod
    from edgeinspect.runtime.tensorrt_engines import build_engine

    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", _stand_in_tensorrt(calls))
    monkeypatch.setattr(trt_mod, "require_engine_support", lambda: None)
    gpu = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
    profile = bundle_profiles(int8_bundle)["vae_encoder"]
    engine = ensure_engine(int8_bundle, "vae_encoder", "int8", profile, tmp_path, gpu=gpu)
    rel = int8_bundle.network("vae_encoder").files["int8"]
    qdq = int8_bundle.path / rel
    assert calls["parsed"] == [str(qdq)] and calls["network_flags"] == 1 << 1 and "builder_flags" not in calls
    b = int8_bundle.batch_size
    assert calls["shapes"]["image"] == ((1, 3, 64, 64), (b, 3, 64, 64), (b, 3, 64, 64))
    key = engine_cache_key(int8_bundle.manifest["files"][rel], profile, gpu, "11.4.0.106",
                           "int8", {})
    assert engine == tmp_path / engine_filename("vae_encoder", "int8", key)
    assert engine.read_bytes() == b"serialized engine"
    meta = json.loads(engine.with_suffix(".json").read_text())
    assert meta["onnx"] == rel and meta["precision"] == "int8"
    # a graph without Q/DQ nodes is refused for int8 before anything is built
    with pytest.raises(ValueError, match=r"vae_encoder\.onnx: INT8 needs an explicitly quantized ONNX.*--int8"):
        build_engine(int8_bundle.path / "onnx" / "vae_encoder.onnx", profile, precision="int8")
    assert calls["parsed"] == [str(qdq)]


@needs_no_engine_support
def test_no_gpu_or_no_tensorrt_is_a_clear_error():
    with pytest.raises(TensorRTUnavailableError) as err:
        require_engine_support()
    msg = str(err.value)
    assert "built on the target machine" in msg and "pip install edgeinspect[gpu]" in msg
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in msg


@needs_no_engine_support
def test_only_the_missing_part_is_named(fake_tensorrt):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    problems = engine_support_problems()
    assert len(problems) == 1 and "no CUDA GPU" in problems[0]


@needs_no_engine_support
def test_tensorrt_backend_and_engines_refuse_clearly(tmp_path):
    from edgeinspect.export.bundle import export_bundle
    from edgeinspect.runtime.tensorrt_engines import build_bundle_engines, build_engine
    from edgeinspect.runtime.detector import bundle_pipeline
    from edgeinspect.runtime.trt_backend import TensorRTNetwork, trt_networks

    b = tiny_bundle()[1]
    calls = [
        lambda: trt_networks(b),
        lambda: bundle_pipeline(b, backend="tensorrt"),
        lambda: build_bundle_engines(b),
        lambda: build_engine(b / "onnx" / "unet.onnx", bundle_profiles(load_bundle(b))["unet"]),
        lambda: TensorRTNetwork(b"not an engine"),
        lambda: export_bundle(tiny_bundle()[0], tmp_path / "out", engines=True),
    ]
    for call in calls:
        with pytest.raises(TensorRTUnavailableError, match=r"pip install edgeinspect\[gpu\]"):
            call()
    assert not (tmp_path / "out").exists()  # refused before exporting anything


@needs_no_engine_support
def test_export_verb_with_engines_says_why(tmp_path, capsys):
    import argparse

    from edgeinspect.export.cli import add_export_parser

    ap = argparse.ArgumentParser(prog="edgeinspect")
    add_export_parser(ap.add_subparsers(dest="verb", required=True))
    args = ap.parse_args(["export", "--model", str(tiny_bundle()[0]), "--out", str(tmp_path / "b"), "--engines"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "edgeinspect export:" in err and "built on the target machine" in err and "edgeinspect[gpu]" in err
    assert not (tmp_path / "b").exists()
