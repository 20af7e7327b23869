"""The onnxruntime backend: ONNX graphs behind the named-tensor Network interface.

CPU by default. `providers=["cuda"]` or `["tensorrt"]` (or full execution-provider names, or
(name, options) pairs) use the GPU execution providers of the `onnxruntime-gpu` build; with a CUDA
provider the network's device is the GPU and inputs/outputs stay there: torch CUDA tensors are bound
to the session by pointer (IO binding), outputs are preallocated torch tensors once the output shapes
for an input shape are known (the first call at a new input shape lets onnxruntime allocate and
copies once). The CUDA provider runs on torch's current stream (`user_compute_stream`), so the loop's
torch ops and the session are ordered without host synchronisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeinspect.core.roles import IMAGE_ROLES, ROLE_SIGNATURES
from edgeinspect.core.networks import Networks, require_inputs
from edgeinspect.runtime.bundle_loading import Bundle, load_bundle
from edgeinspect.runtime.tensorrt_engines import build_profile

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA, "tensorrt": TENSORRT, "trt": TENSORRT}
_GPU_PROVIDERS = (CUDA, TENSORRT)
GPU_INSTALL_HINT = ("install the GPU build of onnxruntime: pip install 'edgeinspect[gpu]' (brings onnxruntime-gpu, "
                    "which replaces the CPU-only onnxruntime package; uninstall onnxruntime first)")

_ORT_TYPES = {
    "tensor(float)": (np.float32, torch.float32), "tensor(float16)": (np.float16, torch.float16),
    "tensor(double)": (np.float64, torch.float64), "tensor(int64)": (np.int64, torch.int64),
    "tensor(int32)": (np.int32, torch.int32), "tensor(bool)": (np.bool_, torch.bool),
}


class ProviderUnavailableError(RuntimeError):
    pass


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_providers(providers: Sequence[Any] | None = None, device_id: int = 0,
                      trt_options: dict[str, Any] | None = None,
                      cuda_options: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Normalise a provider request to onnxruntime's (name, options) list, with fallbacks: "tensorrt" ->
    TensorRT, CUDA, CPU; "cuda" -> CUDA, CPU. Raises ProviderUnavailableError naming the package to
    install when a requested provider is not in this onnxruntime build."""
    requested: list[tuple[str, dict[str, Any]]] = []
    for p in providers or ["cpu"]:
        opts = p[1] if isinstance(p, (tuple, list)) else {}
        requested.append((_provider_name(p), dict(opts)))
    names = [n for n, _ in requested]
    if TENSORRT in names and CUDA not in names:
        requested.insert(names.index(TENSORRT) + 1, (CUDA, {}))
    if CPU not in [n for n, _ in requested]:
        requested.append((CPU, {}))
    available = available_providers()
    missing = [n for n, _ in requested if n not in available]
    if missing:
        gpu = [n for n in missing if n in _GPU_PROVIDERS]
        hint = GPU_INSTALL_HINT if gpu else "check the provider name"
        raise ProviderUnavailableError(
            f"onnxruntime execution provider(s) {missing} are not available in this onnxruntime build "
            f"(available: {available}); {hint}"
        )
    out = []
    for name, opts in requested:
        if name in _GPU_PROVIDERS:
            opts = {"device_id": device_id, **((cuda_options if name == CUDA else trt_options) or {}), **opts}
            if torch.cuda.is_available() and "user_compute_stream" not in opts:
                with torch.cuda.device(device_id):
                    opts["user_compute_stream"] = str(torch.cuda.current_stream().cuda_stream)
                opts.setdefault("has_user_compute_stream", "1")
        out.append((name, opts))
    return out


def _device_for(providers: list[tuple[str, dict[str, Any]]]) -> torch.device:
    for name, opts in providers:
        if name in _GPU_PROVIDERS:
            if not torch.cuda.is_available():
                raise ProviderUnavailableError(
                    f"{name} needs a CUDA GPU visible to torch (torch.cuda.is_available() is False; torch "
                    f"{torch.__version__}, CUDA {torch.version.cuda}): the GPU backends keep tensors on the device"
                )
            return torch.device("cuda", int(opts.get("device_id", 0)))
    return torch.device("cpu")


