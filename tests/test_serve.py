"""The inspection daemon in this process (a thread) on a tiny bundle, over loopback TCP: scores equal
to the bundle pipeline called directly, batching across cameras, maps, PUB, every kind of bad input
answered with its error code while good frames keep being answered, health/stats while the model is
busy, drop-oldest replies, model failures, calibrated verdicts, CurveZMQ.

The tiny bundle (trained for a few steps on data/mtd_sample, exported fp32) is built once per session
by `serve_bundle()`, shared with test_serve_process.py, test_client.py and test_serve_benchmark.py.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import zmq

from edgeinspect.data.mvtec import image_to_tensor, read_image, resize_image
from edgeinspect.runtime.daemon.client import DaemonTimeout, InspectionClient, inspect_parts, reply_from_parts
from edgeinspect.runtime.daemon.protocol import ErrorCode
from edgeinspect.runtime.daemon.server import DaemonConfig, DaemonError, InspectionDaemon

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "mtd_sample"
SCORE_TOL = 1e-4
IMAGE_SIZE = 64


@functools.cache
def serve_bundle() -> Path:
    """A tiny DiAD bundle (fp32), trained for a few steps on the embedded sample; built once per session."""
    from edgeinspect.config import build_config
    from edgeinspect.export.bundle import export_bundle
    from edgeinspect.training.diad import train_diad

    root = Path(tempfile.mkdtemp(prefix="edgeinspect-serve-"))
    atexit.register(shutil.rmtree, root, True)
    cfg = build_config("diad", "tiny", {"train": {"data_root": str(SAMPLE), "threads": 1}})
    n = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        train_diad(cfg, root / "run", progress=False)
        export_bundle(root / "run", root / "bundle", ("fp32",), threads=1)
    torch.set_num_threads(n)
    return root / "bundle"


def sample_paths() -> list[Path]:
    return sorted((SAMPLE / "test").rglob("*.jpg"))


@functools.cache
def direct_pipeline():
    from edgeinspect.runtime.detector import bundle_pipeline

    return bundle_pipeline(serve_bundle(), "onnxruntime", intra_op_threads=1)


def direct_scores(paths: list[Path]):
    x = torch.stack([image_to_tensor(resize_image(read_image(p), IMAGE_SIZE)) for p in paths])
    with torch.inference_mode():
        r = direct_pipeline()(x)
    return r.scores.numpy(), r.maps.numpy()


@contextmanager
def running(config: DaemonConfig | None = None, expect_code: int = 0, **kw):
    """An InspectionDaemon serving in a thread; stopped at the end, returning `expect_code` (0: gracefully)."""
    config = config or DaemonConfig(**{"bundle": serve_bundle(), "bind": "tcp://127.0.0.1:*", "pub": None,
                                       "threads": 1, **kw.pop("cfg", {})})
    daemon = InspectionDaemon(config, **kw)
    codes: list[int] = []
    th = threading.Thread(target=lambda: codes.append(daemon.serve(install_signals=False)), daemon=True)
    th.start()
    try:
        yield daemon
    finally:
        daemon.request_stop()
        th.join(30)
        assert codes == [expect_code], f"the daemon stopped with {codes}, not [{expect_code}]"


@pytest.fixture(scope="module")
def daemon():
    # fixed batching: the tiny model's larger batches are not cheaper per frame, so an adaptive daemon would
    # form none, and batching across cameras is tested here (the choice itself: test_daemon_limits.py)
    with running(cfg={"pub": "tcp://127.0.0.1:*", "max_frame_bytes": 1 << 20, "queue_per_camera": 8,
                      "adaptive_batch": False}) as d:
        yield d


@pytest.fixture
def client(daemon):
    with InspectionClient(daemon.endpoint, timeout_ms=20000) as c:
        yield c


def raw_gray(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


# --------------------------------------------------------------------------- results


def test_round_trip_scores_equal_the_direct_pipeline(client):
    paths = sample_paths()[:6]
    expect, _ = direct_scores(paths)
    for i, p in enumerate(paths):
        r = client.inspect(raw_gray(p), "cam0", i, timestamp=1700000000.5)
        assert r.type == "result" and r.ok, r.data
        assert r["camera_id"] == "cam0" and r["frame_id"] == i and r["timestamp"] == 1700000000.5
        assert r["score"] == pytest.approx(float(expect[i]), abs=SCORE_TOL, rel=SCORE_TOL)
        assert r["verdict"] is None and r["threshold"] is None and r["normalized_score"] is None
        t = r["timings_ms"]
        assert set(t) == {"decode", "queue_wait", "model", "model_total", "encode_reply", "compute", "daemon_total"}
        assert set(t["model"]) == {"encode", "denoise", "decode", "features", "scoring"}
        # compute: this frame's decode, the model and its reply; with queue_wait it makes up the daemon's time
        assert t["decode"] + t["model_total"] + t["encode_reply"] <= t["compute"] + 0.01
        assert t["queue_wait"] + t["compute"] == pytest.approx(t["daemon_total"], abs=0.01)
        assert r.latency_ms >= t["daemon_total"]
        assert r["batch_size"] >= 1 and r["fire_step"] is None and r["map"] is None and r.map_part is None
    # the same frames as the files' own JPEG bytes and as re-encoded PNG
    for i, p in enumerate(paths[:3]):
        r = client.inspect(p.read_bytes(), "cam0", f"jpeg-{i}", fmt="jpeg")
        assert r["score"] == pytest.approx(float(expect[i]), abs=SCORE_TOL, rel=SCORE_TOL)
        png = cv2.imencode(".png", raw_gray(p))[1].tobytes()
        r = client.inspect(png, "cam0", f"png-{i}")
        assert r["score"] == pytest.approx(float(expect[i]), abs=SCORE_TOL, rel=SCORE_TOL)


def test_frames_from_several_cameras_are_batched_and_keep_their_scores(daemon):
    paths = sample_paths()[:8]
    expect, _ = direct_scores(paths)
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(4)]
    try:
        for s in socks:
            s.linger = 0
            s.connect(daemon.endpoint)
        for i, p in enumerate(paths):
            socks[i % 4].send_multipart(list(inspect_parts(raw_gray(p), f"cam{i % 4}", i)))
        replies = {}
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        deadline = time.monotonic() + 30
        while len(replies) < len(paths) and time.monotonic() < deadline:
            for s, _ in poller.poll(1000):
                r = reply_from_parts(s.recv_multipart())
                replies[r["frame_id"]] = r
    finally:
        for s in socks:
            s.close()
        ctx.term()
    assert sorted(replies) == list(range(len(paths)))
    for i, r in replies.items():
        assert r.type == "result" and r["camera_id"] == f"cam{i % 4}"
        assert r["score"] == pytest.approx(float(expect[i]), abs=SCORE_TOL, rel=SCORE_TOL)
    assert max(r["batch_size"] for r in replies.values()) > 1


@pytest.mark.parametrize("encoding, tol", [("png16", 2e-5), ("float16", 2e-3)])
def test_map_returned_compactly_when_asked(client, encoding, tol):
    p = sample_paths()[0]
    _, maps = direct_scores([p])
    r = client.inspect(raw_gray(p), "cam0", 1, return_map=True, map_encoding=encoding)
    assert r["map"]["encoding"] == encoding and r["map"]["bytes"] == len(r.map_part)
    amap = r.anomaly_map()
    assert amap.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(amap - maps[0]).max() <= tol * max(1.0, float(np.abs(maps[0]).max()))
    if encoding == "png16":
        assert len(r.map_part) < IMAGE_SIZE * IMAGE_SIZE * 4  # smaller than the float32 map
    r = client.inspect(raw_gray(p), "cam0", 2, return_map=True, map_encoding=encoding, map_size=16)
    assert r.anomaly_map().shape == (16, 16)


def test_results_are_published_with_the_camera_as_topic(daemon, client):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(daemon.pub_endpoint)
    sub.subscribe(b"camB")
    time.sleep(0.3)  # let the subscription reach the PUB socket
    try:
        img = raw_gray(sample_paths()[1])
        client.inspect(img, "camA", 1)
        r = client.inspect(img, "camB", 2)
        assert sub.poll(5000)
        topic, body = sub.recv_multipart()
        assert topic == b"camB" and json.loads(body)["frame_id"] == 2
        assert json.loads(body)["score"] == r["score"]
        assert not sub.poll(200)  # camA was not subscribed
    finally:
        sub.close()
        ctx.term()


# --------------------------------------------------------------------------- bad input


def _good_parts(frame_id):
    return list(inspect_parts(raw_gray(sample_paths()[2]), "cam9", frame_id))


def _hdr(**kw) -> bytes:
    body = {"type": "inspect", "camera_id": "cam9", "frame_id": 5,
            "encoding": {"format": "raw", "dtype": "uint8", "shape": [8, 8]}}
    body.update(kw)
    return json.dumps(body).encode()


PNG = cv2.imencode(".png", np.full((8, 8), 100, np.uint8))[1].tobytes()
JPG = cv2.imencode(".jpg", np.full((16, 16), 100, np.uint8))[1].tobytes()
BAD_INPUTS = {
    "malformed json": ([b"{type: inspect", b"x"], ErrorCode.BAD_JSON),
    "not an object": ([b"42", b"x"], ErrorCode.BAD_JSON),
    "not utf-8": ([b"\xff\xfe\xfd", b"x"], ErrorCode.BAD_JSON),
    "header too large": ([b"{" + b" " * 20000 + b"}", b"x"], ErrorCode.HEADER_TOO_LARGE),
    "unknown request type": ([b'{"type": "reboot"}'], ErrorCode.BAD_HEADER),
    "unknown field": ([_hdr(priority=1), bytes(64)], ErrorCode.BAD_HEADER),
    "missing camera": ([json.dumps({"type": "inspect", "frame_id": 1, "encoding": {"format": "png"}}).encode(), PNG],
                       ErrorCode.BAD_HEADER),
    "wrong dtype": ([_hdr(encoding={"format": "raw", "dtype": "float32", "shape": [8, 8]}), bytes(256)],
                    ErrorCode.BAD_ENCODING),
    "wrong shape": ([_hdr(encoding={"format": "raw", "dtype": "uint8", "shape": [8, 8, 2]}), bytes(128)],
                    ErrorCode.BAD_ENCODING),
    "truncated raw frame": ([_hdr(), bytes(63)], ErrorCode.FRAME_SIZE_MISMATCH),
    "padded raw frame": ([_hdr(), bytes(65)], ErrorCode.FRAME_SIZE_MISMATCH),
    "empty frame": ([_hdr(), b""], ErrorCode.FRAME_SIZE_MISMATCH),
    "oversized frame": ([_hdr(encoding={"format": "raw", "dtype": "uint8", "shape": [1024, 1025]}),
                         bytes(1024 * 1025)], ErrorCode.FRAME_TOO_LARGE),
    "undecodable png": ([_hdr(encoding={"format": "png"}), PNG[:30] + bytes(50) + PNG[-12:]], ErrorCode.UNDECODABLE),
    "truncated png": ([_hdr(encoding={"format": "png"}), PNG[:-10]], ErrorCode.UNDECODABLE),
    "jpeg sent as png": ([_hdr(encoding={"format": "png"}), JPG], ErrorCode.UNDECODABLE),
    "truncated jpeg": ([_hdr(encoding={"format": "jpeg"}), JPG[: len(JPG) // 2]], ErrorCode.UNDECODABLE),
    "png bomb header": ([_hdr(encoding={"format": "png"}),
                         PNG[:16] + (60000).to_bytes(4, "big") * 2 + PNG[24:]], ErrorCode.IMAGE_TOO_LARGE),
    "inspect without frame": ([_hdr()], ErrorCode.BAD_PARTS),
    "inspect with 3 parts": ([_hdr(), bytes(64), b"extra"], ErrorCode.BAD_PARTS),
    "health with a frame": ([b'{"type": "health"}', b"x"], ErrorCode.BAD_PARTS),
    "only an empty delimiter": ([b""], ErrorCode.BAD_PARTS),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_each_bad_input_gets_its_error_reply_and_the_next_frame_is_answered(client, name):
    parts, code = BAD_INPUTS[name]
    r = client.request(parts)
    assert r.type == "error" and not r.ok, r.data
    assert r.code == code.value, (name, r.data)
    assert len(r["message"]) > 10
    if code not in (ErrorCode.BAD_JSON, ErrorCode.HEADER_TOO_LARGE, ErrorCode.BAD_PARTS) and b"camera_id" in parts[0] \
            and b'"cam9"' in parts[0]:
        assert r["camera_id"] == "cam9" and r["frame_id"] == 5  # the reply names the frame it refuses
    good = client.request(_good_parts(77))
    assert good.type == "result" and good["frame_id"] == 77


def test_req_clients_get_their_envelope_back(daemon):
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.connect(daemon.endpoint)
    try:
        req.send(b'{"type": "health"}')
        assert req.poll(5000)
        assert json.loads(req.recv())["status"] == "serving"
        req.send_multipart(_good_parts(3))
        assert req.poll(20000)
        assert json.loads(req.recv_multipart()[0])["type"] == "result"
    finally:
        req.close()
        ctx.term()


def test_health_and_stats(client):
    h = client.health()
    assert h.type == "health" and h["status"] == "serving" and h["method"] == "diad"
    assert h["image_size"] == IMAGE_SIZE and h["backend"] == "onnxruntime" and h["max_batch"] >= 1
    s = client.stats()
    assert s.type == "stats" and s["requests"] >= 1 and s["rss_mb"] > 0
    cam = s["cameras"]["cam0"]
    assert cam["results"] >= 1 and cam["latency_ms"]["p50"] > 0 and cam["latency_ms"]["p99"] >= cam["latency_ms"]["p50"]
    assert s["errors"].get("frame_size_mismatch", 0) >= 0


# --------------------------------------------------------------------------- busy model, drops, failures


class SlowPipeline:
    """The real pipeline, slowed down, optionally failing on chosen calls."""

    def __init__(self, delay_s: float, fail_calls=()):
        self.delay_s = delay_s
        self.fail_calls = set(fail_calls)
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        time.sleep(self.delay_s)
        if self.calls in self.fail_calls:
            raise RuntimeError("simulated model failure")
        return direct_pipeline()(images)


def _injected(delay_s, fail_calls=(), expect_code=0, **cfg):
    config = DaemonConfig(bundle=serve_bundle(), bind="tcp://127.0.0.1:*", pub=None, warmup=False, **cfg)
    return running(config, expect_code, pipeline=SlowPipeline(delay_s, fail_calls), image_size=IMAGE_SIZE,
                   info={"method": "diad", "preset": "tiny", "max_batch": 2})


def test_health_stats_and_bad_input_are_answered_while_the_model_is_busy():
    with _injected(1.5) as d, InspectionClient(d.endpoint, timeout_ms=10000) as c:
        c.send(_good_parts(1))
        time.sleep(0.2)  # the frame is on the model now
        t0 = time.perf_counter()
        h = c.health(timeout_ms=1000)
        bad = c.request([b"{oops"], timeout_ms=1000)
        s = c.stats(timeout_ms=1000)
        assert time.perf_counter() - t0 < 0.8
        assert h["model_busy"] is True and bad.code == "bad_json" and s["cameras"]["cam9"]["received"] == 1
        r = c.recv(10000)
        assert r.type == "result" and r["frame_id"] == 1


def test_a_full_camera_queue_drops_its_oldest_frame_with_an_explicit_reply():
    with _injected(1.0, queue_per_camera=1, max_batch=1) as d, InspectionClient(d.endpoint, timeout_ms=10000) as c:
        c.send(_good_parts(0))
        with InspectionClient(d.endpoint, timeout_ms=10000) as probe:
            while not probe.health()["model_busy"]:  # frame 0 is on the model
                time.sleep(0.01)
        for i in range(1, 5):  # 1..3 are each pushed out by the next; 4 waits and is answered
            c.send(_good_parts(i))
        replies = {}
        while len(replies) < 5:
            r = c.recv(10000)
            assert r is not None, f"missing replies: got {sorted(replies)}"
            replies[r["frame_id"]] = r
        assert {i for i, r in replies.items() if r.type == "result"} == {0, 4}
        for i in (1, 2, 3):
            assert replies[i].code == "dropped" and "queue was full" in replies[i]["message"]
            assert replies[i]["camera_id"] == "cam9"
        s = c.stats()
        assert s["cameras"]["cam9"]["dropped"] == 3 and s["errors"]["dropped"] == 3 and s["queue_depth"] == 0


def test_a_model_failure_is_an_error_reply_and_the_daemon_goes_on():
    with _injected(0.0, fail_calls=(1,), max_batch=1) as d, InspectionClient(d.endpoint, timeout_ms=20000) as c:
        r = c.request(_good_parts(1))
        assert r.code == "inference_failed" and "simulated model failure" in r["message"]
        assert c.request(_good_parts(2)).type == "result"
        assert c.stats()["errors"]["inference_failed"] == 1


def test_a_client_that_never_reads_costs_its_reply_budget_and_every_drop_is_counted():
    budget = 6 << 20  # three 2 MiB maps
    with _injected(0.0, max_batch=1, max_reply_bytes_per_client=budget) as d, \
            InspectionClient(d.endpoint, timeout_ms=20000) as probe:
        ctx = zmq.Context()
        silent = ctx.socket(zmq.DEALER)
        silent.rcvhwm, silent.rcvbuf, silent.linger = 1, 4096, 0
        silent.connect(d.endpoint)
        n = 24
        for i in range(n):
            header, frame = inspect_parts(raw_gray(sample_paths()[2]), f"silent{i % 4}", i, return_map=True,
                                          map_encoding="float16", map_size=1024)
            silent.send_multipart([header, frame])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = probe.stats()
            answered = sum(c["results"] + c["dropped"] for k, c in s["cameras"].items() if k.startswith("silent"))
            if answered == n:
                break
            time.sleep(0.1)
        assert s["replies_dropped"] > 0 and s["errors"].get("reply_dropped_budget", 0) > 0, s["errors"]
        assert s["reply_bytes_pending"] <= budget
        received = 0
        while silent.poll(2000):
            silent.recv_multipart()
            received += 1
        assert received + s["replies_dropped"] == n  # each reply arrived or was counted as dropped
        silent.close()
        ctx.term()


def test_oversized_parts_and_maps_get_an_error_reply():
    with _injected(0.0, max_frame_bytes=1 << 20) as d, InspectionClient(d.endpoint, timeout_ms=20000) as c:
        r = c.request([_hdr(encoding={"format": "png"}), bytes(3 << 19)])  # 1.5 MiB: over the limit, under 2x
        assert r.code == "frame_too_large" and "limit is 1048576" in r["message"]
        header, frame = inspect_parts(raw_gray(sample_paths()[2]), "cam9", 1, return_map=True, map_size=2048)
        r = c.request([header, frame])
        assert r.code == "bad_header" and "options.map_size: 2048 is over this daemon's limit of 1024" in r["message"]
        assert c.health()["max_map_size"] == 1024


def test_a_second_stop_answers_every_frame_and_returns_1():
    with _injected(0.5, max_batch=1, queue_per_camera=8, expect_code=1) as d, \
            InspectionClient(d.endpoint, timeout_ms=20000) as c:
        for i in range(4):
            c.send(_good_parts(i))
        while not c.health()["model_busy"]:
            time.sleep(0.01)
        d.request_stop()
        d.request_stop()  # the second signal
        replies = [c.recv(5000) for _ in range(4)]
        assert all(r is not None for r in replies)
        assert {r.code for r in replies} == {"shutting_down"}  # the one on the model and the 3 queued
    assert d.cut == 4 and d.unanswered == 0


# --------------------------------------------------------------------------- verdicts, security


def test_calibrated_bundle_gives_verdicts_and_normalised_scores(tmp_path):
    from edgeinspect.runtime.postprocess import ScoreNormalization
    from edgeinspect.runtime.bundle_update import set_calibration

    bundle = tmp_path / "bundle"
    shutil.copytree(serve_bundle(), bundle)
    paths = sample_paths()[:4]
    expect, _ = direct_scores(paths)
    thr = float(np.median(expect))
    norm = ScoreNormalization(float(expect.min()), float(expect.max()))
    set_calibration(bundle, {"verdict": {"image_threshold": thr, "source": "target_frr"},
                             "normalization": norm.to_json()})
    config = DaemonConfig(bundle=bundle, bind="tcp://127.0.0.1:*", pub=None, threads=1, threshold=123.0)
    with running(config) as d, InspectionClient(d.endpoint, timeout_ms=20000) as c:
        assert c.health()["threshold_source"] == "calibration"
        for i, p in enumerate(paths):
            r = c.inspect(raw_gray(p), "cam0", i)
            assert r["threshold"] == thr and r["threshold_source"] == "calibration"
            assert r["verdict"] == ("NG" if r["score"] > thr else "OK")
            assert r["normalized_score"] == pytest.approx(float(norm(r["score"])))


def test_configured_threshold_when_the_bundle_has_none():
    config = DaemonConfig(bundle=serve_bundle(), bind="tcp://127.0.0.1:*", pub=None, threads=1, threshold=-1.0,
                          warmup=False)
    with running(config) as d, InspectionClient(d.endpoint, timeout_ms=20000) as c:
        r = c.inspect(raw_gray(sample_paths()[0]), "cam0", 0)
        assert (r["verdict"], r["threshold"], r["threshold_source"]) == ("NG", -1.0, "config")
        assert r["normalized_score"] is None


def test_non_loopback_bind_needs_curve_or_insecure():
    with pytest.raises(DaemonError, match="CurveZMQ"):
        InspectionDaemon(DaemonConfig(bundle=serve_bundle(), bind="tcp://0.0.0.0:*", pub=None))
    with pytest.raises(DaemonError, match="CurveZMQ"):
        InspectionDaemon(DaemonConfig(bundle=serve_bundle(), bind="tcp://127.0.0.1:*", pub="tcp://*:*"))


def test_curve_rejects_clients_without_an_authorised_key_and_accepts_one_with_it(tmp_path):
    from edgeinspect.runtime.daemon.security import create_keys, load_client_keys

    paths = create_keys(tmp_path / "keys", ["line1"])
    other = create_keys(tmp_path / "other", ["intruder"])  # a valid pair the daemon does not know
    config = DaemonConfig(bundle=serve_bundle(), bind="tcp://127.0.0.1:*", pub=None, threads=1, warmup=False,
                          curve_server_key=paths["server_secret"], curve_authorized_dir=paths["authorized_dir"])
    good = load_client_keys(paths["server_public"], paths["line1_secret"])
    bad = load_client_keys(paths["server_public"], other["intruder_secret"])
    with running(config) as d:
        assert d.config.curve
        with InspectionClient(d.endpoint, timeout_ms=600) as c:  # plain client: no handshake, no reply
            with pytest.raises(DaemonTimeout):
                c.health()
        with InspectionClient(d.endpoint, timeout_ms=600, curve=bad) as c:  # unknown key: ZAP refuses
            with pytest.raises(DaemonTimeout):
                c.health()
        with InspectionClient(d.endpoint, timeout_ms=20000, curve=good) as c:
            assert c.health()["curve"] is True
            r = c.inspect(raw_gray(sample_paths()[0]), "cam0", 0)
            assert r.type == "result"


class FakeGLAD:
    """Stands in for a GLAD pipeline: its results carry fire_step."""

    def __call__(self, images):
        from types import SimpleNamespace

        b = images.shape[0]
        return SimpleNamespace(scores=images.mean(dim=(1, 2, 3)), maps=images[:, 0].abs(),
                               fire_step=torch.arange(b) * 100 + 200, timings_ms={"encode": 1.0, "adp_unet": 2.0})


def test_glad_results_carry_the_firing_step():
    config = DaemonConfig(bundle=serve_bundle(), bind="tcp://127.0.0.1:*", pub=None, warmup=False, max_batch=1)
    with running(config, pipeline=FakeGLAD(), image_size=IMAGE_SIZE,
                 info={"method": "glad", "preset": "tiny", "max_batch": 1}) as d, \
            InspectionClient(d.endpoint, timeout_ms=10000) as c:
        r = c.inspect(np.full((8, 8), 255, np.uint8), "cam0", 0)
        assert r["fire_step"] == 200 and r["score"] == pytest.approx(1.0)
        assert r["timings_ms"]["model"] == {"encode": 1.0, "adp_unet": 2.0}
        assert c.health()["method"] == "glad"


def test_serve_verb_errors_and_keys(tmp_path, capsys):
    from edgeinspect.runtime.daemon.cli import main as serve_main

    assert serve_main(["serve"]) == 2
    assert "--bundle" in capsys.readouterr().err
    assert serve_main(["serve", "--bundle", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert serve_main(["serve", "--bundle", str(serve_bundle()), "--bind", "tcp://0.0.0.0:5555"]) == 2
    assert "--insecure" in capsys.readouterr().err
    assert serve_main(["serve", "--bundle", str(serve_bundle()), "--queue-per-camera", "0"]) == 2
    assert "queue_per_camera" in capsys.readouterr().err
    assert serve_main(["serve", "keys", "--out", str(tmp_path / "keys"), "--clients", "cam-pc1", "cam-pc2"]) == 0
    out = capsys.readouterr().out
    keys = tmp_path / "keys"
    for name in ("server.key", "server.key_secret", "cam-pc1.key_secret", "authorized/cam-pc1.key",
                 "authorized/cam-pc2.key"):
        assert (keys / name).is_file(), name
    assert not (keys / "authorized" / "server.key").exists()
    assert (keys / "server.key_secret").stat().st_mode & 0o077 == 0
    assert "--curve-authorized-dir" in out
    assert serve_main(["serve", "keys", "--out", str(keys)]) == 2  # never overwrites a key
