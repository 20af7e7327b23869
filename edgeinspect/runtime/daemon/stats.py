"""Per-camera counters and latency percentiles for the stats reply (bounded memory: a ring of the
last `window` latencies per camera, at most `max_cameras` cameras tracked by name, the rest pooled)."""

from __future__ import annotations

import os
import resource
import time
from collections import Counter, deque

import numpy as np

OTHER = "_other"


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float | None]:
    """{"p50": ..., "p90": ..., "p99": ..., "mean": ..., "max": ..., "n": n} of a sequence of numbers."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {**{f"p{q}": None for q in qs}, "mean": None, "max": None, "n": 0}
    out: dict[str, float | None] = {f"p{q}": round(float(np.percentile(a, q)), 3) for q in qs}
    out.update(mean=round(float(a.mean()), 3), max=round(float(a.max()), 3), n=int(a.size))
    return out


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process (this one by default) in MiB, from /proc; peak RSS where /proc is missing."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        if pid is not None:
            raise
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Camera:
    __slots__ = ("received", "results", "dropped", "errors", "latencies", "queue_waits")

    def __init__(self, window: int):
        self.received = 0
        self.results = 0
        self.dropped = 0
        self.errors: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=window)
        self.queue_waits: deque[float] = deque(maxlen=window)


class DaemonStats:
    def __init__(self, window: int = 1024, max_cameras: int = 256):
        self.window = window
        self.max_cameras = max_cameras
        self.started = time.time()
        self.cameras: dict[str, _Camera] = {}
        self.errors: Counter[str] = Counter()
        self.requests = 0
        self.replies_dropped = 0
        self.batches = 0
        self.batched_frames = 0
        self.model_ms: deque[float] = deque(maxlen=window)

    def _cam(self, camera_id: str) -> _Camera:
        c = self.cameras.get(camera_id)
        if c is None:
            if len(self.cameras) >= self.max_cameras:
                camera_id = OTHER
                c = self.cameras.get(OTHER)
            if c is None:
                c = self.cameras[camera_id] = _Camera(self.window)
        return c

    def received(self, camera_id: str) -> None:
        self._cam(camera_id).received += 1

    def result(self, camera_id: str, latency_ms: float, queue_wait_ms: float) -> None:
        c = self._cam(camera_id)
        c.results += 1
        c.latencies.append(latency_ms)
        c.queue_waits.append(queue_wait_ms)

    def error(self, code: str, camera_id: str | None = None) -> None:
        """An error reply; "dropped" (drop-oldest, queue budget) is counted as the camera's `dropped`."""
        self.errors[code] += 1
        if camera_id is not None:
            c = self._cam(camera_id)
            if code == "dropped":
                c.dropped += 1
            else:
                c.errors[code] += 1

    def reply_dropped(self, reason: str) -> None:
        """A reply that was not queued for its client (see `outbound`: budget, high-water mark, client gone)."""
        self.errors[reason] += 1
        self.replies_dropped += 1

    def batch(self, size: int, model_ms: float) -> None:
        self.batches += 1
        self.batched_frames += size
        self.model_ms.append(model_ms)

    def snapshot(self, queue_depths: dict[str, int]) -> dict:
        cams = {}
        for name, c in self.cameras.items():
            cams[name] = {"received": c.received, "results": c.results, "dropped": c.dropped,
                          "errors": dict(c.errors), "queue_depth": queue_depths.get(name, 0),
                          "latency_ms": percentiles(c.latencies), "queue_wait_ms": percentiles(c.queue_waits)}
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": self.requests,
            "replies_dropped": self.replies_dropped,
            "batches": self.batches,
            "mean_batch_size": round(self.batched_frames / self.batches, 3) if self.batches else None,
            "model_ms": percentiles(self.model_ms),
            "errors": dict(self.errors),
            "queue_depth": sum(queue_depths.values()),
            "cameras": cams,
            "rss_mb": round(rss_mb(), 1),
        }
