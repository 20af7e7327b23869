"""The line daemon under attack, in one command: fuzzed messages, a PNG memory bomb, clients that never
read, a flood, SIGTERM with frames in flight, SIGKILL and restart, a tampered bundle.

    python benchmarks/reliability.py [--bundle BUNDLE] [--messages 10000] [--seed 0]

Without --bundle it builds a small one first (the tiny DiAD preset trained for a few steps on the
embedded sample, exported to ONNX: what the tests serve). Every daemon is a child process
(`edgeinspect serve`) bound to 127.0.0.1 only; every loop here is bounded in messages or seconds.
While the attacks run, the daemon's RSS is sampled every 0.2 s and a prober sends a health request
every 0.1 s from its own connection (a health reply that does not come within 2 s counts as 2000 ms).

Phases (the daemon runs with --threads 1 --max-batch 4 --queue-per-camera 2, defaults otherwise):

* fuzz: `--messages` seeded messages from one DEALER (a window of 64 unanswered) in the classes of
  FUZZ_CLASSES, and 2 % of them more from a REQ socket; every message must get exactly one reply.
  crashes: the daemon exited; hangs: 30 s without any reply while messages were unanswered;
  unanswered: messages without a reply at the end.
* oversized: a 66 MiB frame part (over --max-frame-bytes 64 MiB) must get `frame_too_large`.
* bomb: a 381 KB PNG of 7000 x 7000 16-bit RGBA pixels (built as a stream: no 392 MB array), sent 3
  times; rss_growth_mb = highest RSS during it - RSS just before.
* slow_readers: 10 DEALER connections (rcvhwm 1, rcvbuf 4 KiB) that never read, each asking for
  float16 maps of the largest size the daemon allows (and 4096, refused) for 10 cameras every
  0.5 s for `--slow-s` seconds; rss_growth_mb as above; the replies that did not fit are counted.
* flood: 16 cameras x 16 frames in flight against 16 cameras x 1 in flight, `--flood-s` seconds
  each (closed loop, raw frames of the sample); results_fps_ratio = results/s flooded / results/s.
* sigterm: a fresh daemon (40 DDIM steps, so frames are on the model and queued), 10 frames from
  2 cameras, SIGTERM once every frame is received: unanswered = frames without a reply.
* restart: a daemon on a fixed port, a DEALER client (InspectionClient) and a REQ client (relaxed,
  correlated) sending health and frames; SIGKILL, a new daemon on the same port; clients_recovered =
  clients answered by the new daemon within 60 s.
* tampered: a copy of the bundle with one byte of one graph changed must be refused at start.

Writes benchmarks/results/reliability_<machine>.md and .json (keys: fuzz.messages, fuzz.crashes,
fuzz.hangs, fuzz.unanswered, bomb.rss_growth_mb, slow_readers.rss_growth_mb,
health_ms_p99_under_attack, flood.results_fps_ratio, sigterm.unanswered, restart.clients_recovered).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SAMPLE = REPO / "data" / "mtd_sample"
LOOPBACK = "tcp://127.0.0.1"
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
DAEMON_ARGS = ("--threads", "1", "--max-batch", "4", "--queue-per-camera", "2", "--log-level", "warning")
HEALTH_TIMEOUT_MS = 2000
HANG_S = 30.0

# --------------------------------------------------------------------------- fuzzed messages


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def _jpeg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img)[1].tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(height: int = 7000, width: int = 7000) -> bytes:
    """A valid PNG of height x width 16-bit RGBA zeros (a few hundred KB), compressed row by row."""
    row = b"\x00" + bytes(width * 8)  # filter byte + RGBA16 pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _with_png_size(png: bytes, height: int, width: int) -> bytes:
    """A PNG whose IHDR declares another size (CRC recomputed, so only the size is wrong)."""
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:8] + _png_chunk(b"IHDR", ihdr) + png[33:]


def _with_jpeg_size(jpg: bytes, height: int, width: int) -> bytes:
    i = 2
    while i + 9 < len(jpg):
        marker, (length,) = jpg[i + 1], struct.unpack(">H", jpg[i + 2:i + 4])
        if marker in (0xC0, 0xC1, 0xC2):
            return jpg[:i + 5] + struct.pack(">HH", height, width) + jpg[i + 9:]
        i += 2 + length
    return jpg


def _header(rng: random.Random, enc: dict, **extra) -> dict:
    h = {"type": "inspect", "camera_id": f"fz{rng.randrange(24)}", "frame_id": rng.randrange(10**6), "encoding": enc}
    h.update(extra)
    return h


def _dump(h: Any) -> bytes:
    return json.dumps(h, separators=(",", ":")).encode()


class Fuzzer:
    """Seeded message classes; `message(cls)` -> the message's parts."""

    def __init__(self, seed: int, max_map_size: int = 1024):
        self.rng = random.Random(seed)
        img = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
        self.raw = img
        self.png, self.jpeg = _png(img), _jpeg(img)
        self.max_map_size = max_map_size

    def _frame(self, fmt: str) -> tuple[dict, bytes]:
        if fmt == "png":
            return {"format": "png"}, self.png
        if fmt == "jpeg":
            return {"format": "jpeg"}, self.jpeg
        return {"format": "raw", "dtype": "uint8", "shape": list(self.raw.shape)}, self.raw.tobytes()

    def _valid(self) -> list[bytes]:
        enc, data = self._frame(self.rng.choice(["raw", "png", "jpeg"]))
        extra = {}
        if self.rng.random() < 0.3:
            extra["options"] = {"return_map": True, "map_encoding": self.rng.choice(["png16", "float16"])}
        if self.rng.random() < 0.3:
            extra["timestamp"] = self.rng.random() * 1e9
        return [_dump(_header(self.rng, enc, **extra)), data]

    def _junk(self) -> Any:
        r = self.rng
        return r.choice([None, True, -1, 0, 2**70, 1e308, -0.5, "", "x" * r.randrange(200), [], [1, 2, 3], [[]], {},
                         {"a": {"b": [None]}}, [70000, 70000], [-5, 5], "uint8", "png"])

    def message(self, cls: str) -> list[bytes]:
        r = self.rng
        if cls == "valid":
            return self._valid()
        if cls == "empty":
            return [b""]
        if cls == "random_bytes":
            return [bytes(r.getrandbits(8) for _ in range(r.randrange(0, 120))) for _ in range(r.randrange(1, 5))]
        if cls == "wrong_parts":
            t = r.choice(["health", "stats", "inspect"])
            if t == "inspect":
                h, data = self._valid()
                return r.choice([[h], [h, data, data], [h, data, b"", b"x"]])
            return [_dump({"type": t})] + [b"x"] * r.randrange(1, 3)
        if cls == "truncated_frame":
            h, data = self._valid()
            return [h, data[:r.randrange(1, max(2, len(data) - 1))]]
        if cls == "non_image_frame":
            fmt = r.choice(["png", "jpeg"])
            return [_dump(_header(r, {"format": fmt})), r.choice([b"hello world", bytes(500), self.png[::-1],
                                                                   (self.jpeg if fmt == "png" else self.png)])]
        if cls == "corrupt_frame":
            fmt = r.choice(["png", "jpeg"])
            b = bytearray(self.png if fmt == "png" else self.jpeg)
            for _ in range(r.randrange(1, 12)):
                b[r.randrange(40, len(b) - 16)] = r.getrandbits(8)
            return [_dump(_header(r, {"format": fmt})), bytes(b)]
        if cls == "huge_declared_size":
            k = r.randrange(3)
            if k == 0:
                return [_dump(_header(r, {"format": "png"})), _with_png_size(self.png, r.choice([60000, 9000]),
                                                                              r.choice([60000, 9000]))]
            if k == 1:
                return [_dump(_header(r, {"format": "jpeg"})), _with_jpeg_size(self.jpeg, 65000, 65000)]
            return [_dump(_header(r, {"format": "raw", "dtype": "uint16", "shape": [65535, 65535, 4]})), bytes(64)]
        if cls == "wrong_dtype_dims":
            enc = {"format": "raw", "dtype": r.choice(["float32", "int8", "uint32", "bool", "uint8"]),
                   "shape": r.choice([[16, 16, 5], [16], [1, 2, 3, 4], [0, 16], [-4, 4], [16, 16, 2], [16, 16]])}
            return [_dump(_header(r, enc)), bytes(256)]
        if cls == "raw_size_mismatch":
            enc, data = self._frame("raw")
            return [_dump(_header(r, enc)), data[:-r.randrange(1, 100)] if r.random() < 0.5 else data + b"\x00"]
        if cls == "invalid_json":
            h = bytearray(self._valid()[0])
            for _ in range(r.randrange(1, 6)):
                h[r.randrange(len(h))] = r.choice(b'{}[]",:\\\x00\xff0a ')
            return [bytes(h), self.png]
        if cls == "deep_json":
            depth = r.choice([50, 1000, 5000])
            return [(b"[" * depth + b"]" * depth) if r.random() < 0.5 else (b'{"a":' * depth + b"1" + b"}" * depth)]
        if cls == "long_strings":
            n = r.choice([100, 5000, 20000])
            h = _header(r, {"format": "png"})
            h[r.choice(["camera_id", "frame_id", "type"])] = "c" * n
            return [_dump(h), self.png]
        if cls == "nan_inf":
            value = r.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" + "0" * 30])
            key = r.choice(["timestamp", "frame_id"])
            body = json.loads(self._valid()[0])
            body.pop(key, None)
            return [_dump(body)[:-1] + f',"{key}":{value}}}'.encode(), self.png]
        if cls == "duplicate_keys":
            return [r.choice([b'{"type":"health","type":"stats"}',
                              self._valid()[0][:-1] + b',"camera_id":"other"}',
                              b'{"type":"inspect","camera_id":"a","camera_id":"b","frame_id":1,'
                              b'"encoding":{"format":"png","format":"jpeg"}}'])] + \
                ([] if r.random() < 0.3 else [self.png])
        if cls == "version":
            v = r.choice(["1.0", "true", '"1"', "2", "0", "-1", "null", "[1]"])
            return [f'{{"v":{v},"type":"health"}}'.encode()]
        if cls == "unknown_fields":
            h = json.loads(self._valid()[0])
            target = h["encoding"] if r.random() < 0.4 else h
            target[r.choice(["priority", "Type", "extra", "shape2", "encodings"])] = self._junk()
            return [_dump(h), self.png]
        if cls == "type_confusion":
            h = json.loads(self._valid()[0])
            key = r.choice(["frame_id", "camera_id", "encoding", "options", "timestamp", "type"])
            h[key] = self._junk()
            return [_dump(h), self.png]
        if cls == "map_cap":
            h = _header(r, {"format": "png"}, options={"return_map": True, "map_encoding": "float16",
                                                       "map_size": r.choice([self.max_map_size + 1, 4096])})
            return [_dump(h), self.png]
        if cls == "mutated_header":
            h = json.loads(self._valid()[0])
            for _ in range(r.randrange(1, 4)):
                target = h["encoding"] if r.random() < 0.4 and isinstance(h.get("encoding"), dict) else h
                keys = list(target)
                op = r.randrange(3)
                if op == 0 and keys:
                    del target[r.choice(keys)]
                elif keys:
                    target[r.choice(keys)] = self._junk()
            return [_dump(h), self.png]
        raise ValueError(cls)


