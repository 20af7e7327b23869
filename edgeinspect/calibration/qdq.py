"""Explicit INT8 for TensorRT: Q/DQ graphs written with onnxruntime's quantisation tooling, calibrated on the
same images as the thresholds, stored in the bundle beside the fp32/fp16 graphs.

    quantize_bundle("bundles/diad_mtd", normal_image_paths)          # edgeinspect calibrate --int8
    build_bundle_engines("bundles/diad_mtd", precision="int8")       # on the line PC's GPU

TensorRT 11 has no implicit INT8 (no IInt8EntropyCalibrator2, no INT8 builder flag): a strongly typed
network takes INT8 from QuantizeLinear/DequantizeLinear nodes in the ONNX. `quantize_qdq` writes such a
graph with `onnxruntime.quantization.quantize_static` in the form TensorRT builds from:

    format          QDQ; activations and weights int8, symmetric (zero point 0, which TensorRT requires);
                    weights per output channel
    what            the inputs of Conv, Gemm and MatMul with a constant weight (`QDQ_OP_TYPES`,
                    `prepare_for_qdq`): the layers with the arithmetic. Everything else stays float:
                    normalisations, softmax, the attention products of two activations, the timestep
                    embedding's sin/cos, residual adds (TensorRT still fuses around them). Outputs are not
                    quantised (a DQ before the next layer's input is where TensorRT wants it) and biases
                    stay float (TensorRT folds them into the layer; it has no int32 DequantizeLinear).
    calibration     entropy (default; the TensorRT calibrator's criterion), percentile or min-max, over
                    batches of a `CalibrationBatchStream`: the pipeline's own preprocessing of the normal
                    images for image networks (VAE encoder, features), inputs recorded from the fp32
                    pipeline running on those images for the UNet (latents at every step, timesteps,
                    context, hint). Histograms are collected batch by batch (memory: one batch of
                    intermediate tensors).

The activation ranges are cached (`CalibrationCache`, engines/int8/<role>.ranges.json: a target-machine
cache, not hashed) under a key of the fp32 graph's sha256, the images' sha256, the method and the
quantisation settings (`int8_cache_key`; for recorded inputs also what makes them). A rerun with the same
inputs leaves an up-to-date int8 graph alone, and rewriting one (`force`, or its manifest entry gone) reuses
the cached ranges without calibrating. The int8 graph goes to onnx/int8/<role>-<hash>/ (a new folder per
graph, so replacing one is crash-safe) with a manifest entry (`set_int8_variants`: hashed, so loading
refuses it when tampered) recording the method, the data, the key and how far its outputs are from the fp32
graph's on calibration batches (`vs_fp32`).

Roles: `default_int8_roles` = the pipeline's UNet (unet / unet_plain), VAE encoder and feature extractor.
The VAE decoder stays out: its output is the reconstruction the anomaly map is measured against, so its
error adds to every anomaly map directly (and the VAE is the role the fp16 export already keeps fp32). The
hint encoder is small and may be added by name. Roles without an int8 graph run from their fp16 graph (else
fp32) when a backend is asked for "int8" (`Bundle.variant`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgeinspect.calibration.calibrate import load_frames
from edgeinspect.calibration.int8 import (
    CalibrationBatchStream,
    CalibrationCache,
    Feeds,
    bundle_image_preprocess,
    calibration_cache_key,
    record_role_inputs,
)
from edgeinspect.runtime.bundle_loading import BundleError, load_bundle, sha256_file
from edgeinspect.runtime.bundle_update import set_int8_variants
from edgeinspect.runtime.detector import bundle_pipeline

INT8_METHODS = ("entropy", "percentile", "minmax")
QDQ_OP_TYPES = ("Conv", "Gemm", "MatMul")
INT8_ROLE_CANDIDATES = ("unet", "unet_plain", "vae_encoder", "features")
QDQ_FORMAT = 1  # bump when the quantisation settings change: old caches and int8 graphs are then redone
RANGES_DIR = Path("engines") / "int8"
# The calibrator's batches, not the deployment batch: intermediate tensors of one batch are held at once.
DEFAULT_BATCH = 4
DEFAULT_MAX_ITEMS = 512  # recorded UNet inputs (frames x steps) are subsampled evenly to this many


def qdq_extra_options() -> dict[str, Any]:
    """onnxruntime quantize_static extra_options for a TensorRT-ready Q/DQ graph (see the module docstring)."""
    return {
        "ActivationSymmetric": True, "WeightSymmetric": True, "CalibTensorRangeSymmetric": True,
        "QuantizeBias": False, "OpTypesToExcludeOutputQuantization": list(QDQ_OP_TYPES),
        # collect per batch: histograms are merged, memory holds one batch of intermediates
        "CalibStridedMinMax": 1,
    }


def prepare_for_qdq(src: str | Path, dst: str | Path, external_data: bool = False) -> list[str]:
    """Copy `src` to `dst` ready for the quantizer; return the nodes to leave in float.

    The TorchScript exporter hands shared weights (the ControlNet's copy of the UNet's) to their layers
    through Identity nodes; the quantizer would take such a weight for an activation (per-tensor, calibrated
    range), so every use of an Identity of an initializer is pointed at the initializer itself. Unnamed
    nodes get names (exclusion works by name). Excluded: MatMuls whose second input is not a weight (the
    attention products of two activations; onnxruntime's MatMulConstBOnly applies to QOperator only)."""
    import onnx

    m = onnx.load(str(src), load_external_data=True)
    g = m.graph
    inits = {t.name for t in g.initializer}
    alias: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "Identity" and len(n.input) == 1:
            root = alias.get(n.input[0], n.input[0])
            if root in inits:
                alias[n.output[0]] = root
    outputs = {o.name for o in g.output}
    keep = []
    for i, n in enumerate(g.node):
        if n.op_type == "Identity" and n.output[0] in alias and n.output[0] not in outputs:
            continue
        for j, name in enumerate(n.input):
            if name in alias:
                n.input[j] = alias[name]
        if not n.name:
            n.name = f"{n.op_type}_{i}"
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    exclude = [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] not in inits]
    dst = Path(dst)
    if external_data:
        onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data")
    else:
        onnx.save_model(m, str(dst))
    return exclude


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    if name not in INT8_METHODS:
        raise ValueError(f"INT8 calibration method must be one of {INT8_METHODS}, got {name!r}")
    return {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax}[name]


