"""TensorRT INT8 entropy calibration, fed by the same images as the thresholds.

    stream = CalibrationBatchStream(paths, image_preprocess(bundle, "vae_encoder"), batch_size=8)
    cache = CalibrationCache(bundle.path / "engines" / "vae_encoder.int8.calib", key=calibration_cache_key(...))
    calibrator = make_entropy_calibrator(stream, cache)          # an IInt8EntropyCalibrator2
    build_engine(onnx, profile, precision="int8", int8_calibrator=calibrator)   # export/tensorrt.py

Split so that everything but the TensorRT base class is plain Python (and tested without tensorrt):
`CalibrationBatchStream` turns items + a preprocessing function into fixed-size batches of named float32
arrays; `CalibrationCache` reads/writes TensorRT's calibration table atomically, keyed so a table made
for another graph or other images is not reused; `CalibratorLogic` is the calibrator's behaviour
(batch size, device copies of the next batch in the order TensorRT names the inputs, cache hooks);
`entropy_calibrator_class()` mixes it into `tensorrt.IInt8EntropyCalibrator2`, importing tensorrt only
then. Networks whose inputs are not images (the UNet: latents, timesteps, context) are fed with inputs
recorded from the pipeline itself (`record_role_inputs`).

Availability: implicit INT8 calibration (this calibrator) exists up to TensorRT 10; TensorRT 11 removed
IInt8EntropyCalibrator2 and needs explicitly quantized (Q/DQ) ONNX instead, and
`make_entropy_calibrator` says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Feeds = dict[str, np.ndarray]
Preprocess = Callable[[Any], "Feeds | np.ndarray"]


class CalibrationBatchStream:
    """Fixed-size batches of named float32 arrays from `items` through `preprocess` (item -> one array
    without the batch axis for a single-input network named `input_names[0]`, or a dict name -> array).

    TensorRT wants every batch at the calibrator's batch size, so an incomplete last batch is dropped
    (`drop_last`, default) or filled up by repeating the first items of the stream. `max_batches` caps the
    number of batches. `reset()` starts over (TensorRT may read the stream more than once)."""

    def __init__(self, items: Sequence[Any], preprocess: Preprocess, batch_size: int,
                 input_names: Sequence[str] = ("image",), max_batches: int | None = None, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items = list(items)
        if not self.items:
            raise ValueError("no calibration items")
        if drop_last and len(self.items) < batch_size:
            raise ValueError(f"{len(self.items)} calibration items are fewer than one batch of {batch_size}; pass "
                             "more images, a smaller batch, or drop_last=False")
        self.preprocess = preprocess
        self.batch_size = int(batch_size)
        self.input_names = tuple(input_names)
        self.drop_last = drop_last
        n = len(self.items) // batch_size if drop_last else math.ceil(len(self.items) / batch_size)
        self.num_batches = n if max_batches is None else min(n, int(max_batches))
        self._next = 0
        self._shapes: dict[str, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return self.num_batches

    def reset(self) -> None:
        self._next = 0

    def _feeds(self, item: Any, index: int) -> Feeds:
        out = self.preprocess(item)
        if not isinstance(out, dict):
            if len(self.input_names) != 1:
                raise TypeError(f"preprocess returned one array but the network has inputs {self.input_names}")
            out = {self.input_names[0]: out}
        missing = [n for n in self.input_names if n not in out]
        if missing:
            raise KeyError(f"preprocess gave no {missing} for calibration item {index} ({_describe(item)})")
        feeds = {}
        for n in self.input_names:
            a = np.array(out[n], dtype=np.float32, order="C")  # (ascontiguousarray would make a 0-d input 1-d)
            want = self._shapes.setdefault(n, a.shape)
            if a.shape != want:
                raise ValueError(f"calibration item {index} ({_describe(item)}): input {n!r} has shape {a.shape}, the "
                                 f"first item's is {want}; every item must have the same shape")
            feeds[n] = a
        return feeds

    def next_batch(self) -> Feeds | None:
        """The next batch (name -> (batch_size, ...) float32, C-contiguous), or None at the end."""
        if self._next >= self.num_batches:
            return None
        start = self._next * self.batch_size
        idx = [(start + i) % len(self.items) for i in range(self.batch_size)]  # wraps only without drop_last
        per_item = [self._feeds(self.items[i], i) for i in idx]
        self._next += 1
        return {n: np.ascontiguousarray(np.stack([f[n] for f in per_item])) for n in self.input_names}

    def __iter__(self) -> Iterator[Feeds]:
        self.reset()
        while (b := self.next_batch()) is not None:
            yield b


def _describe(item: Any) -> str:
    if isinstance(item, np.ndarray):
        return f"array of shape {item.shape}"
    if isinstance(item, dict):
        return f"dict of {sorted(item)}"
    text = repr(item)
    return text if len(text) <= 80 else text[:77] + "..."


def calibration_cache_key(**parts: Any) -> str:
    """sha256 of the JSON of what the table depends on (e.g. onnx_sha256, images, preprocessing, batch)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class CalibrationCache:
    """TensorRT's calibration table in a file, with `<file>.json` holding the key it was made under: a
    table whose key differs (another graph, other images) reads as absent, so TensorRT calibrates again."""

    def __init__(self, path: str | Path, key: str | None = None):
        self.path = Path(path)
        self.key = key
        self.meta_path = self.path.with_name(self.path.name + ".json")

    def read(self) -> bytes | None:
        if not self.path.is_file():
            return None
        if self.key is not None:
            try:
                meta = json.loads(self.meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                return None
            if meta.get("key") != self.key:
                return None
        return self.path.read_bytes()

    def write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for target, payload in ((self.path, bytes(data)),
                                (self.meta_path, json.dumps({"key": self.key, "bytes": len(data)}).encode())):
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(payload)
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise


def torch_cuda_buffer(a: np.ndarray) -> tuple[Any, int]:
    """(buffer to keep alive, device pointer): the array copied to the current CUDA device with torch."""
    import torch

    t = torch.from_numpy(a).to("cuda", non_blocking=False).contiguous()
    return t, int(t.data_ptr())


class CalibratorLogic:
    """The behaviour of the INT8 calibrator, without TensorRT: TensorRT calls get_batch_size, get_batch
    (device pointers, one per input name it asks for, or None at the end), read_calibration_cache and
    write_calibration_cache."""

    def __init__(self, stream: CalibrationBatchStream, cache: CalibrationCache | None = None,
                 to_device: Callable[[np.ndarray], tuple[Any, int]] = torch_cuda_buffer):
        self.stream = stream
        self.cache = cache
        self._to_device = to_device
        self._held: list[Any] = []  # the current batch's device buffers: TensorRT reads them after get_batch
        self.batches_served = 0

    def get_batch_size(self) -> int:
        return self.stream.batch_size

    def get_batch(self, names: Sequence[str], *_: Any) -> list[int] | None:
        batch = self.stream.next_batch()
        if batch is None:
            self._held = []
            return None
        missing = [n for n in names if n not in batch]
        if missing:
            raise KeyError(f"TensorRT asks for calibration inputs {missing}; the stream has {sorted(batch)}")
        held, ptrs = [], []
        for n in names:
            buf, ptr = self._to_device(batch[n])
            held.append(buf)
            ptrs.append(int(ptr))
        self._held = held
        self.batches_served += 1
        return ptrs

    def read_calibration_cache(self, *_: Any) -> bytes | None:
        return self.cache.read() if self.cache is not None else None

    def write_calibration_cache(self, cache: Any, *_: Any) -> None:
        if self.cache is not None:
            self.cache.write(bytes(cache))


_CLASS: dict[str, type] = {}


def entropy_calibrator_class() -> type:
    """`CalibratorLogic` mixed into tensorrt.IInt8EntropyCalibrator2 (tensorrt imported here)."""
    from edgeinspect.export.tensorrt import TensorRTUnavailableError, import_tensorrt

    trt = import_tensorrt()
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise TensorRTUnavailableError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no IInt8EntropyCalibrator2: implicit INT8 calibration "
            "was removed in TensorRT 11. Quantize the ONNX explicitly (QuantizeLinear/DequantizeLinear nodes) and "
            "build with precision='int8', or use TensorRT 10 for this calibrator")
    key = f"{getattr(trt, '__version__', '')}:{id(base)}"
    if key not in _CLASS:
        def __init__(self, stream, cache=None, to_device=torch_cuda_buffer):
            base.__init__(self)
            CalibratorLogic.__init__(self, stream, cache, to_device)

        _CLASS[key] = type("EntropyCalibrator", (CalibratorLogic, base), {
            "__init__": __init__, "__module__": __name__,
            "__doc__": "INT8 entropy calibrator (IInt8EntropyCalibrator2) fed by a CalibrationBatchStream."})
    return _CLASS[key]


