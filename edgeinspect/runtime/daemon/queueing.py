"""Bounded per-camera frame queues and batch assembly for the inference worker.

Drop policy: each camera holds at most `per_camera` frames waiting for the model; a new frame from a
camera whose queue is full pushes out that camera's OLDEST waiting frame (a line wants the newest
view of the part, and one slow camera never costs another camera its frames). `put` returns the
dropped frame so the socket loop can answer its requester with a "dropped" error reply. Frames wait
undecoded (the worker decodes the frames of a batch when it takes them), so a dropped frame costs no
decoding. At most `max_cameras` cameras may have frames waiting at once, and the waiting frames hold
at most `max_bytes` in all (a frame that would go over is refused: `QueueFull`), so memory is bounded
whatever the senders do.

Batching: the worker takes a batch when `max_batch` frames wait, when the oldest waiting frame has
waited `deadline_s`, or as soon as every camera seen in the last `live_window_s` has a frame waiting
(no more frames are coming soon, so waiting out the deadline would only add latency; one camera is
therefore never delayed by the deadline). Frames are taken oldest first across cameras.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any


class TooManyCameras(RuntimeError):
    pass


class QueueClosed(RuntimeError):
    pass


class QueueFull(RuntimeError):
    pass


class FrameQueue:
    def __init__(self, per_camera: int, max_cameras: int, live_window_s: float = 1.0,
                 clock: Callable[[], float] = time.perf_counter, max_bytes: int | None = None):
        if per_camera < 1 or max_cameras < 1:
            raise ValueError("per_camera and max_cameras must be >= 1")
        self.per_camera = per_camera
        self.max_cameras = max_cameras
        self.max_bytes = max_bytes
        self._bytes = 0
        self.live_window_s = live_window_s
        self._clock = clock
        self._queues: dict[str, deque[tuple[float, int, Any, int]]] = {}  # (time, seq, item, bytes)
        self._last_seen: dict[str, float] = {}
        self._total = 0
        self._closed = False
        self._seq = itertools.count()
        self._cond = threading.Condition()

    # -- producer (the socket loop)
    def put(self, camera_id: str, item: Any, nbytes: int = 0) -> Any | None:
        """Queue `item` (holding `nbytes`); returns the camera's oldest frame when it had to be dropped, else
        None. Raises QueueFull (nothing dropped) when the waiting frames would hold over `max_bytes`."""
        with self._cond:
            if self._closed:
                raise QueueClosed("the queue is closed (daemon draining)")
            now = self._clock()
            q = self._queues.get(camera_id)
            if q is None and len(self._queues) >= self.max_cameras:
                raise TooManyCameras(f"{len(self._queues)} cameras already have frames waiting "
                                     f"(--max-cameras {self.max_cameras})")
            full = q is not None and len(q) >= self.per_camera
            freed = q[0][3] if full else 0
            if self.max_bytes is not None and self._bytes - freed + nbytes > self.max_bytes:
                raise QueueFull(f"the frames waiting for the model hold {self._bytes} bytes; this frame's {nbytes} "
                                f"would go over the daemon's budget of {self.max_bytes}")
            if q is None:
                q = self._queues[camera_id] = deque()
            self._last_seen[camera_id] = now
            dropped = None
            if full:
                dropped = q.popleft()[2]
                self._total -= 1
                self._bytes -= freed
            q.append((now, next(self._seq), item, nbytes))
            self._total += 1
            self._bytes += nbytes
            self._cond.notify()
            return dropped

    def close(self) -> None:
        """No more frames: the worker takes what waits without waiting for deadlines, then gets None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- consumer (the worker)
    def _all_live_waiting(self, now: float) -> bool:
        horizon = now - self.live_window_s
        for cam, seen in list(self._last_seen.items()):
            if seen < horizon:
                del self._last_seen[cam]
            elif cam not in self._queues:
                return False
        return True

    def take_batch(self, max_batch: int, deadline_s: float) -> list[Any] | None:
        """Block until a batch is due and return it (oldest first); None once closed and empty."""
        with self._cond:
            while True:
                if self._total == 0:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                if self._total >= max_batch or self._closed:
                    break
                now = self._clock()
                if self._all_live_waiting(now):
                    break
                oldest = min(q[0][0] for q in self._queues.values())
                remaining = oldest + deadline_s - now
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = []
            while self._queues and len(batch) < max_batch:
                cam = min(self._queues, key=lambda c: self._queues[c][0][1])
                q = self._queues[cam]
                entry = q.popleft()
                batch.append(entry[2])
                self._bytes -= entry[3]
                if not q:
                    del self._queues[cam]
            self._total -= len(batch)
            return batch

    # -- introspection
    def depth(self) -> int:
        with self._cond:
            return self._total

    def queued_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def depth_by_camera(self) -> dict[str, int]:
        with self._cond:
            return {c: len(q) for c, q in self._queues.items()}

    def pop_all(self) -> list[Any]:
        """Remove and return everything waiting (a forced shutdown answers these with an error)."""
        with self._cond:
            items = [entry[2] for q in self._queues.values() for entry in q]
            self._queues.clear()
            self._total = self._bytes = 0
            self._cond.notify_all()
            return items
