"""INT8 calibration data, fed by the same images as the thresholds: batches, a keyed cache, the inputs.

    stream = CalibrationBatchStream(paths, bundle_image_preprocess(bundle, "vae_encoder"), batch_size=8)
    items = record_role_inputs(pipe, "unet", frames)         # networks that do not take images
    cache = CalibrationCache(path, key=calibration_cache_key(onnx_sha256=..., images=..., method=...))

`CalibrationBatchStream` turns items + a preprocessing function into batches of named float32 arrays;
`CalibrationCache` reads/writes a calibration result (the activation ranges) atomically, keyed so a result
made for another graph or other images is not reused; `image_preprocess`/`bundle_image_preprocess` are the
pipeline's own preprocessing; `record_role_inputs` records what the pipeline itself feeds a network whose
inputs are not images (the UNet: latents, timesteps, context, hint).

The quantisation that consumes them (explicit Q/DQ graphs for TensorRT's INT8, written with onnxruntime's
quantisation tooling) is `edgeinspect.calibration.qdq`. TensorRT 11 (the `gpu` extra) has no implicit INT8
calibrator (IInt8EntropyCalibrator2): its INT8 comes only from such Q/DQ graphs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeinspect.core.atomic import write_bytes_atomic
from edgeinspect.core.networks import Networks
from edgeinspect.data.mvtec import image_to_tensor, read_image, resize_image

Feeds = dict[str, np.ndarray]
Preprocess = Callable[[Any], "Feeds | np.ndarray"]


class CalibrationBatchStream:
    """Batches of named float32 arrays from `items` through `preprocess` (item -> one array without the
    batch axis for a single-input network named `input_names[0]`, or a dict name -> array).

    The last batch is shorter when the items do not fill it (`drop_last=True` drops it instead: for a
    consumer that needs every batch at one size). `max_batches` caps the number of batches; `batch(i)` is
    the i-th batch; `reset()` starts over (a calibrator may read the stream more than once)."""

    def __init__(self, items: Sequence[Any], preprocess: Preprocess, batch_size: int,
                 input_names: Sequence[str] = ("image",), max_batches: int | None = None, drop_last: bool = False):
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

    def batch(self, index: int) -> Feeds:
        """Batch `index` (name -> (batch, ...) float32, C-contiguous; the last one may be shorter)."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} of a stream of {self.num_batches}")
        start = index * self.batch_size
        idx = range(start, min(start + self.batch_size, len(self.items)))
        per_item = [self._feeds(self.items[i], i) for i in idx]
        return {n: np.ascontiguousarray(np.stack([f[n] for f in per_item])) for n in self.input_names}

    def next_batch(self) -> Feeds | None:
        """The next batch, or None at the end."""
        if self._next >= self.num_batches:
            return None
        self._next += 1
        return self.batch(self._next - 1)

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
    """sha256 of the JSON of what a calibration result depends on (e.g. onnx_sha256, images, method)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class CalibrationCache:
    """A calibration result in a file, with `<file>.json` holding the key it was made under: a result whose
    key differs (another graph, other images, another method) reads as absent, so calibration runs again."""

    def __init__(self, path: str | Path, key: str | None = None):
        self.path = Path(path)
        self.key = key
        self.meta_path = self.path.with_name(self.path.name + ".json")

    def read(self) -> bytes | None:
        if not self.path.is_file():
            return None
        data = self.path.read_bytes()
        if self.key is not None:
            try:
                meta = json.loads(self.meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                return None
            # the digest also catches a result replaced without its key (a write killed in between)
            if meta.get("key") != self.key or meta.get("sha256", hashlib.sha256(data).hexdigest()) != \
                    hashlib.sha256(data).hexdigest():
                return None
        return data

    def write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = bytes(data)
        meta = {"key": self.key, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        write_bytes_atomic(self.path, data)
        write_bytes_atomic(self.meta_path, json.dumps(meta).encode())


# --------------------------------------------------------------------------- feeding from a bundle


def image_preprocess(size: int, name: str = "image") -> Callable[[Any], Feeds]:
    """Image file (or uint8 RGB array) -> {name: float32 (3, size, size) in [-1, 1]}, the pipeline's
    own preprocessing (read, resize, scale)."""

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
