"""The native TensorRT backend: engines behind the named-tensor Network interface.

Each network deserialises its engine once and keeps one execution context. A call binds torch CUDA
tensors as device buffers (`set_tensor_address`: inputs as given, outputs preallocated from the shapes
the context infers), enqueues `execute_async_v3` on the network's own CUDA stream, ordered after the
caller's current stream and before it again (stream waits, no host synchronisation), so the loop's
torch ops and the engines overlap nothing they should not and intermediates never leave the GPU.

`tensorrt` is imported lazily; without it or without a GPU every entry point raises
TensorRTUnavailableError saying that engines are built on the target machine with edgeinspect[gpu].
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edgeinspect.core.networks import Networks, require_inputs
from edgeinspect.runtime.bundle_loading import Bundle, load_bundle
from edgeinspect.runtime.tensorrt_engines import (
    GpuIdentity,
    bundle_profiles,
    ensure_engine,
    import_tensorrt,
    require_engine_support,
)


def _trt():
    require_engine_support()
    return import_tensorrt()


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for name, tdt in (("int64", torch.int64), ("bf16", torch.bfloat16), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    if dt not in table:
        raise TypeError(f"TensorRT tensor type {dt} has no torch equivalent here")
    return table[dt]


class TensorRTNetwork:
    """One engine as a Network (float outputs come back as float32, like the other backends)."""

    def __init__(self, engine: bytes | str | Path, input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None, device: str | torch.device = "cuda"):
        trt = _trt()
        self._trt = trt
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT networks run on a CUDA device, not {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        data = Path(engine).read_bytes() if isinstance(engine, (str, Path)) else bytes(engine)
        self.name = Path(engine).name if isinstance(engine, (str, Path)) else "<engine bytes>"
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not deserialize {self.name}: it was built for another GPU or "
                                   "TensorRT version; delete it and build again on this machine")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_names = tuple(input_names or ins)
        self.output_names = tuple(output_names or outs)
        missing = [n for n in self.input_names if n not in ins] + [n for n in self.output_names if n not in outs]
        if missing:
            raise ValueError(f"{self.name}: the engine has no input/output {missing} (inputs {ins}, outputs {outs})")
        self._dtype = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in (*self.input_names, *self.output_names)}
        self._lock = threading.Lock()  # an execution context runs one inference at a time

    def __repr__(self) -> str:
        return f"TensorRTNetwork({self.name}, {self.device})"

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        require_inputs(self.input_names, inputs)
        with self._lock, torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            bound = []
            for n in self.input_names:
                t = inputs[n].detach().to(self.device, self._dtype[n]).contiguous()
                if not self.context.set_input_shape(n, tuple(t.shape)):
                    lo, opt, hi = self.engine.get_tensor_profile_shape(n, 0)
                    raise ValueError(f"{self.name}: input {n} of shape {tuple(t.shape)} is outside the engine's "
                                     f"optimization profile (min {tuple(lo)}, max {tuple(hi)})")
                self.context.set_tensor_address(n, t.data_ptr())
                bound.append(t)
            outs: dict[str, torch.Tensor] = {}
            for n in self.output_names:
                shape = tuple(self.context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{self.name}: output {n} shape {shape} is not determined by the inputs")
                o = torch.empty(shape, dtype=self._dtype[n], device=self.device)
                self.context.set_tensor_address(n, o.data_ptr())
                outs[n] = o
            self.stream.wait_stream(caller)  # inputs were written on the caller's stream
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")
            for t in (*bound, *outs.values()):
                t.record_stream(self.stream)  # keep the memory alive until the engine is done with it
            caller.wait_stream(self.stream)
        return {n: (o.float() if o.is_floating_point() and o.dtype != torch.float32 else o) for n, o in outs.items()}


def trt_networks(bundle: Any, *, precision: str = "fp16", max_batch: int | None = None,
                 opt_batch: int | None = None, cache_dir: str | Path | None = None,
                 roles: Sequence[str] | None = None, device: str | torch.device = "cuda",
                 build: bool = True, **build_options: Any) -> Networks:
    """TensorRT Networks for a bundle's pipeline roles; engines come from the keyed cache (default
    <bundle>/engines) and are built there when missing (`build=False`: a missing engine is an error)."""
    _trt()

    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cache = Path(cache_dir) if cache_dir else bundle.path / "engines"
    gpu = GpuIdentity.current(device)
    nets = {}
    for role, profile in bundle_profiles(bundle, max_batch, opt_batch, roles).items():
        engine = ensure_engine(bundle, role, precision, profile, cache, build=build, gpu=gpu, **build_options)
        entry = bundle.network(role)
        nets[role] = TensorRTNetwork(engine, entry.input_names, entry.output_names, device)
    return Networks(nets, device, "tensorrt")
