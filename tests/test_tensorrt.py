"""TensorRT paths that need no GPU: optimisation profiles from the manifest, engine cache keys, the
engine cache lookup, and the clear error when tensorrt or a GPU is missing."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from edgeinspect.export.tensorrt import (
    GpuIdentity,
    TensorRTUnavailableError,
    build_profile,
    bundle_profiles,
    engine_cache_key,
    engine_filename,
    engine_precision_file,
    engine_support_problems,
    ensure_engine,
    require_engine_support,
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
    assert set(profiles) == {"vae_encoder", "hint_encoder", "unet", "vae_decoder", "features"}  # not guidance
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
    from edgeinspect.export.tensorrt import build_bundle_engines, build_engine
    from edgeinspect.runtime.bundle_loading import bundle_pipeline
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
