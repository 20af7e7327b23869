"""The inference worker: one thread that takes batches from the FrameQueue and runs the pipeline.

The socket loop never runs the model, so health, stats and bad input are answered while a batch is
on the model. ONNX Runtime and torch release the GIL in their kernels, so the loop runs beside them.
A finished batch goes back to the loop through `on_done` (the loop owns the sockets: ZeroMQ sockets
are not thread-safe).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgeinspect.runtime.daemon.queueing import FrameQueue

log = logging.getLogger("edgeinspect.serve")


@dataclass
class PendingFrame:
    """A decoded frame waiting for (or in) the model, with what is needed to answer it."""

    route: list[bytes]  # ROUTER identity (+ empty delimiter for REQ clients)
    request: Any  # InspectRequest
    image: np.ndarray  # uint8 RGB (S, S, 3) at the model size
    received: float  # perf_counter at receipt
    decode_ms: float
    enqueued: float = 0.0


@dataclass
class BatchOutcome:
    frames: list[PendingFrame]
    dispatched: float  # perf_counter when the batch was taken
    scores: np.ndarray | None = None  # (B,)
    maps: np.ndarray | None = None  # (B, H, W)
    fire_steps: list[int] | None = None  # GLAD
    timings_ms: dict[str, float] = field(default_factory=dict)
    model_ms: float = 0.0
    error: str | None = None


def images_to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 RGB (S, S, 3) frames -> float (B, 3, S, S) in [-1, 1] (as edgeinspect.data.mvtec.image_to_tensor)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x.float().div(127.5).sub(1.0)


class InferenceWorker(threading.Thread):
    def __init__(self, pipeline: Callable[[torch.Tensor], Any], queue: FrameQueue, max_batch: int,
                 deadline_s: float, on_done: Callable[[BatchOutcome], None]):
        super().__init__(name="edgeinspect-inference", daemon=True)
        self.pipeline = pipeline
        self.queue = queue
        self.max_batch = max_batch
        self.deadline_s = deadline_s
        self.on_done = on_done
        self.busy = False
        self.batches = 0

    def run_batch(self, frames: list[PendingFrame]) -> BatchOutcome:
        out = BatchOutcome(frames, time.perf_counter())
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                result = self.pipeline(images_to_batch([f.image for f in frames]))
            out.scores = result.scores.float().numpy()
            out.maps = result.maps.float().numpy()
            fire = getattr(result, "fire_step", None)
            out.fire_steps = None if fire is None else [int(v) for v in fire.tolist()]
            out.timings_ms = {k: round(float(v), 3) for k, v in result.timings_ms.items()}
            if out.scores.shape[0] != len(frames):
                raise RuntimeError(f"pipeline returned {out.scores.shape[0]} scores for {len(frames)} frames")
        except Exception as e:  # the batch fails, the daemon does not
            log.error("inference failed on a batch of %d: %s\n%s", len(frames), e, traceback.format_exc())
            out.error = f"{type(e).__name__}: {e}"
            out.scores = out.maps = out.fire_steps = None
        out.model_ms = (time.perf_counter() - t0) * 1e3
        return out

    def run(self) -> None:
        while True:
            frames = self.queue.take_batch(self.max_batch, self.deadline_s)
            if frames is None:
                return
            self.busy = True
            try:
                outcome = self.run_batch(frames)
            finally:
                self.busy = False
            self.batches += 1
            self.on_done(outcome)