def make_entropy_calibrator(stream: CalibrationBatchStream, cache: CalibrationCache | str | Path | None = None,
                            to_device: Callable[[np.ndarray], tuple[Any, int]] = torch_cuda_buffer) -> Any:
    """An IInt8EntropyCalibrator2 for `build_engine(..., precision="int8", int8_calibrator=...)`. Raises
    TensorRTUnavailableError when tensorrt is missing or has no implicit INT8 calibration."""
    cls = entropy_calibrator_class()
    if cache is not None and not isinstance(cache, CalibrationCache):
        cache = CalibrationCache(cache)
    return cls(stream, cache, to_device)


# --------------------------------------------------------------------------- feeding from a bundle


def image_preprocess(size: int, name: str = "image") -> Callable[[Any], Feeds]:
    """Image file (or uint8 RGB array) -> {name: float32 (3, size, size) in [-1, 1]}, the pipeline's
    own preprocessing (read, resize, scale)."""
    from edgeinspect.data.mvtec import image_to_tensor, read_image, resize_image

    def pre(item: Any) -> Feeds:
        img = read_image(item) if isinstance(item, (str, Path)) else np.asarray(item, np.uint8)
        return {name: image_to_tensor(resize_image(img, size)).numpy()}

    return pre


def bundle_image_preprocess(bundle: Any, role: str) -> Callable[[Any], Feeds]:
    """Preprocessing for a bundle role whose only input is an image: the model size for the VAE encoder and
    hint encoder, the feature size for the features network."""
    entry = bundle.network(role)
    if entry.input_names != ("image",):
        raise ValueError(f"role {role!r} takes {entry.input_names}, not an image: feed it with record_role_inputs")
    size = bundle.manifest.get("feature_size") if role == "features" else bundle.manifest["image_size"]
    return image_preprocess(int(size))


def record_role_inputs(pipe: Any, role: str, frames: Any, batch_size: int = 1,
                       max_items: int | None = None) -> list[Feeds]:
    """Run the pipeline over `frames` ((N, 3, H, W) in [-1, 1]) and record the inputs of every call of
    `role` (e.g. the UNet at each step), split per sample: calibration items for networks that do not
    take images. The pipeline's networks are restored afterwards."""
    from edgeinspect.runtime.networks import Networks

    nets = pipe.nets
    inner = nets[role]
    items: list[Feeds] = []

    class Recorder:
        input_names = inner.input_names
        output_names = inner.output_names

        def __call__(self, **inputs):
            arrays = {n: inputs[n].detach().float().cpu().numpy() for n in inner.input_names}
            b = next(iter(arrays.values())).shape[0]
            items.extend({n: a[i] for n, a in arrays.items()} for i in range(b))
            return inner(**inputs)

    pipe.nets = Networks({**{r: nets[r] for r in nets}, role: Recorder()}, nets.device, nets.name)
    try:
        for s in range(0, len(frames), batch_size):
            pipe(frames[s:s + batch_size])
            if max_items is not None and len(items) >= max_items:
                break
    finally:
        pipe.nets = nets
    return items[:max_items] if max_items is not None else items
