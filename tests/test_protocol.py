"""The daemon's wire protocol and its pieces without a model: header validation and error codes,
frame decoding and its refusals, map codec, the per-camera queue (drop-oldest, batching), bind policy,
verdicts."""

from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest

from edgeinspect.data.mvtec import resize_image
from edgeinspect.runtime.daemon.codec import decode_map, encode_map
from edgeinspect.runtime.daemon.frames import decode_frame, jpeg_size, png_size
from edgeinspect.runtime.daemon.protocol import (
    MAX_HEADER_BYTES,
    ErrorCode,
    InspectRequest,
    ProtocolError,
    inspect_header,
    parse_request,
    raw_encoding,
)
from edgeinspect.runtime.daemon.queueing import FrameQueue, QueueClosed, TooManyCameras
from edgeinspect.runtime.daemon.security import SecurityError, check_bind, is_loopback
from edgeinspect.runtime.daemon.verdict import judge_for


def header(**kw) -> bytes:
    body = {"type": "inspect", "camera_id": "cam0", "frame_id": 1,
            "encoding": {"format": "raw", "dtype": "uint8", "shape": [4, 5, 3]}}
    body.update(kw)
    return json.dumps(body).encode()


def code_of(raw: bytes) -> tuple[ErrorCode, str]:
    with pytest.raises(ProtocolError) as e:
        parse_request(raw)
    return e.value.code, e.value.message


# --------------------------------------------------------------------------- headers


def test_valid_requests_parse():
    r = parse_request(header(timestamp=12, options={"return_map": True, "map_encoding": "float16"}))
    assert isinstance(r, InspectRequest) and r.encoding.shape == (4, 5, 3) and r.encoding.nbytes == 60
    assert r.timestamp == 12.0 and r.options.return_map and r.options.map_encoding == "float16"
    assert parse_request(b'{"type":"health"}').type == "health"
    assert parse_request(b'{"type":"stats"}').type == "stats"
    assert parse_request(header(frame_id="line3-000017", encoding={"format": "png"})).encoding.format == "png"
    raw = inspect_header("cam1", 5, raw_encoding((8, 8), "uint16"), return_map=True)
    assert parse_request(raw).encoding.dtype == "uint16"


@pytest.mark.parametrize("raw, code, words", [
    (b"{not json", ErrorCode.BAD_JSON, "not valid JSON"),
    (b"\xff\xfe\x00", ErrorCode.BAD_JSON, "not valid JSON"),
    (b"[1, 2]", ErrorCode.BAD_JSON, "JSON object"),
    (b"", ErrorCode.BAD_JSON, "not valid JSON"),
    (b'{"camera_id": "c"}', ErrorCode.BAD_HEADER, "type: missing"),
    (b'{"type": "reboot"}', ErrorCode.BAD_HEADER, "type: unknown value 'reboot'"),
    (b'{"type": "health", "x": 1}', ErrorCode.BAD_HEADER, "x: unknown field"),
    (header(colour="red"), ErrorCode.BAD_HEADER, "colour: unknown field"),
    (header(camera_id="bad id!"), ErrorCode.BAD_HEADER, "camera_id"),
    (header(camera_id=""), ErrorCode.BAD_HEADER, "camera_id"),
    (header(frame_id=-1), ErrorCode.BAD_HEADER, "frame_id"),
    (header(frame_id=True), ErrorCode.BAD_HEADER, "frame_id"),
    (header(timestamp="now"), ErrorCode.BAD_HEADER, "timestamp"),
    (header(options={"return_map": 1}), ErrorCode.BAD_HEADER, "options.return_map"),
    (header(options={"map_encoding": "jpeg"}), ErrorCode.BAD_HEADER, "options.map_encoding"),
    (header(v=2), ErrorCode.BAD_HEADER, "v:"),
    (header(encoding={"format": "raw", "dtype": "float32", "shape": [4, 4]}), ErrorCode.BAD_ENCODING,
     "encoding.dtype"),
    (header(encoding={"format": "raw", "dtype": "uint8", "shape": [4]}), ErrorCode.BAD_ENCODING, "encoding.shape"),
    (header(encoding={"format": "raw", "dtype": "uint8", "shape": [4, 4, 2]}), ErrorCode.BAD_ENCODING, "channels"),
    (header(encoding={"format": "raw", "dtype": "uint8", "shape": [0, 4]}), ErrorCode.BAD_ENCODING, "height"),
    (header(encoding={"format": "raw", "dtype": "uint8", "shape": [70000, 4]}), ErrorCode.BAD_ENCODING, "height"),
    (header(encoding={"format": "raw", "dtype": "uint8", "shape": [4, "4"]}), ErrorCode.BAD_ENCODING, "shape"),
    (header(encoding={"format": "bmp"}), ErrorCode.BAD_ENCODING, "encoding.format: unknown value 'bmp'"),
    (header(encoding={"format": "png", "dtype": "uint8"}), ErrorCode.BAD_ENCODING, "encoding.dtype: unknown field"),
])
def test_bad_headers_get_a_code_and_a_message_naming_the_field(raw, code, words):
    got, message = code_of(raw)
    assert got == code, message
    assert words in message, message


