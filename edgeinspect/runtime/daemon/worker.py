"""The inference worker: one thread that takes batches from the FrameQueue, decodes their frames, runs
the pipeline and builds the replies.

Everything that costs time in proportion to a frame or a map happens here, never on the socket loop:
decoding and resizing (frames wait undecoded, so a dropped frame is never decoded), the model, the
map encoding and the reply JSON. The loop only checks headers and sends, so health, stats and bad
input are answered while a batch is on the model or a large frame is decoding (OpenCV, ONNX Runtime
and torch release the GIL in their kernels). A finished batch goes back to the loop through
`on_done` (the loop owns the sockets: ZeroMQ sockets are not thread-safe).

`choose_batch` times the pipeline at batch sizes 1, 2, 4, ... up to the largest allowed and keeps the
size with the lowest time per frame: on a CPU a larger batch often costs more per frame than single
frames (cache and memory bandwidth), and such batches are never formed.

After each batch the worker gives the heap's free pages back to the system (`release_free_memory`):
a batch's activations are hundreds of MB that glibc would otherwise keep, so the daemon's memory
returns to its idle level between batches.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgeinspect.runtime.daemon.codec import encode_map
from edgeinspect.runtime.daemon.frames import DEFAULT_DECODE_BUDGET, decode_frame
from edgeinspect.runtime.daemon.protocol import (
    ErrorCode,
    InspectRequest,
    MapInfo,
    ProtocolError,
    ResultReply,
    Timings,
    error_reply,
)
from edgeinspect.runtime.daemon.queueing import FrameQueue

log = logging.getLogger("edgeinspect.serve")


@dataclass
class PendingFrame:
    """A checked, still encoded frame waiting for (or in) the model, with what is needed to answer it."""

    route: list[bytes]  # ROUTER identity (+ empty delimiter for REQ clients)
    request: InspectRequest
    data: Any  # the frame part (zmq.Frame, bytes or memoryview): decoded by the worker
    received: float  # perf_counter at receipt
    answered: bool = False  # set by the socket loop when a reply for this frame was handed to ZeroMQ
    # frames of its camera pushed out of the queue before it, answered `dropped` once this one is through the
    # model (or stopped): see the server's docstring
    displaced: list[PendingFrame] = field(default_factory=list)
    drop_message: str = ""  # why this frame was dropped, when it was


@dataclass
class FrameReply:
    """One frame's reply, built by the worker; the loop sends it."""

    frame: PendingFrame
    parts: list[bytes]  # [reply JSON] or [reply JSON, map bytes]
    code: str | None = None  # error code, None for a result
    latency_ms: float = 0.0  # received -> reply built
    queue_wait_ms: float = 0.0


@dataclass
class BatchOutcome:
    replies: list[FrameReply]
    model_frames: int = 0  # frames that reached the model
    model_ms: float = 0.0
    error: str | None = None


def images_to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 RGB (S, S, 3) frames -> float (B, 3, S, S) in [-1, 1] (as edgeinspect.data.mvtec.image_to_tensor)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x.float().div(127.5).sub(1.0)


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (malloc_trim; nothing where the C library is not glibc)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_pipeline(pipeline: Callable[[torch.Tensor], Any], images: list[np.ndarray]) -> Any:
    with torch.inference_mode():
        return pipeline(images_to_batch(images))


def choose_batch(pipeline: Callable[[torch.Tensor], Any], image_size: int, max_batch: int,
                 repeats: int = 2) -> tuple[int, dict[int, float]]:
    """(the batch size with the lowest model time per frame, {size: ms per frame}) over sizes 1, 2, 4, ...
    up to max_batch (max_batch itself included); each size's best of `repeats` runs after one warm-up run.
    A larger size must be at least 10 % cheaper per frame to be chosen: timing noise must not pick it, and it
    costs memory (its activations) for as long as the daemon runs."""
    blank = np.full((image_size, image_size, 3), 128, np.uint8)
    sizes = sorted({1, max_batch, *(2 ** k for k in range(1, max_batch.bit_length()) if 2 ** k <= max_batch)})
    per_frame: dict[int, float] = {}
    for b in sizes:
        run_pipeline(pipeline, [blank] * b)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_pipeline(pipeline, [blank] * b)
            best = min(best, (time.perf_counter() - t0) * 1e3)
        per_frame[b] = round(best / b, 3)
    chosen = 1
    for b in sizes[1:]:
        if per_frame[b] < 0.9 * per_frame[chosen]:
            chosen = b
    return chosen, per_frame


@dataclass
class ReplyContext:
    """What the worker needs to decode frames and build replies."""

    image_size: int
    max_pixels: int
    decode_budget: int = DEFAULT_DECODE_BUDGET
    judge: Callable[[float], tuple[str | None, float | None]] = lambda s: (None, None)
    threshold: float | None = None
    threshold_source: str | None = None


