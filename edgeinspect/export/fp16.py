"""fp16 variants of ONNX graphs for onnxruntime (and the strongly typed TensorRT builds).

The conversion is onnxconverter-common's float16 pass as shipped inside onnxruntime
(`onnxruntime.transformers.float16`, so no extra package): weights and activations become fp16 except

* numerically fragile ops (`FP16_OP_BLOCK_LIST`: the norms, whose variance of large activations
  overflows fp16; Softmax, Exp/Pow/Sqrt/ReduceMean/Erf), which stay fp32 behind Cast nodes;
* the timestep path (every node that depends on the `timestep` input and on no other data input): the
  sinusoidal embedding multiplies t up to 999 by frequencies, and an fp16 t*f has an error of up to
  0.25 rad, which would scramble the embedding;
* graph inputs and outputs (keep_io_types), so callers pass and get float32 whatever the variant.

The VAE encoder/decoder are not converted at all (their roles declare fp16=False).

Before a variant is written it is checked on sample inputs, and refused (`Fp16ConversionError`,
nothing written) when
* an intermediate tensor that the variant computes in fp16 exceeds the fp16 range in the fp32 graph
  (the activation scan: device independent, since onnxruntime's CPU provider runs many fp16 nodes in
  fp32 behind inserted casts, where an overflow would not show), or
* the variant's outputs have NaN/Inf or differ from the fp32 graph's beyond the bound.

Two fixes to the converter's output: when one fp16 tensor feeds two blocked nodes it emits two
identical Cast nodes (same name, same output: an invalid graph), and it appends Cast nodes out of
topological order; duplicates are dropped and the nodes re-sorted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgeinspect.export import onnx as onnx_export
from edgeinspect.export.onnx import ort_session, save_onnx, tensor_bytes

# Kept fp32 on top of the converter's own block list (ops with no fp16 kernels: Range, CumSum, TopK...).
FP16_OP_BLOCK_LIST: tuple[str, ...] = (
    "InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax", "Exp", "Pow", "Sqrt", "Reciprocal", "ReduceMean", "ReduceSum", "ReduceL2",
    "Erf", "Sin", "Cos",
)
FP32_ONLY_INPUTS_DEFAULT: tuple[str, ...] = ("timestep",)
FP16_MAX = 65504.0


class Fp16ConversionError(RuntimeError):
    pass


@dataclass
class Fp16Report:
    max_abs_error: dict[str, float] = field(default_factory=dict)  # per output, vs the fp32 graph
    output_scale: dict[str, float] = field(default_factory=dict)  # max |fp32 output|
    kept_fp32_nodes: int = 0
    converted_nodes: int = 0
    activation_peak: float = 0.0  # max |x| over the tensors computed in fp16, in the fp32 graph
    activation_peak_tensor: str = ""

    def to_json(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "output_scale": self.output_scale,
                "kept_fp32_nodes": self.kept_fp32_nodes, "converted_nodes": self.converted_nodes,
                "activation_peak": self.activation_peak, "activation_peak_tensor": self.activation_peak_tensor}


def nodes_fed_only_by(graph: onnx.GraphProto, inputs: Iterable[str]) -> list[str]:
    """Names of nodes whose data dependencies are the given graph inputs only (shape reads, constants and
    initializers do not count as data)."""
    wanted = set(inputs)
    deps: dict[str, frozenset[str]] = {i.name: frozenset({i.name}) for i in graph.input}
    out = []
    for node in graph.node:
        d: set[str] = set()
        for name in node.input:
            d |= deps.get(name, frozenset())
        if node.op_type in ("Shape", "Size"):
            d = set()
        for name in node.output:
            deps[name] = frozenset(d)
        if d and d <= wanted:
            out.append(node.name)
    return out


def _dedupe_and_sort(graph: onnx.GraphProto) -> None:
    seen: set[bytes] = set()
    nodes = []
    for n in graph.node:
        key = n.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            nodes.append(n)
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise Fp16ConversionError(f"fp16 graph has nodes with unresolved inputs: {[n.name for n in rest[:5]]}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    names: set[str] = set()
    for i, n in enumerate(graph.node):  # node names must stay unique
        if n.name in names:
            n.name = f"{n.name}_{i}"
        names.add(n.name)


def blocked(model: onnx.ModelProto, op_block_list: Sequence[str] = FP16_OP_BLOCK_LIST,
            fp32_only_inputs: Sequence[str] = FP32_ONLY_INPUTS_DEFAULT,
            node_block_list: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(op types, node names) that stay fp32: the block list plus the converter's own, and the nodes fed
    only by `fp32_only_inputs` plus `node_block_list`."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    ops = sorted(set(op_block_list) | set(DEFAULT_OP_BLOCK_LIST))
    input_names = {i.name for i in model.graph.input}
    nodes = list(dict.fromkeys([*node_block_list,
                                *nodes_fed_only_by(model.graph, [n for n in fp32_only_inputs if n in input_names])]))
    return ops, nodes


def to_fp16_model(model: onnx.ModelProto, op_block_list: Sequence[str] = FP16_OP_BLOCK_LIST,
                  fp32_only_inputs: Sequence[str] = FP32_ONLY_INPUTS_DEFAULT,
                  node_block_list: Sequence[str] = ()) -> tuple[onnx.ModelProto, int]:
    """The fp16 model (float32 IO) and the number of nodes kept in fp32; `model` is not modified."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    ops, nodes = blocked(model, op_block_list, fp32_only_inputs, node_block_list)
    kept = len(set(nodes) | {n.name for n in model.graph.node if n.op_type in set(ops)})
    typed = bool(model.graph.value_info)  # types already inferred (infer_types): no second inference
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m16 = convert_float_to_float16(m, keep_io_types=True, op_block_list=ops, node_block_list=nodes,
                                   disable_shape_infer=typed)
    _dedupe_and_sort(m16.graph)
    return m16, kept


