"""TensorRT engines from a bundle's ONNX graphs: optimisation profiles, timing cache, keyed engine cache.

Engines are specific to a GPU (compute capability), a TensorRT version and a profile, so they are
built on the target machine, never shipped: `pip install edgeinspect[gpu]` there, then
`edgeinspect export ... --engines`, or let the tensorrt backend build missing engines on first load.

Precision: TensorRT 11 removed the weak-typing builder flags (BuilderFlag.FP16/INT8 and the INT8
calibrator); networks are always strongly typed and take their precision from the ONNX graph. So
"fp16" builds from the bundle's fp16 ONNX variant (fragile ops already fp32 in it, float32 IO), and
"fp32" from the fp32 graphs; the VAE roles are fp32 in both. On TensorRT 10 the same graphs are built
with the STRONGLY_TYPED flag, so both versions give the same precision. "int8" builds from the
explicitly quantised (QuantizeLinear/DequantizeLinear) graphs that `edgeinspect calibrate --int8` writes
into the bundle (`edgeinspect.calibration.qdq`), and the roles left unquantised from their fp16 graph
(else fp32): `Bundle.variant`. There is no implicit INT8 (calibrator + INT8 flag): TensorRT 11 removed it.

The cache key is the sha256 of: ONNX file hash, the profile (min/opt/max of every input), precision,
GPU name and compute capability, TensorRT version and the builder options; any change builds anew.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeinspect.core.atomic import write_bytes_atomic
from edgeinspect.runtime.bundle_loading import Bundle, BundleError, TensorSpec, load_bundle, sha256_file

ENGINE_HINT = ("TensorRT engines are built on the target machine, for its GPU and TensorRT version: install the "
               "GPU extras there with `pip install edgeinspect[gpu]` and build them with "
               "`edgeinspect export --model RUN --out BUNDLE --engines` (or let the tensorrt backend build them on "
               "first load); on a machine without a GPU use the onnxruntime backend")
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")


class TensorRTUnavailableError(RuntimeError):
    pass


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailableError(f"the Python package 'tensorrt' is not installed. {ENGINE_HINT}") from None
    return trt


def engine_support_problems() -> list[str]:
    """What stops engines from being built or run here (empty: nothing)."""
    problems = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        problems.append("the Python package 'tensorrt' is not installed")
    if not torch.cuda.is_available():
        problems.append(f"no CUDA GPU is visible (torch.cuda.is_available() is False; torch {torch.__version__}, "
                        f"built with CUDA {torch.version.cuda})")
    return problems


def require_engine_support() -> None:
    problems = engine_support_problems()
    if problems:
        raise TensorRTUnavailableError(f"cannot build or run TensorRT engines here: {'; '.join(problems)}. {ENGINE_HINT}")


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class OptimizationProfile:
    shapes: tuple[tuple[str, ShapeRange], ...]

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {n: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for n, r in self.shapes}

    def ort_trt_options(self) -> dict[str, str]:
        """The same profile as onnxruntime TensorRT-provider options (trt_profile_{min,opt,max}_shapes)."""
        def fmt(which: str) -> str:
            return ",".join(f"{n}:{'x'.join(str(d) for d in getattr(r, which))}" for n, r in self.shapes)

        return {"trt_profile_min_shapes": fmt("min"), "trt_profile_opt_shapes": fmt("opt"),
                "trt_profile_max_shapes": fmt("max")}


def build_profile(inputs: Sequence[TensorSpec], max_batch: int, opt_batch: int | None = None, min_batch: int = 1,
                  batch_multiplier: int = 1) -> OptimizationProfile:
    """min/opt/max per input: the batch axis spans min_batch..max_batch (times the role's batch multiplier,
    e.g. 2 for the features network, which sees frames and reconstructions together); every other
    dynamic axis is pinned to the deployment size (`deploy_shape`); static axes stay as they are."""
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    shapes = []
    for spec in inputs:
        lo, mid, hi = [], [], []
        for d, deploy in zip(spec.shape, spec.deploy_shape, strict=True):
            if d == "batch":
                lo.append(min_batch * batch_multiplier)
                mid.append(opt_batch * batch_multiplier)
                hi.append(max_batch * batch_multiplier)
            elif isinstance(d, str):
                lo.append(deploy), mid.append(deploy), hi.append(deploy)
            else:
                lo.append(d), mid.append(d), hi.append(d)
        shapes.append((spec.name, ShapeRange(tuple(lo), tuple(mid), tuple(hi))))
    return OptimizationProfile(tuple(shapes))


def bundle_profiles(bundle: Bundle, max_batch: int | None = None, opt_batch: int | None = None,
                    roles: Sequence[str] | None = None) -> dict[str, OptimizationProfile]:
    max_batch = max_batch or bundle.batch_size
    opt_batch = min(opt_batch or max_batch, max_batch)
    scoring = getattr(bundle.config, "scoring", None)
    if scoring is not None and scoring.reference == "hybrid" and scoring.bank.feature_size and \
            scoring.bank.feature_size != (scoring.feature_size or bundle.config.model.image_size):
        raise BundleError(f"bundle {bundle.path}: the hybrid reference runs the feature extractor at two sizes "
                          f"(scoring.feature_size and scoring.bank.feature_size {scoring.bank.feature_size}), and a "
                          "TensorRT engine is pinned to one: export it with scoring.bank.feature_size equal to "
                          "scoring.feature_size, or run it on onnxruntime")
    out = {}
    for role in roles or bundle.pipeline_roles():
        entry = bundle.network(role)
        out[role] = build_profile(entry.inputs, max_batch, opt_batch, batch_multiplier=entry.batch_multiplier)
    return out


# --------------------------------------------------------------------------- cache keys


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    compute_capability: str  # "8.9"

    @classmethod
    def current(cls, device: int | str | torch.device = 0) -> "GpuIdentity":
        require_engine_support()
        major, minor = torch.cuda.get_device_capability(device)
        return cls(torch.cuda.get_device_name(device), f"{major}.{minor}")


def engine_cache_key(onnx_sha256: str, profile: OptimizationProfile, gpu: GpuIdentity, trt_version: str,
                     precision: str, builder_options: dict[str, Any] | None = None) -> str:
    body = {
        "onnx_sha256": onnx_sha256, "profile": profile.to_json(), "gpu": gpu.name,
        "compute_capability": gpu.compute_capability, "tensorrt": trt_version, "precision": precision,
        "builder": builder_options or {},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def engine_filename(role: str, precision: str, key: str) -> str:
    return f"{role}.{precision}.{key[:24]}.engine"


# --------------------------------------------------------------------------- building


def _has_qdq(onnx_path: Path) -> bool:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)


def build_engine(onnx_path: str | Path, profile: OptimizationProfile, *, precision: str = "fp16",
                 timing_cache: str | Path | None = None, workspace_bytes: int | None = None,
                 builder_optimization_level: int | None = None, log_level: str = "WARNING") -> bytes:
    """Serialized engine for one ONNX graph (its precision is the graph's: pass the fp16 variant for fp16,
    the Q/DQ variant for int8)."""
    require_engine_support()
    trt = import_tensorrt()
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"precision must be one of {ENGINE_PRECISIONS}, got {precision!r}")
    onnx_path = Path(onnx_path)
    if precision == "int8" and not _has_qdq(onnx_path):
        raise ValueError(f"{onnx_path.name}: INT8 needs an explicitly quantized ONNX (QuantizeLinear/"
                         "DequantizeLinear nodes): write it with `edgeinspect calibrate --int8`")
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external data is found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if builder_optimization_level is not None:
        config.builder_optimization_level = int(builder_optimization_level)
    p = builder.create_optimization_profile()
    for name, r in profile.shapes:
        p.set_shape(name, r.min, r.opt, r.max)
    config.add_optimization_profile(p)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name} (see the TensorRT log above)")
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def engine_precision_file(bundle: Bundle, role: str, precision: str) -> tuple[Path, str]:
    """The ONNX file an engine of `precision` is built from, and the precision that file really has (the
    VAE's "fp16" entry is its fp32 graph; "int8" is the role's Q/DQ graph, or its fp16/fp32 graph for a role
    left unquantised): `Bundle.variant`, whose BundleError (a ValueError) says what to export or calibrate."""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"precision must be one of {ENGINE_PRECISIONS}, got {precision!r}")
    return bundle.variant(role, precision)


def ensure_engine(bundle: Bundle, role: str, precision: str, profile: OptimizationProfile,
                  cache_dir: str | Path, *, build: bool = True, gpu: GpuIdentity | None = None,
                  **build_options: Any) -> Path:
    """The cached engine for (role, precision, profile) on this GPU/TensorRT, built when missing."""
    trt = import_tensorrt()
    cache_dir = Path(cache_dir)
    onnx_path, real_precision = engine_precision_file(bundle, role, precision)
    rel = str(onnx_path.relative_to(bundle.path))
    onnx_hash = bundle.manifest["files"].get(rel) or sha256_file(onnx_path)
    gpu = gpu or GpuIdentity.current()
    options = dict(build_options)
    key = engine_cache_key(onnx_hash, profile, gpu, trt.__version__, real_precision, options)
    path = cache_dir / engine_filename(role, real_precision, key)
    if path.is_file():
        return path
    if not build:
        raise FileNotFoundError(f"no TensorRT engine for {role} ({real_precision}) for this GPU/TensorRT/profile in "
                                f"{cache_dir}; build it with `edgeinspect export ... --engines`")
    data = build_engine(onnx_path, profile, precision=real_precision, timing_cache=cache_dir / "timing.cache",
                        **build_options)
    write_bytes_atomic(path, data)
    meta = {"role": role, "precision": real_precision, "onnx": rel, "onnx_sha256": onnx_hash,
            "profile": profile.to_json(), "gpu": gpu.name, "compute_capability": gpu.compute_capability,
            "tensorrt": trt.__version__, "builder": options, "key": key}
    write_bytes_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True).encode())
    return path


def build_bundle_engines(bundle: Bundle | str | Path, precision: str = "fp16", max_batch: int | None = None,
                         opt_batch: int | None = None, cache_dir: str | Path | None = None,
                         roles: Sequence[str] | None = None, **build_options: Any) -> dict[str, Path]:
    """Build (or find) the engines of every pipeline role of a bundle; default cache: <bundle>/engines."""
    require_engine_support()
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    cache_dir = Path(cache_dir) if cache_dir else bundle.path / "engines"
    profiles = bundle_profiles(bundle, max_batch, opt_batch, roles)
    gpu = GpuIdentity.current()
    return {role: ensure_engine(bundle, role, precision, prof, cache_dir, gpu=gpu, **build_options)
            for role, prof in profiles.items()}
