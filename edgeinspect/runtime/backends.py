"""A bundle's networks on one backend: the choice between onnxruntime and TensorRT, in one place."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edgeinspect.core.networks import Networks
from edgeinspect.runtime.bundle_loading import Bundle, BundleError, load_bundle
from edgeinspect.runtime.ort_backend import ort_networks
from edgeinspect.runtime.trt_backend import trt_networks

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def bundle_networks(bundle: Bundle | str | Path, backend: str = "onnxruntime", *, precision: str = "fp32",
                    providers: Sequence[Any] | None = None, intra_op_threads: int | None = None,
                    roles: Sequence[str] | None = None, engine_cache_dir: str | Path | None = None,
                    max_batch: int | None = None, device: str | torch.device | None = None,
                    memory_arena: bool = True, image_rows: int | None = None) -> Networks:
    """The networks of a bundle on one backend ("onnxruntime" or "tensorrt"); memory_arena: see
    edgeinspect.runtime.ort_backend.session_options; image_rows (onnxruntime on the CPU): see ort_networks."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if backend == "torch":
        raise BundleError(
            f"bundle {bundle.path}: the torch backend cannot run from a bundle (a bundle holds ONNX graphs, not "
            "torch weights); use the run folder (edgeinspect test/predict --model RUN, or "
            "edgeinspect.runtime.run_detector.run_pipeline, which loads it with torch_backend.load_diad/load_glad), "
            "or choose backend 'onnxruntime' or 'tensorrt'"
        )
    if backend == "onnxruntime":
        return ort_networks(bundle, providers=providers, precision=precision, intra_op_threads=intra_op_threads,
                            roles=roles, memory_arena=memory_arena, image_rows=image_rows)
    if backend == "tensorrt":
        return trt_networks(bundle, precision=precision, max_batch=max_batch, cache_dir=engine_cache_dir,
                            roles=roles, device=device or "cuda")
    raise BundleError(f"unknown backend {backend!r}; choose 'onnxruntime' or 'tensorrt' (or 'torch' from a run folder)")


def generation_networks(bundle: Bundle, roles: Sequence[str], *, precision: str = "fp32") -> Networks:
    """The networks a generation job runs its loop on: the backend of the bundle config's runtime section
    ("torch", a training run's default, means onnxruntime here: a bundle holds graphs) on its device
    (onnxruntime with device "cuda" uses the CUDA provider). TensorRT profiles cover `sampling.batch_size`
    samples per call, times each role's batch multiplier (classifier-free guidance doubles the UNet's)."""
    runtime = bundle.config.runtime
    backend = "onnxruntime" if runtime.backend == "torch" else runtime.backend
    device = torch.device(runtime.device)
    on_gpu = device.type == "cuda"
    return bundle_networks(bundle, backend, precision=precision, roles=roles, max_batch=bundle.batch_size,
                           providers=["cuda"] if backend == "onnxruntime" and on_gpu else None,
                           device=device if on_gpu else None)