def _run(path: Path, feeds: Sequence[dict[str, np.ndarray]], threads: int | None,
         outputs: Sequence[str] | None = None) -> list[list[np.ndarray]]:
    sess = ort_session(path, threads=threads)
    return [sess.run(list(outputs) if outputs else None, f) for f in feeds]


def infer_types(model: onnx.ModelProto, src: str | Path | None = None) -> onnx.ModelProto:
    """The model with value_info (type and shape) for its intermediate tensors; by path for graphs over
    the protobuf limit (`src`: the file `model` was loaded from, its external data beside it)."""

    if src is None or tensor_bytes(model) <= onnx_export.EXTERNAL_DATA_THRESHOLD:  # read at call time (tests lower it)
        return onnx.shape_inference.infer_shapes(model)
    src = Path(src)
    fd, tmp = tempfile.mkstemp(prefix=".inferred-", suffix=".onnx", dir=src.parent)  # beside its data
    os.close(fd)
    try:
        onnx.shape_inference.infer_shapes_path(str(src), tmp)
        return onnx.load(tmp)
    finally:
        os.unlink(tmp)


def fp16_tensors(model: onnx.ModelProto, op_block_list: Sequence[str], node_block_list: Sequence[str]
                 ) -> list[str]:
    """Float tensors that the fp16 variant computes in fp16: outputs of nodes that are not blocked
    (`model` with inferred types, see `infer_types`)."""
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*model.graph.value_info, *model.graph.output)}
    blocked_ops, blocked_nodes = set(op_block_list), set(node_block_list)
    graph_outputs = {o.name for o in model.graph.output}
    return [o for n in model.graph.node if n.op_type not in blocked_ops and n.name not in blocked_nodes
            for o in n.output if o and o not in graph_outputs and types.get(o) == onnx.TensorProto.FLOAT]


def activation_peaks(model: onnx.ModelProto, tensors: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
                     threads: int | None = None, chunk: int = 512) -> dict[str, float]:
    """max |x| of each named intermediate tensor of the (fp32) model over the sample inputs (`model` with
    inferred types, see `infer_types`); run in chunks of `chunk` extra outputs to bound the memory held."""
    peaks: dict[str, float] = {}
    infos = {vi.name: vi for vi in model.graph.value_info}
    tensors = [t for t in tensors if t in infos]
    with tempfile.TemporaryDirectory(prefix=".fp16-scan-") as d:
        for start in range(0, len(tensors), chunk):
            names = list(tensors[start:start + chunk])
            m = onnx.ModelProto()
            m.CopyFrom(model)
            m.graph.output.extend(infos[n] for n in names)
            path = Path(d) / f"scan{start}.onnx"
            save_onnx(m, path)
            for outs in _run(path, feeds, threads, names):
                for name, x in zip(names, outs):
                    if x.size:
                        v = float(np.nanmax(np.abs(x))) if np.isfinite(x).all() else float("inf")
                        peaks[name] = max(peaks.get(name, 0.0), v)
    return peaks