def test_error_keeps_readable_ids_and_limits_header_size():
    with pytest.raises(ProtocolError) as e:
        parse_request(header(camera_id="cam7", frame_id=42, colour=1))
    assert (e.value.camera_id, e.value.frame_id) == ("cam7", 42)
    code, message = code_of(b" " * (MAX_HEADER_BYTES + 1))
    assert code == ErrorCode.HEADER_TOO_LARGE and str(MAX_HEADER_BYTES) in message
    code, _ = code_of(b"[" * 5000 + b"]" * 5000)  # deep nesting: refused, not a crash
    assert code == ErrorCode.BAD_JSON


# --------------------------------------------------------------------------- frames


def req(encoding: dict) -> InspectRequest:
    return parse_request(header(encoding=encoding))


def test_raw_frames_decode_to_the_model_image():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = decode_frame(req(raw_encoding(bgr.shape)), bgr.tobytes(), 16, 10**6)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    expect = cv2.resize(bgr[:, :, ::-1], (16, 16), interpolation=cv2.INTER_AREA)
    assert np.array_equal(out, expect)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    assert np.array_equal(decode_frame(req(raw_encoding(rgb.shape, channel_order="rgb")), rgb.tobytes(), 16, 10**6), out)
    g16 = (rng.integers(0, 65536, (16, 16))).astype("<u2")
    out16 = decode_frame(req(raw_encoding(g16.shape, "uint16")), g16.tobytes(), 16, 10**6)
    assert np.array_equal(out16[:, :, 0], (g16 / 257.0).round().astype(np.uint8))


def test_raw_frame_byte_count_must_match_its_shape():
    enc = raw_encoding((10, 10, 3))
    for data in (b"\0" * 299, b"\0" * 301, b"\0"):
        with pytest.raises(ProtocolError) as e:
            decode_frame(req(enc), data, 16, 10**6)
        assert e.value.code == ErrorCode.FRAME_SIZE_MISMATCH and "needs 300" in e.value.message
    with pytest.raises(ProtocolError) as e:  # the pixel limit is checked before any array is made
        decode_frame(req(raw_encoding((1000, 1000))), b"\0" * 10**6, 16, 10**5)
    assert e.value.code == ErrorCode.IMAGE_TOO_LARGE


