"""The daemon as its own process (`python -m edgeinspect.serve_cli serve`, as `edgeinspect serve`): a fuzz
of thousands of random and mutated messages with zero crashes and one reply each, bounded queue and
flat memory under a sender faster than the model, SIGTERM answering in-flight and queued frames before
exiting 0."""

from __future__ import annotations

import json
import random
import signal
import time

import cv2
import numpy as np
import pytest
import zmq

from edgeinspect.runtime.daemon.client import InspectionClient, inspect_parts, reply_from_parts
from edgeinspect.runtime.daemon.launch import start_daemon
from edgeinspect.runtime.daemon.stats import rss_mb

try:
    from tests.test_serve import direct_scores, raw_gray, sample_paths, serve_bundle
except ImportError:
    from test_serve import direct_scores, raw_gray, sample_paths, serve_bundle

CHILD_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def launch(*args: str):
    return start_daemon(serve_bundle(), "--threads", "1", *args, env=CHILD_ENV, nice=5)


@pytest.fixture
def dealer():
    ctx = zmq.Context()
    socks = []

    def make(endpoint):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.sndhwm = s.rcvhwm = 10000
        s.connect(endpoint)
        socks.append(s)
        return s

    yield make
    for s in socks:
        s.close()
    ctx.term()


def collect(sock, n: int, timeout_s: float) -> list:
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        if sock.poll(200):
            out.append(reply_from_parts(sock.recv_multipart()))
    return out


# --------------------------------------------------------------------------- fuzz


def _valid_header(rng: random.Random) -> dict:
    fmt = rng.choice(["raw", "png", "jpeg"])
    enc = {"format": fmt}
    if fmt == "raw":
        enc.update(dtype=rng.choice(["uint8", "uint16"]), shape=rng.choice([[16, 16], [12, 20, 3], [8, 8, 1]]))
    h = {"type": "inspect", "camera_id": f"fz{rng.randrange(24)}", "frame_id": rng.randrange(10**6),
         "encoding": enc}
    if rng.random() < 0.3:
        h["options"] = {"return_map": rng.random() < 0.5, "map_encoding": rng.choice(["png16", "float16"])}
    if rng.random() < 0.3:
        h["timestamp"] = rng.random() * 1e9
    return h


def _junk_value(rng: random.Random):
    return rng.choice([None, True, -1, 0, 2**70, 1e308, -0.5, "", "x" * rng.randrange(200), [], [1, 2, 3],
                       [[]], {}, {"a": {"b": [None]}}, [70000, 70000], [-5, 5], "uint8", "png"])


def _mutate_header(rng: random.Random, h: dict) -> dict:
    h = json.loads(json.dumps(h))
    for _ in range(rng.randrange(1, 4)):
        target = h["encoding"] if rng.random() < 0.4 and isinstance(h.get("encoding"), dict) else h
        op = rng.randrange(4)
        keys = list(target)
        if op == 0 and keys:
            del target[rng.choice(keys)]
        elif op == 1:
            target[rng.choice(["extra", "priority", "Type", "shape", "dtype", "format", "v"])] = _junk_value(rng)
        elif keys:
            target[rng.choice(keys)] = _junk_value(rng)
    return h