def convert_onnx_fp16(src: str | Path, dst: str | Path, sample_inputs: Sequence[dict[str, np.ndarray]], *,
                      op_block_list: Sequence[str] = FP16_OP_BLOCK_LIST,
                      fp32_only_inputs: Sequence[str] = FP32_ONLY_INPUTS_DEFAULT,
                      node_block_list: Sequence[str] = (), atol: float = 1e-2, rtol: float = 5e-2,
                      threads: int | None = None, scan_activations: bool = True,
                      activation_margin: float = 0.5) -> Fp16Report:
    """Write an fp16 variant of `src` to `dst` after checking it on `sample_inputs`.

    Refuses (Fp16ConversionError, `dst` not written) when a tensor computed in fp16 reaches
    `activation_margin` x 65504 in the fp32 graph (headroom for inputs beyond the samples), when an
    output is non-finite, or when an output's max abs error exceeds atol + rtol * max|fp32 output|."""
    src, dst = Path(src), Path(dst)
    if not sample_inputs:
        raise Fp16ConversionError("the fp16 check needs at least one set of sample inputs")
    model = infer_types(onnx.load(str(src)), src)
    ops, nodes = blocked(model, op_block_list, fp32_only_inputs, node_block_list)
    report = Fp16Report()
    if scan_activations:
        peaks = activation_peaks(model, fp16_tensors(model, ops, nodes), sample_inputs, threads)
        if peaks:
            report.activation_peak_tensor, report.activation_peak = max(peaks.items(), key=lambda kv: kv[1])
        over = {n: v for n, v in peaks.items() if not v < FP16_MAX * activation_margin}
        if over:
            worst = sorted(over.items(), key=lambda kv: -kv[1])[:3]
            raise Fp16ConversionError(
                f"{src.name}: intermediate tensor(s) {', '.join(f'{n} (max |x| {v:.4g})' for n, v in worst)} "
                f"exceed the fp16 range ({FP16_MAX * activation_margin:g}) on the sample inputs; variant not written "
                "(keep the producing ops in fp32 with op_block_list/node_block_list)")
    m16, kept = to_fp16_model(model, op_block_list, fp32_only_inputs, node_block_list)
    report.kept_fp32_nodes, report.converted_nodes = kept, len(model.graph.node) - kept
    out_names = [o.name for o in model.graph.output]
    # the candidate is written under its final name in a private folder (external data is referenced by
    # file name), checked, then moved into place
    tmp_dir = Path(tempfile.mkdtemp(prefix=".fp16-", dir=dst.parent))
    try:
        candidate = tmp_dir / dst.name
        files = save_onnx(m16, candidate)
        ref = _run(src, sample_inputs, threads)
        got = _run(candidate, sample_inputs, threads)
        for k, name in enumerate(out_names):
            r = [np.asarray(o[k], np.float32) for o in ref]
            g = [np.asarray(o[k], np.float32) for o in got]
            bad = [i for i, x in enumerate(g) if not np.isfinite(x).all()]
            if bad:
                raise Fp16ConversionError(
                    f"{src.name}: fp16 output {name!r} has NaN/Inf on sample input set(s) {bad} (an fp16 overflow); "
                    "variant not written (block the overflowing ops with op_block_list/node_block_list)")
            peak = max((float(np.abs(x).max()) for x in g if x.size), default=0.0)
            if peak >= FP16_MAX:
                raise Fp16ConversionError(f"{src.name}: fp16 output {name!r} reaches {peak:g}, the fp16 limit; "
                                          "variant not written")
            err = max((float(np.abs(a - b).max()) for a, b in zip(r, g) if a.size), default=0.0)
            scale = max((float(np.abs(a).max()) for a in r if a.size), default=0.0)
            report.max_abs_error[name] = err
            report.output_scale[name] = scale
            if err > atol + rtol * scale:
                raise Fp16ConversionError(
                    f"{src.name}: fp16 output {name!r} differs from fp32 by {err:.4g} (scale {scale:.4g}, bound "
                    f"{atol} + {rtol} x scale); variant not written")
        for f in reversed(files):  # the data file first: the graph never points at a missing file
            os.replace(f, dst.parent / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return report
