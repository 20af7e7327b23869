"""Simulated cameras: stream a folder of images (or a video) to the daemon from N cameras at a rate.

Each camera is its own DEALER connection (as each real camera PC would be). With `fps` > 0 a camera
triggers at that rate whatever the daemon does (open loop, like a line); a frame that would exceed
`inflight` unanswered frames is skipped on the camera side and counted. With `fps` = 0 a camera
sends its next frame as soon as one of its `inflight` frames is answered (closed loop: the most the
daemon can do). A camera whose oldest unanswered frame is older than `timeout_ms` counts its
unanswered frames as lost and reconnects with a new socket, so a daemon restart costs the frames
in flight and nothing more.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np
import zmq

from edgeinspect.runtime.daemon.client import InspectionClient, Reply, encode_image, reply_from_parts
from edgeinspect.runtime.daemon.protocol import inspect_header
from edgeinspect.runtime.daemon.security import CurveClientKeys
from edgeinspect.runtime.daemon.stats import percentiles

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mjpg", ".mjpeg", ".mpg", ".mpeg")
ENCODINGS = ("raw", "png", "jpeg", "file")


class SourceError(ValueError):
    pass


@dataclass
class SourceFrame:
    name: str
    encoding: dict[str, Any]  # the header's encoding block
    data: bytes
    image: np.ndarray  # as decoded by OpenCV (BGR / gray, uint8 or uint16): for overlays


def _encode(img: np.ndarray, name: str, encoding: str, file_bytes: bytes | None) -> SourceFrame:
    suffix = Path(name).suffix.lower()
    if encoding == "file" and file_bytes is not None and suffix in (".png", ".jpg", ".jpeg"):
        return SourceFrame(name, {"format": "png" if suffix == ".png" else "jpeg"}, file_bytes, img)
    if encoding == "raw":
        enc, data = encode_image(img)
        return SourceFrame(name, enc, data, img)
    fmt = "jpeg" if encoding == "jpeg" else "png"
    src = img if fmt == "png" or img.dtype == np.uint8 else (img / 257.0).round().astype(np.uint8)
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", src)
    if not ok:
        raise SourceError(f"{name}: cannot encode as {fmt}")
    return SourceFrame(name, {"format": fmt}, buf.tobytes(), img)


def load_frames(source: str | Path, encoding: str = "raw", max_frames: int = 256) -> list[SourceFrame]:
    """Frames of an image file, a folder of images (recursively, sorted) or a video file."""
    if encoding not in ENCODINGS:
        raise SourceError(f"unknown encoding {encoding!r}; choose one of {ENCODINGS}")
    src = Path(source)
    frames: list[SourceFrame] = []
    if src.is_dir() or src.suffix.lower() in IMAGE_SUFFIXES:
        paths = [src] if src.is_file() else sorted(p for p in src.rglob("*")
                                                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for p in paths[:max_frames]:
            raw = p.read_bytes()
            img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise SourceError(f"cannot read image {p}")
            frames.append(_encode(img, str(p.relative_to(src) if src.is_dir() else p.name), encoding, raw))
    elif src.is_file():
        cap = cv2.VideoCapture(str(src))
        try:
            if not cap.isOpened():
                raise SourceError(f"{src}: not an image folder, image or video OpenCV can open")
            while len(frames) < max_frames:
                ok, img = cap.read()
                if not ok:
                    break
                frames.append(_encode(img, f"{src.name}#{len(frames)}", "png" if encoding == "file" else encoding,
                                      None))
        finally:
            cap.release()
    else:
        raise SourceError(f"{src}: no such file or folder")
    if not frames:
        raise SourceError(f"{src}: no images found ({', '.join(IMAGE_SUFFIXES)}) or no video frames")
    return frames


@dataclass
class StreamOptions:
    cameras: int = 1
    fps: float = 0.0  # per camera; 0: closed loop (next frame when one is answered)
    count: int | None = None  # frames per camera (None: each source frame once, unless duration_s)
    duration_s: float | None = None  # stop sending after this long
    timeout_ms: int = 2000
    inflight: int | None = None  # unanswered frames per camera (default 1 closed loop, 64 at a fixed rate)
    return_map: bool = False
    map_encoding: str = "png16"
    camera_prefix: str = "cam"
    live_interval_s: float = 1.0

    def max_inflight(self) -> int:
        return self.inflight or (1 if self.fps <= 0 else 64)


@dataclass
class _Camera:
    name: str
    index: int
    client: InspectionClient
    next_send: float = 0.0
    sent: int = 0
    results: int = 0
    lost: int = 0
    skipped: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    overheads: list[float] = field(default_factory=list)  # round trip - the daemon's compute - its queue wait
    outstanding: OrderedDict = field(default_factory=OrderedDict)  # frame_id -> (sent at, source index)


class CameraStreamer:
    """Streams `frames` from simulated cameras to `endpoint`; `run()` returns the summary dict.
    `on_reply(camera, source_frame, reply)` sees every matched reply (overlays, records)."""

    def __init__(self, endpoint: str, frames: list[SourceFrame], options: StreamOptions | None = None, *,
                 curve: CurveClientKeys | None = None,
                 on_reply: Callable[[str, SourceFrame, Reply], None] | None = None,
                 live: TextIO | None = None):
        if not frames:
            raise SourceError("no frames to stream")
        self.endpoint = endpoint
        self.frames = frames
        self.opt = options or StreamOptions()
        self.curve = curve
        self.on_reply = on_reply
        self.live = live
        self._stop = False
        self.context = zmq.Context()

    def stop(self) -> None:
        """Stop sending (thread-safe); run() then waits for the frames in flight and returns."""
        self._stop = True

    def _header(self, cam: _Camera, frame_id: int, frame: SourceFrame) -> bytes:
        return inspect_header(cam.name, frame_id, frame.encoding, timestamp=time.time(),
                              return_map=self.opt.return_map, map_encoding=self.opt.map_encoding)

    def run(self) -> dict[str, Any]:
        opt = self.opt
        n = len(self.frames)
        count = opt.count if opt.count is not None else (None if opt.duration_s else n)
        period = 1.0 / opt.fps if opt.fps > 0 else 0.0
        inflight = opt.max_inflight()
        cams = [_Camera(f"{opt.camera_prefix}{i}", i,
                        InspectionClient(self.endpoint, opt.timeout_ms, curve=self.curve, context=self.context))
                for i in range(opt.cameras)]
        by_socket = {c.client.socket: c for c in cams}
        poller = zmq.Poller()
        for c in cams:
            poller.register(c.client.socket, zmq.POLLIN)
        verdicts: Counter = Counter()
        scores: list[float] = []
        stages: dict[str, list[float]] = {}
        start = time.perf_counter()
        last_reply = start
        for c in cams:
            c.next_send = start
        timeout_s = opt.timeout_ms / 1e3
        next_live = start + opt.live_interval_s
        live_mark = (start, 0)
        stale = 0

        def sending(c: _Camera, now: float) -> bool:
            if self._stop or (count is not None and c.sent >= count):
                return False
            return not (opt.duration_s is not None and now - start >= opt.duration_s)

        try:
            while True:
                now = time.perf_counter()
                for c in cams:
                    if c.outstanding:
                        oldest = next(iter(c.outstanding.values()))[0]
                        if now - oldest > timeout_s:
                            c.lost += len(c.outstanding)
                            c.outstanding.clear()
                            poller.unregister(c.client.socket)
                            del by_socket[c.client.socket]
                            c.client.reset()
                            poller.register(c.client.socket, zmq.POLLIN)
                            by_socket[c.client.socket] = c
                    while sending(c, now) and (period == 0 or now >= c.next_send):
                        if period == 0 and len(c.outstanding) >= inflight:
                            break
                        if period:
                            c.next_send = max(c.next_send + period, now - period)
                            if len(c.outstanding) >= inflight:
                                c.skipped += 1
                                c.sent += 1
                                continue
                        src = (c.index * max(1, n // max(1, opt.cameras)) + c.sent) % n
                        frame_id = c.sent
                        try:
                            c.client.socket.send_multipart([self._header(c, frame_id, self.frames[src]), self.frames[src].data],
                                                           zmq.NOBLOCK)
                            c.outstanding[frame_id] = (time.perf_counter(), src)
                        except zmq.Again:
                            c.skipped += 1
                        c.sent += 1
                if not any(sending(c, now) for c in cams) and not any(c.outstanding for c in cams):
                    break
                wait = 0.1
                for c in cams:
                    if period and sending(c, now):
                        wait = min(wait, c.next_send - now)
                    if c.outstanding:
                        wait = min(wait, next(iter(c.outstanding.values()))[0] + timeout_s - now)
                if self.live is not None:
                    wait = min(wait, next_live - now)
                events = poller.poll(max(0, int(wait * 1000) + (1 if wait > 0 else 0)))
                for sock, _ in events:
                    c = by_socket.get(sock)
                    if c is None:
                        continue
                    while True:
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        t = time.perf_counter()
                        try:
                            reply = reply_from_parts(parts)
                        except ValueError:
                            c.errors["unreadable_reply"] += 1
                            continue
                        fid = reply.get("frame_id")
                        entry = c.outstanding.pop(fid, None) if isinstance(fid, int) else None
                        if entry is None:
                            stale += 1
                            continue
                        last_reply = t
                        reply.latency_ms = (t - entry[0]) * 1e3
                        if reply.type == "result":
                            c.results += 1
                            c.latencies.append(reply.latency_ms)
                            verdicts[reply.get("verdict") or "none"] += 1
                            if reply.get("score") is not None:
                                scores.append(float(reply["score"]))
                            timings = reply.get("timings_ms") or {}
                            for k, v in timings.items():
                                if isinstance(v, (int, float)):
                                    stages.setdefault(k, []).append(float(v))
                            if isinstance(timings.get("compute"), (int, float)):
                                c.overheads.append(reply.latency_ms - timings["compute"] - timings["queue_wait"])
                        else:
                            c.errors[reply.code or reply.type] += 1
                        if self.on_reply is not None:
                            self.on_reply(c.name, self.frames[entry[1]], reply)
                if self.live is not None and time.perf_counter() >= next_live:
                    now = time.perf_counter()
                    done = sum(c.results for c in cams)
                    rate = (done - live_mark[1]) / max(now - live_mark[0], 1e-9)
                    live_mark = (now, done)
                    next_live = now + opt.live_interval_s
                    self.live.write(self._live_line(now - start, cams, verdicts, rate) + "\n")
                    self.live.flush()
        finally:
            for c in cams:
                c.client.socket.close(linger=0)
            self.context.term()
        elapsed = max(last_reply - start, 1e-9)
        all_lat = [v for c in cams for v in c.latencies]
        errors: Counter = Counter()
        for c in cams:
            errors.update(c.errors)
        results = sum(c.results for c in cams)
        return {
            "endpoint": self.endpoint, "cameras": opt.cameras, "fps_target": opt.fps, "inflight": inflight,
            "frames_in_source": n, "duration_s": round(elapsed, 3),
            "sent": sum(c.sent - c.skipped for c in cams), "results": results,
            "fps": round(results / elapsed, 3), "latency_ms": percentiles(all_lat),
            # the daemon's own overhead per frame: client round trip - its compute - its queue wait (transport,
            # header checks, hand-over between its threads)
            "overhead_ms": percentiles(v for c in cams for v in c.overheads),
            "verdicts": dict(verdicts), "errors": dict(errors), "lost": sum(c.lost for c in cams),
            "skipped": sum(c.skipped for c in cams), "reconnects": sum(c.client.reconnects for c in cams),
            "stale_replies": stale,
            "score": percentiles(scores, (0, 50, 100)),
            "daemon_timings_ms_p50": {k: round(float(np.median(v)), 3) for k, v in sorted(stages.items())},
            "per_camera": {c.name: {"sent": c.sent - c.skipped, "results": c.results, "lost": c.lost,
                                    "skipped": c.skipped, "errors": dict(c.errors), "reconnects": c.client.reconnects,
                                    "latency_ms": percentiles(c.latencies)} for c in cams},
        }

    @staticmethod
    def _live_line(t: float, cams: list[_Camera], verdicts: Counter, rate: float) -> str:
        lat = percentiles([v for c in cams for v in c.latencies[-500:]])

        def ms(v):
            return "-" if v is None else f"{v:.1f}"

        errors = sum(sum(c.errors.values()) for c in cams)
        return (f"[{t:7.1f}s] sent {sum(c.sent - c.skipped for c in cams)}  results {sum(c.results for c in cams)}  "
                f"{rate:.1f} fps  latency p50 {ms(lat['p50'])} p90 {ms(lat['p90'])} p99 {ms(lat['p99'])} ms  "
                f"OK {verdicts.get('OK', 0)} NG {verdicts.get('NG', 0)}  errors {errors}  "
                f"lost {sum(c.lost for c in cams)}  skipped {sum(c.skipped for c in cams)}")


def print_summary(summary: dict[str, Any], out: TextIO = sys.stdout) -> None:
    out.write(json.dumps(summary, indent=2) + "\n")
