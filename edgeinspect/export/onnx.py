"""torch module -> checked ONNX graph with named, dynamic inputs/outputs; torch/onnxruntime parity.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)` by default. For these networks
(diffusers' UNet2DConditionModel + the SG network, AutoencoderKL, timm EfficientNet with TF-SAME
padding) it traces in about a second per graph, keeps batch and height/width dynamic through the
`dynamic_axes` mapping (diffusers' shape-dependent Python branches and timm's padding arithmetic are
traced as shape ops, checked by the probe inputs at another batch and size), and needs nothing beyond
torch and onnx. The torch.export-based exporter (`exporter="dynamo"`) also gives matching graphs, but
needs the extra packages onnxscript and onnx-ir, takes 15-30x longer for the UNet, and dynamic
height/width there needs torch.export shape constraints; it stays available as an option.

Graphs whose weights exceed 2 GB (the protobuf limit; sd15's UNet in fp32 is 3.4 GB) are written with
their tensors in one external data file next to the graph (`<name>.onnx.data`), and checked by path.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

import edgeinspect
from edgeinspect.runtime.bundle_loading import NamedIO, TensorSpec

DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
# Protobuf cannot serialise a message of 2 GiB or more; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


class ExportError(RuntimeError):
    pass


@dataclass
class ExportedGraph(NamedIO):
    path: Path
    files: list[Path]  # the graph and its external data file, if any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    external_data: bool


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (list, tuple)):
        return tuple(out)
    raise ExportError(f"expected a tensor or a tuple of tensors from the module, got {type(out).__name__}")


def run_torch(module: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    module.eval()
    with torch.no_grad():
        return _as_tuple(module(*inputs.values()))


def _np_dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def io_specs(inputs: dict[str, torch.Tensor], dynamic_axes: dict[str, dict[int, str]], output_names: Sequence[str],
             ref: Sequence[torch.Tensor], ref_probe: Sequence[torch.Tensor] | None = None
             ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input specs from the declared dynamic axes; output specs from the outputs at two input sets: a
    dim that differs between them is dynamic, named like the input axis it follows where there is one."""
    in_specs = []
    named: dict[int, list[tuple[int, str]]] = {}  # example size -> (axis, name) of dynamic input axes
    for name, t in inputs.items():
        axes = dynamic_axes.get(name, {})
        shape = tuple(axes.get(i, int(d)) for i, d in enumerate(t.shape))
        deploy = tuple(1 if axes.get(i) == "batch" else int(d) for i, d in enumerate(t.shape))
        in_specs.append(TensorSpec(name, shape, deploy, _np_dtype_name(t)))
        for i, axis_name in axes.items():
            named.setdefault(int(t.shape[i]), []).append((int(i), axis_name))
    if len(ref) != len(output_names):
        raise ExportError(f"the module returns {len(ref)} outputs, {len(output_names)} names given ({list(output_names)})")
    out_specs = []
    for k, (name, t) in enumerate(zip(output_names, ref)):
        shape: list[int | str] = []
        for i, d in enumerate(t.shape):
            d = int(d)
            if ref_probe is None or int(ref_probe[k].shape[i]) == d:
                shape.append(d)
                continue
            same_axis = [n for a, n in named.get(d, []) if a == i]
            if i == 0 and "batch" in same_axis:
                shape.append("batch")
            elif same_axis:  # follows the input axis of the same index and size (e.g. latent_height)
                shape.append(same_axis[0])
            elif t.ndim == 4 and i in (2, 3):
                shape.append(f"{name}_{'height' if i == 2 else 'width'}")
            else:
                shape.append(f"{name}_dim{i}")
        deploy = tuple(1 if s == "batch" else int(d) for s, d in zip(shape, t.shape))
        out_specs.append(TensorSpec(name, tuple(shape), deploy, _np_dtype_name(t)))
    return tuple(in_specs), tuple(out_specs)


def _set_value_info_shape(vi: onnx.ValueInfoProto, shape: Sequence[int | str]) -> None:
    dims = vi.type.tensor_type.shape.dim
    del dims[:]
    for d in shape:
        dim = dims.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = int(d)


def set_io_shapes(model: onnx.ModelProto, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Write the spec shapes (named dynamic dims) onto the graph's inputs and outputs."""
    by_name = {t.name: t for t in (*inputs, *outputs)}
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name in by_name:
            _set_value_info_shape(vi, by_name[vi.name].shape)


def tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def save_onnx(model: onnx.ModelProto, path: str | Path, external_data: bool | None = None) -> list[Path]:
    """Save (external data in one `<name>.data` file when over the protobuf limit), then check by path."""
    path = Path(path)
    data_file = path.with_name(path.name + ".data")
    for p in (path, data_file):
        if p.exists():
            p.unlink()
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file.name, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))  # by path: works for graphs with external data over 2 GB
    return [path, data_file] if external_data else [path]


