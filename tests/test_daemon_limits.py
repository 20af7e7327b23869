"""The daemon's limits without a model: strict JSON headers, the per-frame decode budget read from
PNG/JPEG headers (bombs refused before decoding, large JPEGs decoded at reduced size, pixels equal to
the offline pipeline's), the byte budget of waiting frames, the reply budget with counted drops, the
batch size chosen by measurement, and the codec-noise filter."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
import zmq

from edgeinspect.data.mvtec import resize_image, to_rgb_uint8
from edgeinspect.runtime.daemon.codec_noise import CodecNoiseFilter
from edgeinspect.runtime.daemon.frames import check_frame, decode_frame
from edgeinspect.runtime.daemon.outbound import DROP_BUDGET, DROP_GONE, DROP_HWM, Outbox
from edgeinspect.runtime.daemon.protocol import ErrorCode, InspectRequest, ProtocolError, parse_request
from edgeinspect.runtime.daemon.queueing import FrameQueue, QueueFull
from edgeinspect.runtime.daemon.worker import choose_batch

from tests.conftest import load_benchmark

reliability = load_benchmark("reliability")


def refusal(raw: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        parse_request(raw)
    return e.value


# --------------------------------------------------------------------------- strict JSON


@pytest.mark.parametrize("raw, words", [
    (b'{"type":"inspect","camera_id":"c","frame_id":1,"timestamp":NaN,"encoding":{"format":"png"}}', "NaN"),
    (b'{"type":"inspect","camera_id":"c","frame_id":1,"timestamp":Infinity,"encoding":{"format":"png"}}', "Infinity"),
    (b'{"type":"inspect","camera_id":"c","frame_id":1,"timestamp":-Infinity,"encoding":{"format":"png"}}',
     "Infinity"),
    (b'{"type":"inspect","camera_id":"c","frame_id":1,"timestamp":1e400,"encoding":{"format":"png"}}',
     "out of range"),
    (b'{"type":"inspect","camera_id":"c","frame_id":100000000000000000000000,"encoding":{"format":"png"}}',
     "out of range"),
    (b'{"type":"health","type":"stats"}', "duplicate key 'type'"),
    (b'{"type":"inspect","camera_id":"c","frame_id":1,"encoding":{"format":"png","format":"jpeg"}}',
     "duplicate key 'format'"),
])
def test_non_standard_json_is_refused(raw, words):
    e = refusal(raw)
    assert e.code == ErrorCode.BAD_JSON and words in e.message, e.message


@pytest.mark.parametrize("v", ["1.0", "true", '"1"', "2", "null"])
def test_the_version_must_be_exactly_the_integer_1(v):
    e = refusal(f'{{"v":{v},"type":"health"}}'.encode())
    assert e.code == ErrorCode.BAD_HEADER and "v: must be the integer 1" in e.message
    assert parse_request(b'{"v":1,"type":"health"}').type == "health"


def test_unknown_fields_are_refused_by_name():
    e = refusal(b'{"type":"inspect","camera_id":"c","frame_id":1,"priority":9,"encoding":{"format":"png","q":1}}')
    assert e.code == ErrorCode.BAD_HEADER and "priority: unknown field" in e.message
    assert "encoding.q: unknown field" in e.message and e.camera_id == "c" and e.frame_id == 1


# --------------------------------------------------------------------------- frames


def req(encoding: dict) -> InspectRequest:
    return parse_request(json.dumps({"type": "inspect", "camera_id": "c", "frame_id": 1,
                                     "encoding": encoding}).encode())


def offline(img: np.ndarray, size: int) -> np.ndarray:
    return resize_image(to_rgb_uint8(img), size)


def test_the_png_bomb_is_refused_from_its_header():
    bomb = reliability.png_bomb(7000, 7000)
    assert len(bomb) < 1 << 20
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError) as e:
        check_frame(req({"format": "png"}), bomb, 50_000_000)
    assert time.perf_counter() - t0 < 0.05  # the header alone: nothing is decompressed
    assert e.value.code == ErrorCode.IMAGE_TOO_LARGE and "decode budget" in e.value.message
    # the same 16-bit RGBA image at a size that fits is decoded (at its native depth) to the offline pixels
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65536, (300, 200, 4), dtype=np.uint16)
    png = cv2.imencode(".png", img)[1].tobytes()
    assert check_frame(req({"format": "png"}), png, 10**8).flag == cv2.IMREAD_UNCHANGED
    assert np.array_equal(decode_frame(req({"format": "png"}), png, 64, 10**8), offline(img, 64))


def test_a_png_over_the_budget_at_16_bits_decodes_at_8_bits():
    img = np.random.default_rng(1).integers(0, 65536, (400, 400, 3), dtype=np.uint16)
    png = cv2.imencode(".png", img)[1].tobytes()
    budget = 400 * 400 * 3 + 1  # fits 8 bits, not 16 (+ its conversion)
    plan = check_frame(req({"format": "png"}), png, 10**8, budget)
    assert plan.flag == cv2.IMREAD_ANYCOLOR and plan.cost_bytes <= budget
    out = decode_frame(req({"format": "png"}), png, 64, 10**8, budget)
    assert np.abs(out.astype(int) - offline(img, 64)).max() <= 1  # libpng's 16 -> 8 bits vs x / 257 rounded


def test_a_jpeg_over_the_budget_decodes_at_reduced_size():
    yy, xx = np.mgrid[0:1200, 0:1000]
    img = np.stack([(xx % 256), (yy % 256), ((xx + yy) % 256)], -1).astype(np.uint8)
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    full = decode_frame(req({"format": "jpeg"}), jpg, 64, 10**8)
    assert np.array_equal(full, offline(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_UNCHANGED), 64))
    budget = 1 << 20  # 1200 x 1000 x 3 is 3.4 MiB: 1/2 is 0.86 MiB
    plan = check_frame(req({"format": "jpeg"}), jpg, 10**8, budget)
    assert plan.flag == cv2.IMREAD_REDUCED_COLOR_2 and (plan.height, plan.width) == (600, 500)
    small = decode_frame(req({"format": "jpeg"}), jpg, 64, 10**8, budget)
    assert small.shape == (64, 64, 3) and np.abs(small.astype(int) - full).mean() < 3
    with pytest.raises(ProtocolError) as e:
        check_frame(req({"format": "jpeg"}), jpg, 10**8, 1000 * 1200 * 3 // 64 - 1)  # not even 1/8 fits
    assert e.value.code == ErrorCode.IMAGE_TOO_LARGE and "1/8" in e.value.message


@pytest.mark.parametrize("shape, dtype, order", [((50, 70), "uint16", "bgr"), ((50, 70, 1), "uint8", "bgr"),
                                                 ((50, 70, 3), "uint16", "rgb"), ((50, 70, 4), "uint8", "rgb"),
                                                 ((90, 80, 4), "uint16", "bgr")])
def test_raw_frames_equal_the_offline_pixels(shape, dtype, order):
    img = np.random.default_rng(2).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
    enc = {"format": "raw", "dtype": dtype, "shape": list(shape), "channel_order": order}
    out = decode_frame(req(enc), img.tobytes(), 32, 10**8)
    bgr = img[:, :, [2, 1, 0, 3][:shape[2]]] if order == "rgb" and len(shape) == 3 and shape[2] > 1 else img
    assert np.array_equal(out, offline(np.ascontiguousarray(bgr), 32))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_corrupt_png_is_refused_before_libpng_sees_it():
    png = bytearray(cv2.imencode(".png", np.full((20, 20), 7, np.uint8))[1].tobytes())
    png[45] ^= 0xFF  # inside IDAT
    with pytest.raises(ProtocolError) as e:
        decode_frame(req({"format": "png"}), bytes(png), 16, 10**6)
    assert e.value.code == ErrorCode.UNDECODABLE and "'IDAT'" in e.value.message and "CRC" in e.value.message


def test_codec_lines_on_stderr_are_counted_and_other_lines_pass(capfd):
    f = CodecNoiseFilter()
    f.start()
    try:
        os.write(2, b"libpng error: IDAT: CRC error\nCorrupt JPEG data: premature end of data segment\n")
        os.write(2, b"an ordinary line\n")
        jpg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))[1].tobytes()
        assert cv2.imdecode(np.frombuffer(jpg[:len(jpg) // 2] + b"\xff\xd9", np.uint8), cv2.IMREAD_COLOR) is not None
    finally:
        f.stop()
    err = capfd.readouterr().err
    assert f.count == 3 and "an ordinary line" in err and "JPEG" not in err and "libpng" not in err


# --------------------------------------------------------------------------- budgets


def test_waiting_frames_are_bounded_in_bytes():
    q = FrameQueue(per_camera=2, max_cameras=8, max_bytes=1000)
    q.put("a", "a0", 400)
    q.put("b", "b0", 400)
    with pytest.raises(QueueFull, match="budget of 1000"):
        q.put("c", "c0", 300)
    q.put("a", "a1", 200)  # fits: 1000
    assert q.put("a", "a2", 400) == "a0"  # drop-oldest frees a0's 400 first
    assert q.queued_bytes() == 1000 and q.depth() == 3
    assert q.take_batch(8, 0.0) == ["b0", "a1", "a2"] and q.queued_bytes() == 0


def _router_and_silent_client(ctx: zmq.Context, sndhwm: int) -> tuple[zmq.Socket, zmq.Socket, bytes]:
    router = ctx.socket(zmq.ROUTER)
    router.router_mandatory = 1
    router.sndhwm, router.sndbuf = sndhwm, 4096
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.DEALER)
    client.rcvhwm, client.rcvbuf = 1, 4096  # and it does not read
    client.connect(f"tcp://127.0.0.1:{port}")
    client.send(b"hello")
    return router, client, router.recv_multipart()[0]


def test_replies_over_the_budget_or_the_hwm_are_dropped_and_named():
    ctx = zmq.Context()
    router, client, peer = _router_and_silent_client(ctx, 1000)
    box = Outbox(router, per_peer_bytes=3 << 20, total_bytes=64 << 20)
    reasons = [box.send([peer], [b"x" * (1 << 20)]) for _ in range(8)]
    assert reasons[:2] == [None, None] and DROP_BUDGET in reasons
    assert box.peer_bytes(peer) <= 3 << 20
    assert box.send([b"nobody"], [b"x"]) == DROP_GONE
    received = 0
    while client.poll(1000):
        client.recv()
        received += 1
    assert received == reasons.count(None)  # every reply not counted as dropped arrived
    time.sleep(0.2)
    box.reap()
    assert box.pending_bytes == 0 and box.peer_bytes(peer) == 0
    router2, client2, peer2 = _router_and_silent_client(ctx, 2)
    box2 = Outbox(router2, per_peer_bytes=64 << 20, total_bytes=64 << 20)
    assert DROP_HWM in [box2.send([peer2], [b"y" * 100_000]) for _ in range(50)]
    for s in (client, router, client2, router2):
        s.close(0)
    ctx.term()


# --------------------------------------------------------------------------- batch size


class _Result:
    def __init__(self, n):
        import torch

        self.scores = torch.zeros(n)
        self.maps = torch.zeros(n, 4, 4)
        self.timings_ms = {}


def test_batches_that_cost_more_per_frame_are_not_formed():
    def superlinear(x):  # 5 ms x batch^2: every larger batch costs more per frame
        time.sleep(0.005 * x.shape[0] ** 2)
        return _Result(x.shape[0])

    def amortised(x):  # 20 ms + 2 ms per frame: larger batches are cheaper per frame
        time.sleep(0.02 + 0.002 * x.shape[0])
        return _Result(x.shape[0])

    chosen, per_frame = choose_batch(superlinear, 8, 4)
    assert chosen == 1 and set(per_frame) == {1, 2, 4}
    chosen, per_frame = choose_batch(amortised, 8, 6)
    assert chosen == 6 and set(per_frame) == {1, 2, 4, 6} and per_frame[6] < per_frame[1]