def _frame_for(rng: random.Random, h: dict, images: dict) -> bytes:
    enc = h.get("encoding") if isinstance(h.get("encoding"), dict) else {}
    fmt = enc.get("format")
    if fmt in ("png", "jpeg"):
        return images[fmt]
    shape = enc.get("shape")
    try:
        n = int(np.prod(shape)) * (2 if enc.get("dtype") == "uint16" else 1)
    except (TypeError, ValueError, OverflowError):
        n = 64
    n = max(0, min(n, 200_000))
    return bytes(rng.getrandbits(8) for _ in range(min(n, 64))) + bytes(max(0, n - 64))


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0 and b:
        del b[rng.randrange(len(b)):]
    elif op == 1:
        b += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 40)))
    elif op == 2 and b:
        for _ in range(rng.randrange(1, 12)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
    elif op == 3 and len(b) > 20:
        i = rng.randrange(len(b) - 10)
        del b[i:i + rng.randrange(1, 10)]
    return bytes(b)


def fuzz_messages(n: int, seed: int = 1234) -> list[list[bytes]]:
    rng = random.Random(seed)
    img = np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)
    images = {"png": cv2.imencode(".png", img)[1].tobytes(), "jpeg": cv2.imencode(".jpg", img)[1].tobytes()}
    msgs = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.15:  # random bytes, random part counts
            parts = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
                     for _ in range(rng.randrange(1, 5))]
        elif kind < 0.25:  # other request types, wrong part counts
            t = rng.choice(["health", "stats", "reboot", "", None, 5])
            parts = [json.dumps({"type": t}).encode()] + [b"x"] * rng.randrange(0, 3)
            if rng.random() < 0.3:
                parts = [b""] + parts  # REQ-style envelope
        elif kind < 0.55:  # mutated header
            h = _mutate_header(rng, _valid_header(rng))
            parts = [json.dumps(h).encode(), _frame_for(rng, h, images)]
        elif kind < 0.70:  # mutated serialised header
            h = _valid_header(rng)
            parts = [_mutate_bytes(rng, json.dumps(h).encode()), _frame_for(rng, h, images)]
        elif kind < 0.93:  # valid header, mutated frame
            h = _valid_header(rng)
            parts = [json.dumps(h).encode(), _mutate_bytes(rng, _frame_for(rng, h, images))]
        else:  # valid request (raw, png or jpeg)
            h = _valid_header(rng)
            parts = [json.dumps(h).encode(), _frame_for(rng, h, images)]
        if rng.random() < 0.05:
            parts = parts + [bytes(rng.randrange(3))] * rng.randrange(1, 3)  # surplus parts
        msgs.append(parts)
    return msgs


def test_fuzz_thousands_of_messages_zero_crashes_one_reply_each(dealer):
    d = launch("--queue-per-camera", "2", "--max-cameras", "8", "--max-frame-bytes", "100000", "--max-batch", "4")
    try:
        sock = dealer(d.endpoint)
        msgs = fuzz_messages(3000)
        window, sent, replies = 64, 0, []
        while sent < len(msgs):
            while sent < len(msgs) and sent - len(replies) < window:
                sock.send_multipart(msgs[sent])
                sent += 1
            got = collect(sock, 1, 30)
            assert got, f"no reply after {sent} messages sent, {len(replies)} answered:\n{d.log()}"
            replies += got
        replies += collect(sock, len(msgs) - len(replies), 60)
        assert d.alive(), d.log()
        assert len(replies) == len(msgs)  # every message answered exactly once
        types = {r.type for r in replies}
        assert types <= {"result", "error", "health", "stats"} and "error" in types and "result" in types
        codes = {r.code for r in replies if r.type == "error"}
        assert {"bad_json", "bad_header", "bad_parts", "undecodable", "frame_size_mismatch"} <= codes, codes
        assert "internal" not in codes, d.log()
        with InspectionClient(d.endpoint, timeout_ms=20000) as c:
            assert c.health()["status"] == "serving"
            stats = c.stats()
            assert stats["requests"] >= len(msgs) and "internal" not in stats["errors"]
            p = sample_paths()[0]
            r = c.inspect(raw_gray(p), "after-fuzz", 1)
            assert r["score"] == pytest.approx(float(direct_scores([p])[0][0]), abs=1e-4, rel=1e-4)
    finally:
        code = d.terminate()
    assert code == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


# --------------------------------------------------------------------------- backpressure


