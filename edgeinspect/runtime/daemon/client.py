"""A client of the inspection daemon: one DEALER socket with timeouts and reconnect.

A request that gets no reply within the timeout closes the socket and opens a new one (a new
identity), so a restarted daemon is reached again and a reply from before the restart can never be
taken for the answer to a later request. Needs pyzmq, numpy and OpenCV only (no torch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from edgeinspect.runtime.daemon.codec import decode_map
from edgeinspect.runtime.daemon.protocol import HEALTH_REQUEST, STATS_REQUEST, inspect_header, parse_reply, raw_encoding
from edgeinspect.runtime.daemon.security import CurveClientKeys, apply_client_curve


class DaemonTimeout(TimeoutError):
    """No reply within the timeout; the client's socket was recreated."""


@dataclass
class Reply:
    data: dict[str, Any]
    map_part: bytes | None = None
    latency_ms: float | None = None

    @property
    def type(self) -> str:
        return self.data.get("type", "")

    @property
    def ok(self) -> bool:
        return bool(self.data.get("ok"))

    @property
    def code(self) -> str | None:
        return self.data.get("code")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def anomaly_map(self) -> np.ndarray | None:
        """The float32 (H, W) map when the request asked for one."""
        if self.map_part is None or not self.data.get("map"):
            return None
        return decode_map(self.data["map"], self.map_part)


def reply_from_parts(parts: list[bytes]) -> Reply:
    if len(parts) > 1 and len(parts[0]) == 0:  # the empty delimiter of a request sent REQ-style
        parts = parts[1:]
    return Reply(parse_reply(parts[0]), parts[1] if len(parts) > 1 else None)


def encode_image(image: np.ndarray, channel_order: str = "bgr") -> tuple[dict[str, Any], bytes]:
    """(encoding, frame bytes) of a uint8/uint16 (H, W) or (H, W, C) array sent raw."""
    a = np.ascontiguousarray(image)
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"raw frames are uint8 or uint16, not {a.dtype}")
    if a.dtype == np.uint16 and a.dtype.byteorder == ">":
        a = a.astype("<u2")
    return raw_encoding(a.shape, str(a.dtype), channel_order), a.tobytes()


class InspectionClient:
    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", timeout_ms: int = 5000, *,
                 curve: CurveClientKeys | None = None, context: zmq.Context | None = None, hwm: int = 1000):
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.curve = curve
        self.hwm = hwm
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.reconnects = 0
        self.socket = self._connect()

    def _connect(self) -> zmq.Socket:
        s = self.context.socket(zmq.DEALER)
        s.linger = 0
        s.sndhwm = s.rcvhwm = self.hwm
        if "[" in self.endpoint:
            s.ipv6 = True
        if self.curve is not None:
            apply_client_curve(s, self.curve)
        s.connect(self.endpoint)
        return s

    def reset(self) -> None:
        """Drop the socket (and anything queued on it) and connect a new one."""
        self.socket.close(linger=0)
        self.socket = self._connect()
        self.reconnects += 1

    # -- raw messages
    def send(self, parts: list[bytes]) -> None:
        try:
            self.socket.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:  # the socket's queue is full: the daemon is gone or far behind
            self.reset()
            raise DaemonTimeout(f"{self.endpoint}: cannot queue the request (send buffer full); reconnected") from None

    def recv(self, timeout_ms: int | None = None) -> Reply | None:
        """The next reply, or None after `timeout_ms` (the socket is left as it is)."""
        if self.socket.poll(self.timeout_ms if timeout_ms is None else timeout_ms, zmq.POLLIN):
            return reply_from_parts(self.socket.recv_multipart())
        return None

    def request(self, parts: list[bytes], timeout_ms: int | None = None) -> Reply:
        """Send and wait for the reply; on timeout reconnect and raise DaemonTimeout."""
        t0 = time.perf_counter()
        self.send(parts)
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        reply = self.recv(timeout)
        if reply is None:
            self.reset()
            raise DaemonTimeout(f"{self.endpoint}: no reply within {timeout} ms; reconnected")
        reply.latency_ms = (time.perf_counter() - t0) * 1e3
        return reply

    # -- requests
    def health(self, timeout_ms: int | None = None) -> Reply:
        return self.request([HEALTH_REQUEST], timeout_ms)

    def stats(self, timeout_ms: int | None = None) -> Reply:
        return self.request([STATS_REQUEST], timeout_ms)

    def inspect(self, frame: np.ndarray | bytes, camera_id: str = "cam0", frame_id: int | str = 0, *,
                fmt: str | None = None, channel_order: str = "bgr", timestamp: float | None = None,
                return_map: bool = False, map_encoding: str = "png16", map_size: int | None = None,
                timeout_ms: int | None = None) -> Reply:
        """Inspect one frame: an array (sent raw) or PNG/JPEG bytes (`fmt` "png"/"jpeg", guessed from the
        bytes when not given)."""
        header, data = inspect_parts(frame, camera_id, frame_id, fmt=fmt, channel_order=channel_order,
                                     timestamp=timestamp, return_map=return_map, map_encoding=map_encoding,
                                     map_size=map_size)
        return self.request([header, data], timeout_ms)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "InspectionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def inspect_parts(frame: np.ndarray | bytes, camera_id: str, frame_id: int | str, *, fmt: str | None = None,
                  channel_order: str = "bgr", timestamp: float | None = None, return_map: bool = False,
                  map_encoding: str = "png16", map_size: int | None = None) -> tuple[bytes, bytes]:
    """[header, frame] parts of an inspect request."""
    if isinstance(frame, np.ndarray):
        encoding, data = encode_image(frame, channel_order)
    else:
        data = bytes(frame)
        if fmt is None:
            fmt = "png" if data[:4] == b"\x89PNG" else "jpeg"
        encoding = {"format": fmt}
    header = inspect_header(camera_id, frame_id, encoding, timestamp=timestamp, return_map=return_map,
                            map_encoding=map_encoding, map_size=map_size)
    return header, data