class InferenceWorker(threading.Thread):
    def __init__(self, pipeline: Callable[[torch.Tensor], Any], queue: FrameQueue, max_batch: int,
                 deadline_s: float, on_done: Callable[[BatchOutcome], None], context: ReplyContext):
        super().__init__(name="edgeinspect-inference", daemon=True)
        self.pipeline = pipeline
        self.queue = queue
        self.max_batch = max_batch
        self.deadline_s = deadline_s
        self.on_done = on_done
        self.context = context
        self.busy = False
        self.current: list[PendingFrame] = []  # the batch being worked on (the loop answers it at a forced stop)
        self.batches = 0

    def _error(self, pf: PendingFrame, code: ErrorCode, message: str) -> FrameReply:
        req = pf.request
        return FrameReply(pf, [error_reply(code, message, req.camera_id, req.frame_id)], code.value,
                          (time.perf_counter() - pf.received) * 1e3)

    def run_batch(self, frames: list[PendingFrame]) -> BatchOutcome:
        ctx = self.context
        taken = time.perf_counter()
        replies: list[FrameReply] = []
        images, ok, decode_ms = [], [], []
        for pf in frames:
            t0 = time.perf_counter()
            try:
                images.append(decode_frame(pf.request, pf.data, ctx.image_size, ctx.max_pixels, ctx.decode_budget))
            except ProtocolError as e:
                replies.append(self._error(pf, e.code, e.message))
                continue
            finally:
                pf.data = None  # the encoded bytes are not needed any more
            ok.append(pf)
            decode_ms.append((time.perf_counter() - t0) * 1e3)
        out = BatchOutcome(replies, len(ok))
        if not ok:
            return out
        t0 = time.perf_counter()
        try:
            result = run_pipeline(self.pipeline, images)
            scores = result.scores.float().numpy()
            maps = result.maps.float().numpy()
            if scores.shape[0] != len(ok):
                raise RuntimeError(f"pipeline returned {scores.shape[0]} scores for {len(ok)} frames")
            fire = getattr(result, "fire_step", None)
            fire_steps = None if fire is None else [int(v) for v in fire.tolist()]
            stages = {k: round(float(v), 3) for k, v in result.timings_ms.items()}
        except Exception as e:  # the batch fails, the daemon does not
            log.error("inference failed on a batch of %d: %s\n%s", len(ok), e, traceback.format_exc())
            out.error = f"{type(e).__name__}: {e}"
            out.model_ms = (time.perf_counter() - t0) * 1e3
            replies += [self._error(pf, ErrorCode.INFERENCE_FAILED,
                                    f"the model failed on this frame's batch: {out.error}") for pf in ok]
            return out
        out.model_ms = (time.perf_counter() - t0) * 1e3
        del images
        for i, pf in enumerate(ok):
            try:
                replies.append(self._result(pf, i, scores, maps, fire_steps, stages, out.model_ms, decode_ms[i],
                                            taken, len(ok)))
            except Exception as e:  # never lose the rest of the batch over one reply
                log.error("building the reply of %s/%s failed: %s\n%s", pf.request.camera_id, pf.request.frame_id,
                          e, traceback.format_exc())
                replies.append(self._error(pf, ErrorCode.INTERNAL, f"reply failed: {type(e).__name__}"))
        return out

    def _result(self, pf: PendingFrame, i: int, scores: np.ndarray, maps: np.ndarray, fire_steps: list[int] | None,
                stages: dict[str, float], model_ms: float, decode_ms: float, taken: float,
                batch_size: int) -> FrameReply:
        ctx = self.context
        req = pf.request
        t0 = time.perf_counter()
        score = float(scores[i])
        verdict, norm = ctx.judge(score)
        extra: list[bytes] = []
        map_info = None
        if req.options.return_map:
            info, data = encode_map(maps[i], req.options.map_encoding, req.options.map_size)
            map_info = MapInfo(**info)
            extra.append(data)
        now = time.perf_counter()
        queue_wait = (taken - pf.received) * 1e3
        timings = Timings(decode=round(decode_ms, 3), queue_wait=round(queue_wait, 3), model=stages,
                          model_total=round(model_ms, 3), encode_reply=round((now - t0) * 1e3, 3),
                          compute=round((now - taken) * 1e3, 3), daemon_total=round((now - pf.received) * 1e3, 3))
        body = ResultReply(
            camera_id=req.camera_id, frame_id=req.frame_id, timestamp=req.timestamp, score=score,
            normalized_score=norm, verdict=verdict, threshold=ctx.threshold, threshold_source=ctx.threshold_source,
            fire_step=None if fire_steps is None else fire_steps[i], batch_size=batch_size,
            timings_ms=timings, map=map_info).model_dump_json().encode()
        return FrameReply(pf, [body, *extra], None, (time.perf_counter() - pf.received) * 1e3, queue_wait)

    def run(self) -> None:
        while True:
            frames = self.queue.take_batch(self.max_batch, self.deadline_s)
            if frames is None:
                return
            self.current = frames
            self.busy = True
            try:
                outcome = self.run_batch(frames)
            finally:
                self.busy = False
            self.batches += 1
            self.on_done(outcome)
            self.current = []
            release_free_memory()