def test_a_sender_faster_than_the_model_keeps_queue_and_memory_bounded(dealer):
    d = launch("--queue-per-camera", "2", "--max-batch", "2", "--set", "inference.steps=6")
    try:
        frame = np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8)  # 1 MiB raw frames
        socks = [dealer(d.endpoint) for _ in range(2)]
        probe = InspectionClient(d.endpoint, timeout_ms=20000)
        assert probe.inspect(frame, "warm", 0).type == "result"
        rss_before = rss_mb(d.pid)
        per_cam = 150
        max_depth, rss_peak = 0, rss_before
        for round_ in range(2):
            for i in range(per_cam):  # 2 x 150 MiB as fast as the sockets take them
                for k, s in enumerate(socks):
                    s.send_multipart(list(inspect_parts(frame, f"fast{k}", round_ * per_cam + i)))
                if i % 15 == 0:
                    s = probe.stats()
                    max_depth = max(max_depth, s["queue_depth"], *(c["queue_depth"] for c in s["cameras"].values()))
                    rss_peak = max(rss_peak, rss_mb(d.pid))
            for k, s in enumerate(socks):
                got = collect(s, per_cam, 120)
                assert len(got) == per_cam, f"camera {k}: {len(got)} of {per_cam} replies"  # nobody hangs
                kinds = {r.type if r.type == "result" else r.code for r in got}
                assert kinds <= {"result", "dropped"} and "dropped" in kinds and "result" in kinds
            rss_peak = max(rss_peak, rss_mb(d.pid))
            if round_ == 0:
                rss_after_first = rss_mb(d.pid)
        rss_after = rss_mb(d.pid)
        print(f"daemon RSS MiB: before {rss_before:.1f}, peak {rss_peak:.1f}, after round 1 {rss_after_first:.1f}, "
              f"after round 2 {rss_after:.1f}")
        stats = probe.stats()
        probe.close()
        assert max_depth <= 2 * 2  # queue_per_camera x cameras
        for k in range(2):
            cam = stats["cameras"][f"fast{k}"]
            assert cam["received"] == 2 * per_cam and cam["dropped"] > 0
            assert cam["results"] + cam["dropped"] == 2 * per_cam
        # 600 MiB went through; memory did not follow it (ZeroMQ holds <= rcv_hwm 4 frames per sender, the
        # queue 2 decoded frames per camera), and the second round did not add to the first
        assert rss_peak - rss_before < 100, (rss_before, rss_peak, rss_after)
        assert rss_after - rss_after_first < 40, (rss_after_first, rss_after)
    finally:
        code = d.terminate()
    assert code == 0, d.log()


# --------------------------------------------------------------------------- shutdown


def test_sigterm_answers_in_flight_and_queued_frames_then_exits_0(dealer):
    d = launch("--queue-per-camera", "16", "--max-batch", "2", "--set", "inference.steps=40")
    sock = dealer(d.endpoint)
    paths = sample_paths()[:6]
    for i, p in enumerate(paths):
        sock.send_multipart(list(inspect_parts(raw_gray(p), "cam0", i)))
    with InspectionClient(d.endpoint, timeout_ms=20000) as c:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every frame received, one on the model, the rest queued
            stats = c.stats()
            if stats["cameras"].get("cam0", {}).get("received") == len(paths) and c.health()["model_busy"]:
                break
            time.sleep(0.01)
        assert stats["queue_depth"] > 0, stats  # frames wait behind the one on the model
    d.process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    sock.send_multipart(list(inspect_parts(raw_gray(paths[0]), "cam0", 99)))  # after the signal
    replies = {r["frame_id"]: r for r in collect(sock, len(paths) + 1, 60)}
    code = d.process.wait(60)
    assert code == 0, d.log()
    for i in range(len(paths)):
        assert replies[i].type == "result" and np.isfinite(replies[i]["score"]), (replies[i].data, d.log())
    assert replies[99].code == "shutting_down"
    assert "drained" in d.log()


def test_second_signal_stops_at_once(dealer):
    d = launch("--queue-per-camera", "16", "--max-batch", "1", "--set", "inference.steps=60")
    sock = dealer(d.endpoint)
    for i in range(8):
        sock.send_multipart(list(inspect_parts(raw_gray(sample_paths()[i]), "cam0", i)))
    with InspectionClient(d.endpoint, timeout_ms=20000) as c:
        while not c.health()["model_busy"]:
            time.sleep(0.01)
        d.process.send_signal(signal.SIGINT)
        # two signals sent back to back can reach Python's handler as one: wait until the first is seen
        deadline = time.monotonic() + 20
        while c.health()["status"] != "draining" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.health()["status"] == "draining", d.log()
    d.process.send_signal(signal.SIGINT)
    code = d.process.wait(60)
    replies = collect(sock, 8, 5)
    kinds = [r.type if r.type == "result" else r.code for r in replies]
    # every frame is answered, the one on the model and the queued ones with shutting_down; frames that got no
    # result make the exit status 1, with their count in the log
    assert len(replies) == 8 and set(kinds) <= {"result", "shutting_down"}, kinds
    cut = kinds.count("shutting_down")
    assert cut >= 1 and code == 1, (code, kinds, d.log())
    assert f"{cut} accepted frame(s) got no result: {cut} answered shutting_down" in d.log(), d.log()