def test_png_and_jpeg_frames_and_their_refusals():
    img = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    png = cv2.imencode(".png", img)[1].tobytes()
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    assert png_size(png) == (24, 32) and jpeg_size(jpg) == (24, 32)
    out = decode_frame(req({"format": "png"}), png, 24, 10**6)
    assert np.array_equal(out, resize_image(np.ascontiguousarray(img[:, :, ::-1]), 24))
    assert decode_frame(req({"format": "jpeg"}), jpg, 24, 10**6).shape == (24, 24, 3)
    cases = [
        ({"format": "png"}, jpg, ErrorCode.UNDECODABLE, "not a PNG"),
        ({"format": "jpeg"}, png, ErrorCode.UNDECODABLE, "not a JPEG"),
        ({"format": "png"}, png[:-20], ErrorCode.UNDECODABLE, "truncated"),
        ({"format": "jpeg"}, jpg[: len(jpg) // 2], ErrorCode.UNDECODABLE, "truncated"),
        ({"format": "png"}, png[:40] + bytes(200) + png[-12:], ErrorCode.UNDECODABLE, "corrupt"),
        ({"format": "png"}, b"garbage" * 10, ErrorCode.UNDECODABLE, "not a PNG"),
    ]
    for enc, data, code, words in cases:
        with pytest.raises(ProtocolError) as e:
            decode_frame(req(enc), data, 24, 10**6)
        assert e.value.code == code and words in e.value.message, e.value.message
    # a PNG header claiming a huge image is refused before decoding (no decompression bomb)
    bomb = bytearray(png)
    bomb[16:24] = (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big")
    with pytest.raises(ProtocolError) as e:
        decode_frame(req({"format": "png"}), bytes(bomb), 24, 50_000_000)
    assert e.value.code == ErrorCode.IMAGE_TOO_LARGE


# --------------------------------------------------------------------------- maps


def test_map_codecs_round_trip():
    amap = np.random.default_rng(2).random((32, 32)).astype(np.float32) * 0.7 + 0.1
    info, data = encode_map(amap, "png16")
    back = decode_map(info, data)
    assert back.shape == (32, 32) and np.abs(back - amap).max() <= info["scale"]
    info, data = encode_map(amap, "float16")
    assert len(data) == 32 * 32 * 2 and np.abs(decode_map(info, data) - amap).max() < 1e-3
    info, data = encode_map(amap, "png16", size=16)
    assert decode_map(info, data).shape == (16, 16)
    info, data = encode_map(np.zeros((8, 8), np.float32), "png16")  # constant map: no division by zero
    assert np.all(decode_map(info, data) == 0)


# --------------------------------------------------------------------------- queue


def test_queue_drops_the_oldest_frame_of_that_camera_only():
    q = FrameQueue(per_camera=2, max_cameras=2)
    assert q.put("a", "a0") is None and q.put("a", "a1") is None and q.put("b", "b0") is None
    assert q.put("a", "a2") == "a0"  # a's oldest goes, b untouched
    assert q.depth_by_camera() == {"a": 2, "b": 1}
    with pytest.raises(TooManyCameras):
        q.put("c", "c0")
    assert q.take_batch(8, 0.0) == ["a1", "b0", "a2"]
    q.close()
    with pytest.raises(QueueClosed):
        q.put("a", "x")


def test_queue_batches_oldest_first_up_to_max_batch():
    q = FrameQueue(per_camera=4, max_cameras=4, live_window_s=0.0)  # no camera counts as live: no waiting
    for item in ("a0", "b0", "a1", "c0", "b1"):
        q.put(item[0], item)
    assert q.take_batch(3, 10.0) == ["a0", "b0", "a1"]
    t0 = time.perf_counter()
    assert q.take_batch(3, 10.0) == ["c0", "b1"]
    assert time.perf_counter() - t0 < 1.0
    q.close()
    assert q.take_batch(3, 10.0) is None


def test_queue_waits_for_the_deadline_only_while_a_live_camera_is_missing():
    q = FrameQueue(per_camera=4, max_cameras=4, live_window_s=5.0)
    q.put("a", "a0")
    t0 = time.perf_counter()
    assert q.take_batch(4, 1.0) == ["a0"]  # one camera: no wait
    assert time.perf_counter() - t0 < 0.5
    q.put("b", "b0")
    q.put("b", "b1")  # "a" is live but has nothing waiting: wait for the deadline (or for "a")
    t0 = time.perf_counter()
    assert q.take_batch(4, 0.2) == ["b0", "b1"]
    assert 0.15 < time.perf_counter() - t0 < 2.0
    got = []
    th = threading.Thread(target=lambda: got.append(q.take_batch(4, 5.0)))
    q.put("b", "b2")
    th.start()
    time.sleep(0.1)
    q.put("a", "a1")  # the missing camera arrives: the batch leaves before the 5 s deadline
    th.join(2.0)
    assert got == [["b2", "a1"]]


# --------------------------------------------------------------------------- bind policy, verdicts


def test_only_loopback_binds_without_curve():
    for ep in ("tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:5", "ipc:///tmp/x", "inproc://a",
               "tcp://127.0.0.1:*"):
        assert is_loopback(ep), ep
        check_bind(ep, curve=False, insecure=False)
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.10:5555", "tcp://eth0:1", "pgm://x"):
        assert not is_loopback(ep), ep
        with pytest.raises(SecurityError, match="CurveZMQ"):
            check_bind(ep, curve=False, insecure=False)
        check_bind(ep, curve=True, insecure=False)
        check_bind(ep, curve=False, insecure=True)


def test_threshold_from_calibration_else_config():
    from edgeinspect.runtime.postprocess import ScoreNormalization

    calibration = {"verdict": {"image_threshold": 0.5, "source": "target_frr"},
                   "normalization": ScoreNormalization(0.2, 0.4).to_json()}
    j = judge_for(calibration, 0.9)
    assert (j.threshold, j.source) == (0.5, "calibration")
    assert j(0.6) == ("NG", pytest.approx(2.0)) and j(0.4) == ("OK", pytest.approx(1.0))
    assert judge_for({"image_threshold": 0.3}, None)(0.4) == ("NG", None)  # older ad-hoc record: threshold only
    j = judge_for(None, 0.9)
    assert (j.threshold, j.source) == (0.9, "config") and j(1.0) == ("NG", None) and j(0.5) == ("OK", None)
    assert judge_for({"pixel_threshold": 1.0}, None)(5.0) == (None, None)
    assert judge_for(None, 0.5)(float("nan"))[0] == "NG"