def _reader_class() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    class StreamDataReader(CalibrationDataReader):
        """A CalibrationBatchStream as onnxruntime's CalibrationDataReader (len/set_range for strided
        collection); counts the batches it hands out."""

        def __init__(self, stream: CalibrationBatchStream):
            self.stream = stream
            self._end = len(stream)
            self._next = 0
            self.batches_read = 0

        def __len__(self) -> int:
            return len(self.stream)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._next, self._end = int(start_index), min(int(end_index), len(self.stream))

        def get_next(self) -> Feeds | None:
            if self._next >= self._end:
                return None
            self._next += 1
            self.batches_read += 1
            return self.stream.batch(self._next - 1)

    return StreamDataReader


def stream_data_reader(stream: CalibrationBatchStream) -> Any:
    return _reader_class()(stream)


class _DropPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # the graphs are quantised as exported, on purpose
        return "pre-processing before quantization" not in record.getMessage()


@contextmanager
def _quiet_quantizer():
    root = logging.getLogger()
    f = _DropPreprocessAdvice()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def quantize_qdq(src: str | Path, dst: str | Path,
                 stream: CalibrationBatchStream | Callable[[], CalibrationBatchStream],
                 cache: CalibrationCache | None = None, *, method: str = "entropy",
                 external_data: bool = False) -> dict[str, Any]:
    """Write the TensorRT-ready Q/DQ int8 graph of `src` to `dst`, calibrated on `stream` (or a function that
    makes it: not called when `cache` holds ranges under its key, so a cached run records nothing).
    `external_data`: keep the weights in `<dst>.data` (a source over 2 GB needs it for calibration).
    Returns {"calibrated": ran the calibrator, "batches": batches read, "summary": qdq_summary(dst)}."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    calibrate_method = _method(method)
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cached = cache.read() if cache is not None else None
    reader = None
    with tempfile.TemporaryDirectory(prefix=".ranges-", dir=dst.parent) as tmp:
        ranges = Path(tmp) / "ranges.json"  # onnxruntime reads it when present, else writes it
        if cached is not None:
            ranges.write_bytes(cached)
        else:
            reader = stream_data_reader(stream() if callable(stream) else stream)
        prepared = Path(tmp) / "prepared.onnx"
        exclude = prepare_for_qdq(src, prepared, external_data)
        with _quiet_quantizer():
            quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QDQ_OP_TYPES), nodes_to_exclude=exclude,
                            per_channel=True, reduce_range=False,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            use_external_data_format=external_data, calibrate_method=calibrate_method,
                            calibration_providers=["CPUExecutionProvider"], extra_options=qdq_extra_options(),
                            calibration_cache_path=ranges)
        if cached is None and cache is not None:
            cache.write(ranges.read_bytes())
    summary = qdq_summary(dst)
    if not summary["symmetric_int8"]:
        raise RuntimeError(f"{dst.name}: the quantizer wrote non-int8 or non-zero zero points; TensorRT needs "
                           "symmetric int8 Q/DQ")
    if summary["quantize_linear"] == 0:
        raise RuntimeError(f"{dst.name}: nothing was quantised (no {'/'.join(QDQ_OP_TYPES)} layers with weights)")
    return {"calibrated": cached is None, "batches": 0 if reader is None else reader.batches_read,
            "summary": summary}


def qdq_summary(path: str | Path) -> dict[str, Any]:
    """What a Q/DQ graph holds: QuantizeLinear/DequantizeLinear counts, per-channel DQs, quantised layers by
    type, and whether every zero point is int8 and 0 (`symmetric_int8`). Runs onnx.checker (by path)."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    onnx.checker.check_model(str(path))
    m = onnx.load(str(path), load_external_data=True)
    inits = {t.name: t for t in m.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant" and n.attribute}
    produced_by_dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    zps_ok, per_channel, counts = True, 0, {"QuantizeLinear": 0, "DequantizeLinear": 0}
    for n in m.graph.node:
        if n.op_type not in counts:
            continue
        counts[n.op_type] += 1
        zp = inits.get(n.input[2]) if len(n.input) > 2 else None
        zp = zp if zp is not None else consts.get(n.input[2]) if len(n.input) > 2 else None
        if zp is None:  # no zero point: uint8 by the ONNX default, never what TensorRT wants
            zps_ok = False
            continue
        z = numpy_helper.to_array(zp)
        zps_ok &= z.dtype == np.int8 and not z.any()
        if n.op_type == "DequantizeLinear" and z.size > 1:
            per_channel += 1
    layers: dict[str, list[int]] = {}
    for n in m.graph.node:
        if n.op_type in QDQ_OP_TYPES:
            done, total = layers.setdefault(n.op_type, [0, 0])
            layers[n.op_type] = [done + int(any(i in produced_by_dq for i in n.input[:2])), total + 1]
    return {"quantize_linear": counts["QuantizeLinear"], "dequantize_linear": counts["DequantizeLinear"],
            "per_channel": per_channel, "symmetric_int8": bool(zps_ok),
            "layers": {k: {"quantized": v[0], "total": v[1]} for k, v in sorted(layers.items())}}


def compare_graphs(reference: str | Path, candidate: str | Path, batches: Sequence[Feeds],
                   threads: int | None = None) -> dict[str, dict[str, float]]:
    """Per output, over `batches`: the candidate's error against the reference on onnxruntime CPU:
    rel_rms = ||c - r|| / ||r||, corr = Pearson correlation, max_abs = max |c - r| (and ref_max_abs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in (reference, candidate)]
    names = [o.name for o in sessions[0].get_outputs()]
    ref: dict[str, list[np.ndarray]] = {n: [] for n in names}
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for b in batches:
        for store, sess in ((ref, sessions[0]), (got, sessions[1])):
            for n, v in zip(names, sess.run(names, b)):
                store[n].append(np.asarray(v, np.float64).ravel())
    out = {}
    for n in names:
        r, c = np.concatenate(ref[n]), np.concatenate(got[n])
        d = c - r
        corr = float(np.corrcoef(r, c)[0, 1]) if r.std() > 0 and c.std() > 0 else float("nan")
        out[n] = {"rel_rms": float(np.linalg.norm(d) / max(np.linalg.norm(r), 1e-30)), "corr": corr,
                  "max_abs": float(np.abs(d).max()), "ref_max_abs": float(np.abs(r).max())}
    return out


# --------------------------------------------------------------------------- a bundle


def default_int8_roles(bundle: Any) -> list[str]:
    """The pipeline's roles worth INT8 by default: the UNet, the VAE encoder and the feature extractor."""
    pipeline = bundle.pipeline_roles()
    return [r for r in INT8_ROLE_CANDIDATES if r in pipeline]


def spread_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return np.unique(np.linspace(0, n - 1, k).round().astype(int)).tolist()


def _recording_pipeline(bundle: Any, role: str, threads: int | None, pipe_cache: dict[str, Any]) -> Any:
    """The bundle's fp32 pipeline that runs `role`: as the bundle scores, or, when that runs without it (the
    bank reference runs no diffusion; the anchor encoder stands in for the full one), the papers' scoring with
    the full encoder, which runs every method network."""
    def build(overrides: dict | None) -> Any:
        return bundle_pipeline(bundle, "onnxruntime", precision="fp32", intra_op_threads=threads, verdict=False,
                               overrides=overrides)

    if "pipe" not in pipe_cache:
        pipe_cache["pipe"] = build(None)
    if role in pipe_cache["pipe"].nets:
        return pipe_cache["pipe"]
    if "pipe.all" not in pipe_cache:
        pipe_cache["pipe.all"] = build({"scoring": {"reference": "reconstruction", "encoder": "full"}})
    return pipe_cache["pipe.all"]


def _recorded_items(bundle: Any, role: str, images: Sequence[Path], max_items: int, batch_size: int,
                    threads: int | None, pipe_cache: dict[str, Any]) -> list[Feeds]:
    """`role`'s inputs recorded from the bundle's fp32 pipeline on (an even spread of) the images, then
    subsampled evenly to max_items: enough frames for max_items calls, not every image."""

    pipe = _recording_pipeline(bundle, role, threads, pipe_cache)
    per_frame = max(1, len(getattr(pipe, "timesteps", ()) or ()))
    frames = [images[i] for i in spread_indices(len(images), math.ceil(max_items / per_frame))]
    items: list[Feeds] = []
    size = getattr(pipe, "frame_size", None) or bundle.config.model.image_size
    for s in range(0, len(frames), batch_size):
        items += record_role_inputs(pipe, role, load_frames(frames[s:s + batch_size], size), batch_size=batch_size)
    return [items[i] for i in spread_indices(len(items), max_items)]


def int8_cache_key(bundle: Any, role: str, image_sha256: Sequence[str], method: str, batch_size: int,
                   max_items: int) -> str:
    """What a role's ranges (and int8 graph) depend on: its fp32 graph, the images, the method, the batches,
    the quantisation settings and onnxruntime; for inputs recorded from the pipeline also everything that
    makes them (the pipeline's fp32 graphs, the context, the inference settings) and the cap."""
    import onnxruntime

    files = bundle.manifest["files"]
    entry = bundle.network(role)
    recorded = None
    if entry.input_names != ("image",):
        graphs = {r: files[bundle.network(r).files["fp32"]] for r in bundle.pipeline_roles()}
        recorded = {"graphs": graphs, "context": files[bundle.manifest["context"]["file"]],
                    "settings": files[bundle.manifest["settings"]], "max_items": max_items}
    return calibration_cache_key(
        format=QDQ_FORMAT, onnx_sha256=files[entry.files["fp32"]], images=list(image_sha256), method=method,
        batch_size=batch_size, op_types=list(QDQ_OP_TYPES), extra_options=qdq_extra_options(), per_channel=True,
        onnxruntime=onnxruntime.__version__, recorded=recorded)


def quantize_bundle(bundle_dir: str | Path, images: Sequence[str | Path], roles: Sequence[str] | None = None, *,
                    method: str = "entropy", batch_size: int = DEFAULT_BATCH, max_items: int = DEFAULT_MAX_ITEMS,
                    threads: int | None = None, force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Write the int8 Q/DQ graph of each role (default: `default_int8_roles`) into a verified bundle,
    calibrated on `images` (the normal images the thresholds are fitted on), and record them in its
    manifest. A role whose int8 graph is already up to date (same key) is left alone unless `force`.
    Returns role -> {"status": "calibrated" | "from cache" | "up to date", "file", the manifest record}."""

    _method(method)
    if batch_size < 1 or max_items < 1:
        raise ValueError(f"batch_size and max_items must be >= 1, got {batch_size} and {max_items}")
    bundle = load_bundle(bundle_dir)
    images = [Path(p) for p in images]
    if not images:
        raise ValueError("no calibration images for INT8")
    roles = list(roles) if roles else default_int8_roles(bundle)
    for role in roles:
        entry = bundle.network(role)  # BundleError names the roles there are
        if not entry.pipeline:
            raise BundleError(f"bundle {bundle.path}: {role!r} is not run by the pipeline; INT8 is calibrated for "
                              f"pipeline roles ({', '.join(bundle.pipeline_roles())})")
    image_sha = [sha256_file(p) for p in images]
    stage = bundle.path.parent / f".{bundle.path.name}.int8-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    results: dict[str, Any] = {}
    staged: dict[str, tuple[list[Path], dict[str, Any]]] = {}
    pipe_cache: dict[str, Any] = {}
    todo = roles
    if progress:
        from tqdm import tqdm

        todo = tqdm(roles, desc="int8", unit="net")
    try:
        for role in todo:
            entry = bundle.network(role)
            key = int8_cache_key(bundle, role, image_sha, method, batch_size, max_items)
            prev = bundle.manifest["networks"][role].get("int8") or {}
            if not force and "int8" in entry.files and prev.get("key") == key:
                results[role] = {"status": "up to date", "file": entry.files["int8"], **prev}
                continue
            recorded = entry.input_names != ("image",)
            made: dict[str, CalibrationBatchStream] = {}

            def make_stream(role=role, entry=entry, recorded=recorded, made=made) -> CalibrationBatchStream:
                if "s" not in made:
                    if recorded:
                        items = _recorded_items(bundle, role, images, max_items, batch_size, threads, pipe_cache)
                        made["s"] = CalibrationBatchStream(items, lambda x: x, batch_size, entry.input_names)
                    else:
                        made["s"] = CalibrationBatchStream(images, bundle_image_preprocess(bundle, role), batch_size)
                return made["s"]

            cache = CalibrationCache(bundle.path / RANGES_DIR / f"{role}.ranges.json", key)
            external = bool(bundle.manifest["networks"][role].get("external_data", False))
            dst = stage / f"{role}.int8.onnx"
            out = quantize_qdq(bundle.path / entry.files["fp32"], dst, make_stream, cache, method=method,
                               external_data=external)
            stream = make_stream()  # the error figures below need inputs even when the ranges were cached
            vs = compare_graphs(bundle.path / entry.files["fp32"], dst,
                                [stream.batch(i) for i in range(min(2, len(stream)))], threads)
            record = {
                "key": key, "method": method, "format": QDQ_FORMAT,
                "calibration": {"images": len(images), "items": len(stream.items),
                                "inputs": "recorded from the fp32 pipeline on the images" if recorded
                                else "the images, preprocessed as the pipeline does",
                                "ranges_cache": (RANGES_DIR / f"{role}.ranges.json").as_posix()},
                "quantization": {"format": "QDQ", "activations": "int8 symmetric per tensor",
                                 "weights": "int8 symmetric per output channel", "op_types": list(QDQ_OP_TYPES),
                                 "matmul": "constant weights only", "bias": "float", **out["summary"]},
                "vs_fp32": {"batches": min(2, len(stream)), "outputs": vs},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            files = [dst] + ([dst.with_name(dst.name + ".data")] if dst.with_name(dst.name + ".data").exists() else [])
            staged[role] = (files, record)
            results[role] = {"status": "calibrated" if out["calibrated"] else "from cache",
                             "file": f"onnx/{dst.name}", **record}
        if staged:
            manifest = set_int8_variants(bundle.path, staged)
            for role in staged:
                results[role]["file"] = manifest["networks"][role]["files"]["int8"]
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return results
