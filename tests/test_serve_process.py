"""The daemon as its own process (`python -m edgeinspect.runtime.daemon.cli serve`, as `edgeinspect serve`): a fuzz
of thousands of messages in every class of benchmarks/reliability.py with zero crashes, one reply each and
no codec lines in the log, bounded queue and
flat memory under a sender faster than the model, SIGTERM answering in-flight and queued frames before
exiting 0."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import zmq

from edgeinspect.runtime.daemon.client import InspectionClient, inspect_parts, reply_from_parts
from edgeinspect.runtime.daemon.launch import start_daemon
from edgeinspect.runtime.daemon.stats import rss_mb
from tests.conftest import load_benchmark

try:
    from tests.test_serve import direct_scores, raw_gray, sample_paths, serve_bundle
except ImportError:
    from test_serve import direct_scores, raw_gray, sample_paths, serve_bundle

CHILD_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
reliability = load_benchmark("reliability")


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


def test_fuzz_thousands_of_messages_zero_crashes_one_reply_each(dealer):
    d = launch("--queue-per-camera", "2", "--max-cameras", "8", "--max-frame-bytes", "100000", "--max-batch", "4")
    try:
        sock = dealer(d.endpoint)
        msgs = [parts for _, parts in reliability.fuzz_messages(3000, seed=1234)]  # every class of the benchmark
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
        assert {"bad_json", "bad_header", "bad_encoding", "bad_parts", "undecodable", "frame_size_mismatch",
                "image_too_large", "header_too_large"} <= codes, codes
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
    assert "libpng" not in d.log() and "JPEG" not in d.log(), d.log()  # codec lines are counted, not logged


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
                assert len(got) == per_cam, (f"camera {k}: {len(got)} of {per_cam} replies; daemon errors "
                                             f"{probe.stats()['errors']}")  # nobody hangs
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
        # every frame accepted first: a frame still unread at the first signal is refused as new work, not
        # counted among the accepted ones that got no result
        while not (c.health()["model_busy"] and c.stats()["accepted"] == 8):
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