def _torch_export(module: nn.Module, inputs: dict[str, torch.Tensor], path: Path, output_names: Sequence[str],
                  dynamic_axes: dict[str, dict[int, str]], opset: int, exporter: str) -> None:
    args = tuple(inputs.values())
    with warnings.catch_warnings():
        # diffusers' shape checks and size asserts are traced as constants (TracerWarning); the legacy
        # exporter announces its deprecation; GroupNorm exports as InstanceNormalization "train=True".
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*ONNX export mode is set to TrainingMode.EVAL.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        with torch.no_grad():
            if exporter == "torchscript":
                torch.onnx.export(module, args, str(path), input_names=list(inputs), output_names=list(output_names),
                                  dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
            elif exporter == "dynamo":
                try:
                    import onnxscript  # noqa: F401
                except ImportError as e:
                    raise ExportError("exporter='dynamo' needs the packages onnxscript and onnx-ir "
                                      "(pip install onnxscript==0.7.2 onnx-ir==1.1.0); the default "
                                      "exporter='torchscript' needs neither") from e
                dim = torch.export.Dim.DYNAMIC
                shapes = {n: {a: dim for a in dynamic_axes.get(n, {})} or None for n in inputs}
                program = torch.onnx.export(module, args, input_names=list(inputs), output_names=list(output_names),
                                            dynamic_shapes=shapes, opset_version=max(opset, 18), dynamo=True,
                                            external_data=True, verbose=False)
                program.save(str(path), external_data=True)
            else:
                raise ExportError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")


def export_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], path: str | Path, output_names: Sequence[str],
                dynamic_axes: dict[str, dict[int, str]], *, probe: dict[str, torch.Tensor] | None = None,
                opset: int = DEFAULT_OPSET, exporter: str = "torchscript",
                metadata: dict[str, str] | None = None) -> ExportedGraph:
    """Export `module(*inputs.values())` to `path` with the given input/output names and dynamic axes.

    `probe`: inputs at another batch/size; the outputs there decide which output dims are dynamic (and
    a parity check at the probe shows the graph really is dynamic: see `onnx_parity`)."""
    if opset < DEFAULT_OPSET:
        raise ExportError(f"opset {opset} is below the supported minimum {DEFAULT_OPSET}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    ref = run_torch(module, inputs)
    ref_probe = run_torch(module, probe) if probe is not None else None
    in_specs, out_specs = io_specs(inputs, dynamic_axes, output_names, ref, ref_probe)
    axes: dict[str, dict[int, str]] = {n: dict(a) for n, a in dynamic_axes.items() if a}
    for spec in out_specs:
        if spec.dynamic_axes:
            axes[spec.name] = spec.dynamic_axes
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
    try:
        raw = tmp / "model.onnx"
        _torch_export(module, inputs, raw, output_names, axes, opset, exporter)
        model = onnx.load(str(raw))  # loads external data the exporter may have written beside it
        got_in = [i.name for i in model.graph.input]
        got_out = [o.name for o in model.graph.output]
        if got_in != list(inputs) or got_out != list(output_names):
            raise ExportError(f"exported graph has inputs {got_in} / outputs {got_out}, expected "
                              f"{list(inputs)} / {list(output_names)} (an unused input is dropped by the exporter)")
        set_io_shapes(model, in_specs, out_specs)
        props = {"edgeinspect_version": edgeinspect.__version__, "exporter": exporter, **(metadata or {})}
        onnx.helper.set_model_props(model, props)
        files = save_onnx(model, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    opset_found = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    return ExportedGraph(path, files, in_specs, out_specs, int(opset_found), len(files) > 1)


# --------------------------------------------------------------------------- parity


def ort_session(path: str | Path, providers: Sequence[Any] | None = None, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=list(providers or ["CPUExecutionProvider"]))


def parity_report(module: nn.Module, onnx_path: str | Path,
                  input_sets: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
                  output_names: Sequence[str] | None = None, providers: Sequence[Any] | None = None,
                  threads: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(max abs error, max |torch output|) per output, torch module vs ONNX graph in onnxruntime, over one
    or more input sets (one session for all)."""
    sets = [input_sets] if isinstance(input_sets, dict) else list(input_sets)
    sess = ort_session(onnx_path, providers, threads)
    names = list(output_names or [o.name for o in sess.get_outputs()])
    errors = dict.fromkeys(names, 0.0)
    scales = dict.fromkeys(names, 0.0)
    for inputs in sets:
        ref = run_torch(module, inputs)
        got = sess.run(names, {n: t.detach().cpu().numpy() for n, t in inputs.items()})
        for name, r, g in zip(names, ref, got, strict=True):
            r = r.detach().float().cpu().numpy()
            if r.shape != g.shape:
                raise ExportError(f"{Path(onnx_path).name}: output {name} has shape {g.shape} in onnxruntime, "
                                  f"{r.shape} in torch")
            if r.size:
                errors[name] = max(errors[name], float(np.abs(r - g.astype(np.float32)).max()))
                scales[name] = max(scales[name], float(np.abs(r).max()))
    return errors, scales


def onnx_parity(module: nn.Module, onnx_path: str | Path,
                inputs: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
                output_names: Sequence[str] | None = None, providers: Sequence[Any] | None = None,
                threads: int | None = None) -> dict[str, float]:
    """Max abs error per output between the torch module and the ONNX graph (onnxruntime) on `inputs`
    (one input set or several)."""
    return parity_report(module, onnx_path, inputs, output_names, providers, threads)[0]


def check_parity(errors: dict[str, float], scales: dict[str, float], what: str, atol: float = 1e-4,
                 rtol: float = 1e-3) -> None:
    """Raise when any output's max abs error exceeds atol + rtol * max|reference|."""
    bad = {n: e for n, e in errors.items() if not e <= atol + rtol * scales.get(n, 0.0)}
    if bad:
        detail = ", ".join(f"{n}: {e:.3g} (scale {scales.get(n, 0):.3g})" for n, e in bad.items())
        raise ExportError(f"{what}: onnxruntime does not match torch ({detail}; bound atol {atol} + rtol {rtol} x scale)")