def session_options(intra_op_threads: int | None = None, optimized_model_path: str | None = None,
                    memory_arena: bool = True):
    """memory_arena=False: no CPU arena and no per-shape memory plans, so memory a run took is given back
    (a long-running service that sees several batch sizes stays flat; costs a little speed)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    threads = intra_op_threads if intra_op_threads is not None else _env_threads()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    # A pipeline holds one session per role, each with its own thread pool; pools that spin after a
    # run steal the cores from the next session and from the torch ops in between (measured on a
    # 2-core CPU: decode and feature stages slower than torch). Idle threads sleep instead.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if not memory_arena:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    return so


def _env_threads() -> int | None:
    v = os.environ.get("EDGEINSPECT_ORT_THREADS")
    return int(v) if v else None


class OrtNetwork:
    """One ONNX graph as a Network: named torch tensors in, named torch tensors out (float32 graph IO)."""

    def __init__(self, path: str | Path, input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None, providers: Sequence[Any] | None = None,
                 intra_op_threads: int | None = None, sess_options: Any = None, max_rows: int | None = None):
        """max_rows: on the CPU, run a larger batch in chunks of at most this many rows (all inputs split along
        their first axis, outputs concatenated): the activations' memory is that of a chunk."""
        import onnxruntime as ort

        self.path = Path(path)
        self.max_rows = max_rows
        self.providers = resolve_providers(providers) if not _is_resolved(providers) else list(providers)  # type: ignore[arg-type]
        self.device = _device_for(self.providers)
        so = sess_options or session_options(intra_op_threads)
        self.session = ort.InferenceSession(str(self.path), so, providers=[p for p, _ in self.providers],
                                            provider_options=[o for _, o in self.providers])
        graph_in = {i.name: i for i in self.session.get_inputs()}
        graph_out = {o.name: o for o in self.session.get_outputs()}
        self.input_names = tuple(input_names or graph_in)
        self.output_names = tuple(output_names or graph_out)
        missing = [n for n in self.input_names if n not in graph_in] + [n for n in self.output_names if n not in graph_out]
        if missing:
            raise ValueError(f"{self.path.name}: the graph has no input/output {missing} "
                             f"(inputs {list(graph_in)}, outputs {list(graph_out)})")
        self._in_types = {n: _ort_type(graph_in[n].type, self.path) for n in self.input_names}
        self._out_types = {n: _ort_type(graph_out[n].type, self.path) for n in self.output_names}
        self._out_shapes: dict[tuple, list[tuple[int, ...]]] = {}
        # on torch's stream, the session is ordered after the ops that wrote its inputs; otherwise wait for them
        self._shares_stream = any("user_compute_stream" in o for n, o in self.providers if n in _GPU_PROVIDERS)

    def __repr__(self) -> str:
        return f"OrtNetwork({self.path.name}, providers={[p for p, _ in self.providers]})"

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        require_inputs(self.input_names, inputs)
        if self.device.type == "cuda":
            return self._run_bound(inputs)
        feeds = {n: np.ascontiguousarray(inputs[n].detach().to("cpu", self._in_types[n][1]).numpy())
                 for n in self.input_names}
        rows = {len(a) if a.ndim else None for a in feeds.values()}
        if self.max_rows and len(rows) == 1 and (b := rows.pop()) and b > self.max_rows:
            parts = [self.session.run(list(self.output_names), {n: a[i:i + self.max_rows] for n, a in feeds.items()})
                     for i in range(0, b, self.max_rows)]
            outs = [np.concatenate(chunks) for chunks in zip(*parts)]
        else:
            outs = self.session.run(list(self.output_names), feeds)
        return {n: torch.from_numpy(o) for n, o in zip(self.output_names, outs)}

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.device.index or 0
        binding = self.session.io_binding()
        held = []
        for n in self.input_names:
            np_t, torch_t = self._in_types[n]
            t = inputs[n].detach().to(self.device, torch_t).contiguous()
            held.append(t)
            binding.bind_input(n, "cuda", dev, np_t, tuple(t.shape), t.data_ptr())
        if not self._shares_stream:
            torch.cuda.current_stream(self.device).synchronize()
        key = tuple(tuple(t.shape) for t in held)
        shapes = self._out_shapes.get(key)
        if shapes is None:  # first call at this input shape: let onnxruntime allocate, remember the shapes
            for n in self.output_names:
                binding.bind_output(n, "cuda", dev)
            self.session.run_with_iobinding(binding)
            arrays = binding.copy_outputs_to_cpu()
            self._out_shapes[key] = [tuple(a.shape) for a in arrays]
            return {n: torch.from_numpy(a).to(self.device) for n, a in zip(self.output_names, arrays)}
        outs = {}
        for n, shape in zip(self.output_names, shapes):
            np_t, torch_t = self._out_types[n]
            o = torch.empty(shape, dtype=torch_t, device=self.device)
            binding.bind_output(n, "cuda", dev, np_t, tuple(shape), o.data_ptr())
            outs[n] = o
        self.session.run_with_iobinding(binding)
        return outs