# class -> weight (relative frequency); every class of issue 26 and a share of valid frames
FUZZ_CLASSES = {
    "valid": 8, "empty": 3, "random_bytes": 8, "wrong_parts": 6, "truncated_frame": 6, "non_image_frame": 5,
    "corrupt_frame": 8, "huge_declared_size": 5, "wrong_dtype_dims": 5, "raw_size_mismatch": 5, "invalid_json": 8,
    "deep_json": 3, "long_strings": 4, "nan_inf": 5, "duplicate_keys": 4, "version": 4, "unknown_fields": 5,
    "type_confusion": 6, "map_cap": 2, "mutated_header": 8,
}


def fuzz_messages(n: int, seed: int = 0, max_map_size: int = 1024) -> list[tuple[str, list[bytes]]]:
    """n seeded (class, parts) messages drawn by FUZZ_CLASSES' weights."""
    fz = Fuzzer(seed, max_map_size)
    names, weights = list(FUZZ_CLASSES), list(FUZZ_CLASSES.values())
    pick = random.Random(seed + 1)
    return [(cls, fz.message(cls)) for cls in pick.choices(names, weights, k=n)]


# --------------------------------------------------------------------------- instruments


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Monitor(threading.Thread):
    """Samples the daemon's RSS (every 0.2 s) and health latency (every 0.1 s), tagged with the phase."""

    def __init__(self, pid: int, endpoint: str):
        super().__init__(daemon=True)
        self.pid, self.endpoint = pid, endpoint
        self.phase = "idle"
        self.rss: list[tuple[str, float, float]] = []  # (phase, t, MiB)
        self.health: list[tuple[str, float]] = []  # (phase, ms)
        self._stop_event = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context()
        sock = None
        next_rss = 0.0
        try:
            while not self._stop_event.is_set():
                now = time.monotonic()
                if now >= next_rss:
                    try:
                        self.rss.append((self.phase, now, round(rss_mb(self.pid), 1)))
                    except OSError:
                        return
                    next_rss = now + 0.2
                if sock is None:
                    sock = ctx.socket(zmq.DEALER)
                    sock.linger = 0
                    sock.connect(self.endpoint)
                phase = self.phase
                t0 = time.perf_counter()
                sock.send(b'{"type":"health"}')
                if sock.poll(HEALTH_TIMEOUT_MS):
                    sock.recv_multipart()
                    self.health.append((phase, (time.perf_counter() - t0) * 1e3))
                else:
                    self.health.append((phase, float(HEALTH_TIMEOUT_MS)))
                    sock.close(0)
                    sock = None
                self._stop_event.wait(0.1)
        finally:
            if sock is not None:
                sock.close(0)
            ctx.term()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    def rss_growth(self, phase: str, before: float) -> float:
        during = [v for p, _, v in self.rss if p == phase]
        return round(max(during, default=before) - before, 1)

    def last_rss(self) -> float:
        return self.rss[-1][2] if self.rss else float("nan")


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def dealer(ctx: zmq.Context, endpoint: str, **opts) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    for k, v in opts.items():
        setattr(s, k, v)
    s.connect(endpoint)
    return s


