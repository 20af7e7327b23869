"""The line daemon: a ZeroMQ inspection service in front of a bundle, and its client.

    protocol   request headers, replies, error codes (pydantic; no torch)
    frames     incoming frame bytes -> the model's RGB image, with size/format checks
    codec      anomaly maps on the wire (16-bit PNG or float16)
    queueing   bounded per-camera queues (drop-oldest) and batch assembly
    worker     the inference thread
    verdict    where the OK/NG threshold comes from
    stats      per-camera counters and latency percentiles
    security   loopback-only binds, CurveZMQ keys and authenticator
    server     InspectionDaemon (the socket loop), DaemonConfig
    client     InspectionClient (DEALER with timeouts and reconnect)
    camera     simulated cameras streaming images or a video (CameraStreamer)
    launch     start a daemon as a child process and wait until it serves

Names are imported lazily so a client does not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DaemonConfig": "server", "InspectionDaemon": "server", "DaemonError": "server",
    "InspectionClient": "client", "DaemonTimeout": "client", "Reply": "client",
    "CameraStreamer": "camera", "StreamOptions": "camera", "load_frames": "camera",
    "ErrorCode": "protocol", "InspectRequest": "protocol", "parse_request": "protocol",
    "start_daemon": "launch", "create_keys": "security",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