def _provider_name(p: Any) -> str:
    name = str(p[0] if isinstance(p, (tuple, list)) else p)
    return _ALIASES.get(name.lower(), name)


def _is_resolved(providers: Any) -> bool:
    return bool(providers) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], dict) for p in providers)


def _ort_type(type_str: str, path: Path) -> tuple[Any, torch.dtype]:
    if type_str not in _ORT_TYPES:
        raise TypeError(f"{path.name}: graph input/output type {type_str} is not supported by OrtNetwork")
    return _ORT_TYPES[type_str]


def _trt_profile_options(bundle, role: str, max_batch: int, opt_batch: int) -> dict[str, str]:
    entry = bundle.network(role)
    return build_profile(entry.inputs, max_batch=max_batch, opt_batch=opt_batch,
                         batch_multiplier=entry.batch_multiplier).ort_trt_options()


def ort_networks(source: Any, providers: Sequence[Any] | None = None, *, precision: str = "fp32",
                 intra_op_threads: int | None = None, roles: Sequence[str] | None = None,
                 signatures: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
                 device_id: int = 0, trt_cache_dir: str | Path | None = None, memory_arena: bool = True,
                 image_rows: int | None = None) -> Networks:
    """onnxruntime Networks from a bundle (a folder, verified on load, or a loaded Bundle) or from a
    mapping role -> ONNX file (names from `signatures`, else ROLE_SIGNATURES, else the graph's own).
    `image_rows`: the IMAGE_ROLES (full-resolution networks) run at most this many rows per call on the CPU
    (None: the whole batch); on a 2-core CPU their ms per frame is the same and a batch's memory peak is not.

    With the TensorRT execution provider and a bundle, each session gets explicit optimisation profiles
    from the manifest and an engine/timing cache under the bundle's engines/ort_trt folder."""

    if isinstance(source, (str, Path)) and Path(source).is_dir():
        source = load_bundle(source)
    names_of: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...] | None]] = {}
    files: dict[str, Path] = {}
    bundle = source if isinstance(source, Bundle) else None
    if bundle is not None:
        wanted = list(roles or bundle.pipeline_roles())
        for role in wanted:
            entry = bundle.network(role)
            files[role] = bundle.onnx_path(role, precision)
            names_of[role] = (entry.input_names, entry.output_names)
    elif isinstance(source, dict):
        sig = {**ROLE_SIGNATURES, **(signatures or {})}
        for role, path in source.items():
            if roles and role not in roles:
                continue
            files[role] = Path(path)
            names_of[role] = sig.get(role, (None, None))
    else:
        raise TypeError(f"ort_networks needs a bundle folder, a Bundle or a dict role -> onnx file, not {source!r}")
    wants_trt = TENSORRT in [_provider_name(p) for p in (providers or [])]
    nets = {}
    device = torch.device("cpu")
    for role, path in files.items():
        trt_options: dict[str, Any] = {}
        if wants_trt:
            cache = Path(trt_cache_dir) if trt_cache_dir else (bundle.path / "engines" / "ort_trt" if bundle else path.parent / "ort_trt")
            cache.mkdir(parents=True, exist_ok=True)
            trt_options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                           "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
            if bundle is not None:
                b = bundle.batch_size
                trt_options.update(_trt_profile_options(bundle, role, max_batch=b, opt_batch=b))
        resolved = resolve_providers(providers, device_id=device_id, trt_options=trt_options)
        ins, outs = names_of[role]
        net = OrtNetwork(path, ins, outs, resolved, intra_op_threads,
                         sess_options=session_options(intra_op_threads, memory_arena=memory_arena),
                         max_rows=image_rows if role in IMAGE_ROLES else None)
        device = net.device
        nets[role] = net
    return Networks(nets, device, "onnxruntime")
