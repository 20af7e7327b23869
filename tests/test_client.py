"""The client and camera simulator: survives a daemon restart (timeouts, reconnect, loss counted), never
hangs on a daemon that is not there, streams folders and videos from several cameras through the
`client` verb with a live summary, a final JSON summary and heat-map overlays."""

from __future__ import annotations

import json
import socket
import threading
import time

import cv2
import numpy as np
import pytest

from edgeinspect.runtime.daemon.camera import CameraStreamer, StreamOptions, load_frames
from edgeinspect.runtime.daemon.client import DaemonTimeout, InspectionClient
from edgeinspect.runtime.daemon.launch import start_daemon
from edgeinspect.runtime.daemon.cli import main as serve_main

try:
    from tests.test_serve import SAMPLE, running, serve_bundle
except ImportError:
    from test_serve import SAMPLE, running, serve_bundle

CHILD_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_survives_a_daemon_restart():
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    frames = load_frames(SAMPLE / "test", "raw", 8)
    first = start_daemon(serve_bundle(), "--threads", "1", bind=endpoint, env=CHILD_ENV, nice=5)
    results: list[tuple[float, int]] = []  # (time, daemon generation)
    generation = [0]

    def on_reply(camera, frame, reply):
        if reply.type == "result":
            results.append((time.monotonic(), generation[0]))

    opts = StreamOptions(cameras=2, fps=8, duration_s=None, count=10_000, timeout_ms=700)
    streamer = CameraStreamer(endpoint, frames, opts, on_reply=on_reply)
    summary: list[dict] = []
    th = threading.Thread(target=lambda: summary.append(streamer.run()), daemon=True)
    th.start()
    second = None
    try:
        deadline = time.monotonic() + 120  # generous: a loaded CI machine starts daemons slowly
        while len(results) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(results) >= 6, first.log()
        first.kill()  # a crash, not a drain: frames in flight are lost
        time.sleep(1.0)  # the cameras keep sending into the void meanwhile
        generation[0] = 1
        second = start_daemon(serve_bundle(), "--threads", "1", bind=endpoint, env=CHILD_ENV, nice=5)
        deadline = time.monotonic() + 120  # generous: a loaded CI machine starts daemons slowly
        while sum(g for _, g in results) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        streamer.stop()
        th.join(30)
        assert not th.is_alive(), "the client hung"
    finally:
        streamer.stop()
        for d in (first, second):
            if d is not None:
                d.terminate()
    s = summary[0]
    assert sum(g for _, g in results) >= 6  # answered again by the restarted daemon
    assert s["lost"] + s["skipped"] > 0 and s["reconnects"] >= 1
    assert s["results"] == len(results)
    assert set(s["errors"]) <= {"dropped"}  # a burst right after the restart may push out a queued frame


def test_no_daemon_means_timeouts_not_hangs():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with InspectionClient(endpoint, timeout_ms=300) as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonTimeout):
            c.health()
        with pytest.raises(DaemonTimeout):
            c.inspect(np.zeros((8, 8), np.uint8))
        assert time.monotonic() - t0 < 3 and c.reconnects == 2
    frames = load_frames(SAMPLE / "test", "raw", 2)
    t0 = time.monotonic()
    s = CameraStreamer(endpoint, frames, StreamOptions(cameras=2, count=3, timeout_ms=300)).run()
    assert time.monotonic() - t0 < 10
    assert s["results"] == 0 and s["lost"] == 6 and s["reconnects"] == 6


def test_client_verb_streams_a_video_from_several_cameras(tmp_path, capsys):
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    assert writer.isOpened()
    paths = sorted((SAMPLE / "test").rglob("*.jpg"))[:6]
    for p in paths:
        writer.write(cv2.resize(cv2.imread(str(p)), (96, 64)))
    writer.release()
    assert len(load_frames(video, "raw")) == 6
    with running(cfg={"threshold": 0.0, "warmup": False}) as d:
        code = serve_main(["client", "--endpoint", d.endpoint, "--images", str(video), "--cameras", "3",
                           "--count", "4", "--fps", "4", "--timeout-ms", "20000", "--encoding", "jpeg",
                           "--out", str(tmp_path / "summary.json"), "--overlays", str(tmp_path / "overlays"),
                           "--max-overlays", "5", "--live-interval", "0.2"])
        out = capsys.readouterr()
        assert code == 0, out.err
        summary = json.loads(out.out)
        assert summary == json.loads((tmp_path / "summary.json").read_text())
        assert summary["cameras"] == 3 and summary["results"] == 12 and summary["lost"] == 0
        assert summary["verdicts"] == {"NG": 12}  # threshold 0: every score is above it
        assert set(summary["per_camera"]) == {"cam0", "cam1", "cam2"}
        lat = summary["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and summary["fps"] > 0
        assert "latency p50" in out.err and "fps" in out.err  # the live summary
        assert len(list((tmp_path / "overlays").glob("*.png"))) == 5
        # one-shot health and stats through the verb
        assert serve_main(["client", "--endpoint", d.endpoint, "--stats"]) == 0
        stats = json.loads(capsys.readouterr().out)
        assert stats["cameras"]["cam0"]["results"] == 4


def test_client_verb_reports_a_missing_source(tmp_path, capsys):
    assert serve_main(["client", "--images", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err