def recv_replies(sock: zmq.Socket, timeout_ms: int) -> list[dict]:
    from edgeinspect.runtime.daemon.client import reply_from_parts

    out = []
    while sock.poll(timeout_ms):
        out.append(reply_from_parts(sock.recv_multipart()).data)
        timeout_ms = 0
    return out


def stats_of(endpoint: str) -> dict:
    from edgeinspect.runtime.daemon.client import InspectionClient

    with InspectionClient(endpoint, timeout_ms=30_000) as c:
        return c.stats().data


# --------------------------------------------------------------------------- phases


def phase_fuzz(endpoint: str, pid_alive, messages: int, seed: int, log) -> dict:
    msgs = fuzz_messages(messages, seed)
    n_req = max(1, messages // 50)
    req_msgs = fuzz_messages(n_req, seed + 7)
    ctx = zmq.Context()
    sock = dealer(ctx, endpoint, sndhwm=10_000, rcvhwm=10_000)
    replies: list[dict] = []
    codes: dict[str, int] = {}
    hangs = 0
    window, sent = 64, 0
    t_start = time.monotonic()
    last_reply = time.monotonic()
    crashed = False
    while sent < len(msgs) or len(replies) < sent:
        while sent < len(msgs) and sent - len(replies) < window:
            sock.send_multipart(msgs[sent][1])
            sent += 1
        got = recv_replies(sock, 200)
        if got:
            last_reply = time.monotonic()
            replies += got
        elif not pid_alive():
            crashed = True
            break
        elif time.monotonic() - last_reply > HANG_S:
            hangs += 1
            log(f"fuzz: no reply for {HANG_S:.0f} s with {sent - len(replies)} unanswered")
            break
        if sent and sent % 2000 == 0 and sent - len(replies) == window:
            log(f"fuzz: {sent} sent, {len(replies)} answered")
    sock.close(0)
    # the REQ part: one request at a time, as a REQ client must
    req_replies = 0
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.req_relaxed = 1  # may send again after a timeout
    req.connect(endpoint)
    for _, parts in req_msgs:
        if crashed:
            break
        req.send_multipart(parts)
        if req.poll(int(HANG_S * 1000)):
            req.recv_multipart()
            req_replies += 1
        elif not pid_alive():
            crashed = True
        else:
            hangs += 1
    req.close(0)
    ctx.term()
    for r in replies:
        key = r.get("code") or r.get("type")
        codes[key] = codes.get(key, 0) + 1
    total = len(msgs) + len(req_msgs)
    by_class: dict[str, int] = {}
    for cls, _ in msgs + req_msgs:
        by_class[cls] = by_class.get(cls, 0) + 1
    answered = len(replies) + req_replies
    return {"messages": total, "dealer_messages": len(msgs), "req_messages": len(req_msgs),
            "crashes": int(crashed), "hangs": hangs, "unanswered": max(0, total - answered),
            "extra_replies": max(0, answered - total),
            "seconds": round(time.monotonic() - t_start, 1), "reply_kinds": dict(sorted(codes.items())),
            "classes": dict(sorted(by_class.items()))}


def phase_oversized(endpoint: str, nbytes: int) -> dict:
    ctx = zmq.Context()
    sock = dealer(ctx, endpoint)
    sock.send_multipart([_dump({"type": "inspect", "camera_id": "big", "frame_id": 1, "encoding": {"format": "png"}}),
                         bytes(nbytes)])
    got = recv_replies(sock, 60_000)
    sock.close(0)
    ctx.term()
    return {"part_mb": round(nbytes / 2**20, 1), "reply": got[0].get("code") if got else None}


def phase_bomb(endpoint: str, monitor: Monitor, repeats: int = 3) -> dict:
    bomb = png_bomb()
    ctx = zmq.Context()
    sock = dealer(ctx, endpoint)
    before = monitor.last_rss()
    monitor.phase = "bomb"
    replies = []
    for i in range(repeats):
        sock.send_multipart([_dump({"type": "inspect", "camera_id": "c", "frame_id": i,
                                    "encoding": {"format": "png"}}), bomb])
        replies += recv_replies(sock, 60_000)
    time.sleep(1.0)
    monitor.phase = "after"
    sock.close(0)
    ctx.term()
    return {"png_kb": round(len(bomb) / 1024, 1), "declared": "7000x7000 16-bit RGBA", "sent": repeats,
            "replies": [r.get("code") or r.get("type") for r in replies], "rss_mb_before": before,
            "rss_growth_mb": monitor.rss_growth("bomb", before)}


def phase_slow_readers(endpoint: str, monitor: Monitor, seconds: float, max_map_size: int, clients: int = 10,
                       cameras: int = 10) -> dict:
    fz = Fuzzer(3)
    ctx = zmq.Context()
    socks = [dealer(ctx, endpoint, rcvhwm=1, rcvbuf=4096, sndhwm=100_000) for _ in range(clients)]
    before = monitor.last_rss()
    stats_before = stats_of(endpoint)
    monitor.phase = "slow_readers"
    sent = 0
    t_end = time.monotonic() + seconds
    frame_id = 0
    while time.monotonic() < t_end:
        for k, s in enumerate(socks):
            for cam in range(cameras):
                size = 4096 if cam == 0 else max_map_size
                h = _header(fz.rng, {"format": "png"}, options={"return_map": True, "map_encoding": "float16",
                                                                "map_size": size})
                h["camera_id"], h["frame_id"] = f"slow{k}-{cam}", frame_id
                frame_id += 1
                try:
                    s.send_multipart([_dump(h), fz.png], zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass
        time.sleep(0.5)
    time.sleep(2.0)
    monitor.phase = "after"
    stats = stats_of(endpoint)
    for s in socks:
        s.close(0)
    ctx.term()
    dropped = stats["replies_dropped"] - stats_before["replies_dropped"]
    return {"clients": clients, "cameras_each": cameras, "seconds": seconds, "requests_sent": sent,
            "map_size": max_map_size, "replies_dropped": dropped,
            "drop_reasons": {k: v - stats_before["errors"].get(k, 0) for k, v in stats["errors"].items()
                             if k.startswith("reply_dropped")},
            "rss_mb_before": before, "rss_growth_mb": monitor.rss_growth("slow_readers", before)}


def phase_flood(endpoint: str, monitor: Monitor, seconds: float) -> dict:
    from edgeinspect.runtime.daemon.camera import CameraStreamer, StreamOptions, load_frames

    frames = load_frames(SAMPLE / "test", "raw", 32)
    runs = {}
    for name, inflight in (("one_in_flight", 1), ("flooded", 16)):
        monitor.phase = "flood" if inflight > 1 else "flood_baseline"
        opts = StreamOptions(cameras=16, fps=0.0, duration_s=seconds, inflight=inflight, timeout_ms=120_000,
                             camera_prefix=f"{name}-")
        s = CameraStreamer(endpoint, frames, opts).run()
        runs[name] = {"results": s["results"], "fps": s["fps"], "sent": s["sent"], "errors": s["errors"],
                      "lost": s["lost"], "latency_ms_p50": s["latency_ms"]["p50"]}
    monitor.phase = "after"
    ratio = runs["flooded"]["fps"] / max(runs["one_in_flight"]["fps"], 1e-9)
    return {"cameras": 16, "inflight": 16, "seconds": seconds, "runs": runs, "results_fps_ratio": round(ratio, 3)}


def phase_sigterm(bundle: Path, log) -> dict:
    from edgeinspect.runtime.daemon.client import InspectionClient, inspect_parts
    from edgeinspect.runtime.daemon.launch import start_daemon

    d = start_daemon(bundle, *DAEMON_ARGS, "--queue-per-camera", "8", "--set", "inference.steps=40", env=CHILD_ENV)
    ctx = zmq.Context()
    socks = [dealer(ctx, d.endpoint) for _ in range(2)]
    paths = sorted((SAMPLE / "test").rglob("*.jpg"))[:10]
    for i, p in enumerate(paths):
        socks[i % 2].send_multipart(list(inspect_parts(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), f"term{i % 2}", i)))
    with InspectionClient(d.endpoint, timeout_ms=20_000) as c:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = c.stats()
            if s["accepted"] >= len(paths) and c.health()["model_busy"]:
                break
            time.sleep(0.01)
        queued = s["queue_depth"]
    d.process.send_signal(signal.SIGTERM)
    replies = []
    deadline = time.monotonic() + 120
    while len(replies) < len(paths) and time.monotonic() < deadline:
        for s in socks:
            replies += recv_replies(s, 100)
    code = d.process.wait(120)
    for s in socks:
        s.close(0)
    ctx.term()
    kinds: dict[str, int] = {}
    for r in replies:
        kinds[r.get("code") or r["type"]] = kinds.get(r.get("code") or r["type"], 0) + 1
    log(f"sigterm: {len(replies)} replies {kinds}, exit {code}")
    return {"frames": len(paths), "queued_at_signal": queued, "replies": kinds,
            "unanswered": len(paths) - len(replies), "results": kinds.get("result", 0), "exit_code": code}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase_restart(bundle: Path, log) -> dict:
    from edgeinspect.runtime.daemon.client import DaemonTimeout, InspectionClient, inspect_parts, reply_from_parts
    from edgeinspect.runtime.daemon.launch import start_daemon

    endpoint = f"{LOOPBACK}:{_free_port()}"
    first = start_daemon(bundle, *DAEMON_ARGS, bind=endpoint, env=CHILD_ENV)
    frame = cv2.imread(str(sorted((SAMPLE / "test").rglob("*.jpg"))[0]), cv2.IMREAD_UNCHANGED)
    dealer_client = InspectionClient(endpoint, timeout_ms=1500)
    ctx = zmq.Context()

    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.req_relaxed = 1  # may send again after a timeout (the daemon answers the plain REQ envelope, not REQ_CORRELATE)
    req.connect(endpoint)

    def ask_dealer(i: int) -> bool:
        try:
            return dealer_client.inspect(frame, "restart-dealer", i).type == "result"
        except DaemonTimeout:
            return False

    def ask_req(i: int) -> bool:
        req.send_multipart(list(inspect_parts(frame, "restart-req", i)))
        if req.poll(1500):
            return reply_from_parts(req.recv_multipart()).type == "result"
        return False

    before = {"dealer": ask_dealer(0), "req": ask_req(0)}
    first.kill()
    time.sleep(0.5)
    second = start_daemon(bundle, *DAEMON_ARGS, bind=endpoint, env=CHILD_ENV)
    recovered = {}
    try:
        for name, ask in (("dealer", ask_dealer), ("req", ask_req)):
            deadline = time.monotonic() + 60
            i = 1
            recovered[name] = False
            while time.monotonic() < deadline:
                if ask(i):
                    recovered[name] = True
                    break
                i += 1
    finally:
        dealer_client.close()
        req.close(0)
        ctx.term()
        code = second.terminate()
    log(f"restart: before {before}, recovered {recovered}, exit {code}")
    return {"clients": 2, "answered_before_kill": sum(before.values()), "recovered": recovered,
            "clients_recovered": sum(recovered.values()), "second_exit_code": code}


def phase_tampered(bundle: Path, work: Path) -> dict:
    from edgeinspect.runtime.daemon.launch import LaunchError, start_daemon

    copy = work / "tampered"
    shutil.copytree(bundle, copy)
    graph = sorted((copy / "onnx").glob("*.onnx"))[0]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    try:
        d = start_daemon(copy, *DAEMON_ARGS, env=CHILD_ENV, timeout_s=120)
    except LaunchError as e:
        text = str(e)
        return {"refused": True, "names_the_file": graph.name in text, "message": text.splitlines()[-1][:300]}
    d.terminate()
    return {"refused": False, "names_the_file": False, "message": "the daemon started on a tampered bundle"}


# --------------------------------------------------------------------------- bundle


def build_bundle(work: Path, log) -> Path:
    """The tiny DiAD preset trained for a few steps on the embedded sample, exported to ONNX (fp32)."""
    import warnings

    import torch

    from edgeinspect.config import build_config
    from edgeinspect.export.bundle import export_bundle
    from edgeinspect.training.diad import train_diad

    log("building a tiny bundle (a few training steps, ONNX export)")
    cfg = build_config("diad", "tiny", {"train": {"data_root": str(SAMPLE), "threads": 1}})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        train_diad(cfg, work / "run", progress=False)
        export_bundle(work / "run", work / "bundle", ("fp32",), threads=1)
    torch.set_num_threads(n)
    return work / "bundle"


# --------------------------------------------------------------------------- main


TARGETS = {  # key: (comparison, target)
    "fuzz.crashes": ("==", 0), "fuzz.hangs": ("==", 0), "fuzz.unanswered": ("==", 0),
    "bomb.rss_growth_mb": ("<=", 200), "slow_readers.rss_growth_mb": ("<=", 200),
    "health_ms_p99_under_attack": ("<=", 50), "flood.results_fps_ratio": (">=", 0.9),
    "sigterm.unanswered": ("==", 0), "restart.clients_recovered": ("==", 2),
}


def met(key: str, value: Any) -> bool:
    op, target = TARGETS[key]
    if value is None:
        return False
    return {"==": value == target, "<=": value <= target, ">=": value >= target}[op]


def markdown(res: dict) -> str:
    k = res["keys"]
    lines = [f"# Line daemon reliability under attack: {res['machine']['slug']}", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']['cpu']} ({res['machine']['logical_cpus']} logical CPUs); {res['date']}. "
             f"Load average at start {res['machine']['loadavg_start']}, at end {res['machine']['loadavg_end']} "
             "(other work shares these cores: timings are disturbed).", "",
             f"Bundle: `{res['bundle']}` (tiny DiAD, {res['image_size']} px); daemon `edgeinspect serve "
             f"{' '.join(DAEMON_ARGS)}`, 127.0.0.1 only. Total {res['seconds']:.0f} s.", "",
             "| key | value | target | met |", "|---|---|---|---|"]
    for key, (op, target) in TARGETS.items():
        lines.append(f"| `{key}` | {k[key]} | {op} {target} | {'yes' if met(key, k[key]) else 'NO'} |")
    f, b, s, fl = res["fuzz"], res["bomb"], res["slow_readers"], res["flood"]
    lines += ["", "## Phases", "",
              f"- fuzz: {f['messages']} messages ({f['dealer_messages']} DEALER, {f['req_messages']} REQ) in "
              f"{f['seconds']} s; classes {f['classes']}; replies {f['reply_kinds']}.",
              f"- oversized part: {res['oversized']['part_mb']} MiB -> `{res['oversized']['reply']}` (parts over "
              "2 x --max-frame-bytes make libzmq close the connection: a message is read whole).",
              f"- bomb: {b['png_kb']} KB PNG declaring {b['declared']}, sent {b['sent']}x -> {b['replies']}; RSS "
              f"{b['rss_mb_before']} MiB before, growth {b['rss_growth_mb']} MiB.",
              f"- slow readers: {s['clients']} DEALERs never reading, {s['cameras_each']} cameras each, float16 maps "
              f"of {s['map_size']} px (and 4096, refused) every 0.5 s for {s['seconds']} s: {s['requests_sent']} "
              "requests, "
              f"{s['replies_dropped']} replies dropped and counted ({s['drop_reasons']}); RSS {s['rss_mb_before']} "
              f"MiB before, growth {s['rss_growth_mb']} MiB.",
              f"- flood: 16 cameras, closed loop, {fl['seconds']} s each: 1 in flight "
              f"{fl['runs']['one_in_flight']['fps']} results/s, 16 in flight {fl['runs']['flooded']['fps']} results/s "
              f"(errors {fl['runs']['flooded']['errors']}); ratio {fl['results_fps_ratio']}.",
              f"- health under attack: p50 {res['health']['p50_under_attack']} ms, p99 "
              f"{res['health']['p99_under_attack']} ms, max {res['health']['max_under_attack']} ms over "
              f"{res['health']['n_under_attack']} probes; by phase {res['health']['by_phase']}.",
              f"- SIGTERM: {res['sigterm']['frames']} frames ({res['sigterm']['queued_at_signal']} queued at the "
              f"signal) -> {res['sigterm']['replies']}, exit {res['sigterm']['exit_code']}.",
              f"- SIGKILL + restart: recovered {res['restart']['recovered']}.",
              f"- tampered bundle: refused {res['tampered']['refused']}, names the file "
              f"{res['tampered']['names_the_file']}: `{res['tampered']['message']}`.",
              f"- daemon RSS: idle {res['rss']['idle_mb']} MiB, max {res['rss']['max_mb']} MiB; exit code of the "
              f"attacked daemon {res['exit_code']}; final stats errors {res['final_stats_errors']}.", "",
              f"Numbers: `{res['json_file']}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: build a tiny one)")
    ap.add_argument("--messages", type=int, default=10_000, help="fuzzed messages (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow-s", type=float, default=20.0, help="never-reading clients phase, seconds")
    ap.add_argument("--flood-s", type=float, default=20.0, help="each flood run, seconds")
    ap.add_argument("--oversized-mb", type=float, default=66.0, help="the oversized frame part, MiB")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--machine", help="machine slug for the file names (default cpu<N>)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print("reliability:", *a, file=sys.stderr, flush=True))

    from edgeinspect.runtime.bundle_loading import load_bundle
    from edgeinspect.runtime.daemon.launch import start_daemon
    from edgeinspect.core.atomic import write_text_atomic
    from edgeinspect.evaluation.machine import cpu_name, logical_cpus

    t0 = time.monotonic()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="edgeinspect-reliability-"))
    atexit.register(shutil.rmtree, work, True)
    bundle = args.bundle or build_bundle(work, log)
    image_size = int(load_bundle(bundle).manifest["image_size"])

    log("starting the daemon")
    d = start_daemon(bundle, *DAEMON_ARGS, env=CHILD_ENV)
    monitor = Monitor(d.pid, d.endpoint)
    monitor.start()
    try:
        time.sleep(2.0)
        idle = monitor.last_rss()
        max_map = 1024
        log(f"fuzz: {args.messages} messages")
        monitor.phase = "fuzz"
        fuzz = phase_fuzz(d.endpoint, d.alive, args.messages, args.seed, log)
        monitor.phase = "oversized"
        log("oversized part")
        oversized = phase_oversized(d.endpoint, int(args.oversized_mb * 2**20))
        monitor.phase = "after"
        log("PNG bomb")
        bomb = phase_bomb(d.endpoint, monitor)
        log(f"10 never-reading clients, {args.slow_s:g} s")
        slow = phase_slow_readers(d.endpoint, monitor, args.slow_s, max_map)
        log(f"flood, 2 x {args.flood_s:g} s")
        flood = phase_flood(d.endpoint, monitor, args.flood_s)
        final_stats = stats_of(d.endpoint)
    finally:
        monitor.stop()
        exit_code = d.terminate(timeout=120)
    log("SIGTERM with frames in flight")
    sigterm = phase_sigterm(bundle, log)
    log("SIGKILL and restart")
    restart = phase_restart(bundle, log)
    log("tampered bundle")
    tampered = phase_tampered(bundle, work)

    attack = ("fuzz", "oversized", "bomb", "slow_readers", "flood")
    under = [ms for p, ms in monitor.health if p in attack]
    by_phase = {}
    for p in dict.fromkeys(p for p, _ in monitor.health):
        v = [ms for q, ms in monitor.health if q == p]
        by_phase[p] = {"p50": pct(v, 50), "p99": pct(v, 99), "max": round(max(v), 2), "n": len(v)}
    machine = args.machine or f"cpu{logical_cpus()}"
    out_json = args.results / f"reliability_{machine}.json"
    keys = {
        "fuzz.messages": fuzz["messages"], "fuzz.crashes": fuzz["crashes"], "fuzz.hangs": fuzz["hangs"],
        "fuzz.unanswered": fuzz["unanswered"], "bomb.rss_growth_mb": bomb["rss_growth_mb"],
        "slow_readers.rss_growth_mb": slow["rss_growth_mb"], "health_ms_p99_under_attack": pct(under, 99),
        "flood.results_fps_ratio": flood["results_fps_ratio"], "sigterm.unanswered": sigterm["unanswered"],
        "restart.clients_recovered": restart["clients_recovered"],
    }
    res = {
        **keys, "keys": keys, "targets_met": {k: met(k, keys[k]) for k in TARGETS},
        "fuzz": fuzz, "oversized": oversized, "bomb": bomb, "slow_readers": slow, "flood": flood,
        "sigterm": sigterm, "restart": restart, "tampered": tampered,
        "health": {"p50_under_attack": pct(under, 50), "p99_under_attack": pct(under, 99),
                   "max_under_attack": round(max(under), 2) if under else None, "n_under_attack": len(under),
                   "by_phase": by_phase},
        "rss": {"idle_mb": idle, "max_mb": max((v for _, _, v in monitor.rss), default=None),
                "samples": [[p, round(t - monitor.rss[0][1], 2), v] for p, t, v in monitor.rss]},
        "exit_code": exit_code, "final_stats_errors": final_stats["errors"],
        "codec_messages": final_stats["codec_messages"],
        "bundle": str(bundle) if args.bundle else "built by this run (tiny preset)", "image_size": image_size,
        "machine": {"slug": machine, "cpu": cpu_name(), "logical_cpus": logical_cpus(),
                    "python": platform.python_version(), "loadavg_start": [round(v, 2) for v in load_start],
                    "loadavg_end": [round(v, 2) for v in os.getloadavg()]},
        "command": "python benchmarks/reliability.py " + " ".join(shlex.quote(a) for a in (
            argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - t0, 1), "json_file": out_json.name,
    }
    write_text_atomic(out_json, json.dumps(res, indent=2) + "\n")
    write_text_atomic(args.results / f"reliability_{machine}.md", markdown(res))
    print(f"wrote {args.results / f'reliability_{machine}.md'} and {out_json}")
    print(json.dumps({k: [v, "met" if res["targets_met"][k] else "NOT met"] for k, v in keys.items() if k in TARGETS},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
