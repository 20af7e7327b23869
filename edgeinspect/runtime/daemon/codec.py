"""Compact anomaly maps on the wire: 16-bit PNG with an affine scale, or raw float16.

numpy + OpenCV only (clients import it without torch).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

MAP_ENCODINGS = ("png16", "float16")


def encode_map(amap: np.ndarray, encoding: str = "png16", size: int | None = None) -> tuple[dict[str, Any], bytes]:
    """(map info for the reply, bytes) of a float (H, W) map; `size` resizes it to size x size first."""
    m = np.asarray(amap, dtype=np.float32)
    if size is not None and m.shape != (size, size):
        interp = cv2.INTER_AREA if size < min(m.shape) else cv2.INTER_LINEAR
        m = cv2.resize(m, (size, size), interpolation=interp)
    if encoding == "png16":
        lo, hi = float(m.min()), float(m.max())
        scale = (hi - lo) / 65535.0 if hi > lo else 1.0
        q = np.clip(np.rint((m - lo) / scale), 0, 65535).astype(np.uint16)
        ok, buf = cv2.imencode(".png", q, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:  # pragma: no cover - OpenCV always encodes uint16 PNG
            raise RuntimeError("PNG encoding of the anomaly map failed")
        data = buf.tobytes()
        offset = lo
    elif encoding == "float16":
        data = m.astype("<f2").tobytes()
        scale, offset = 1.0, 0.0
    else:
        raise ValueError(f"unknown map encoding {encoding!r}; choose one of {MAP_ENCODINGS}")
    info = {"encoding": encoding, "shape": [int(m.shape[0]), int(m.shape[1])], "scale": scale, "offset": offset,
            "bytes": len(data)}
    return info, data


def decode_map(info: dict[str, Any], data: bytes) -> np.ndarray:
    """The float32 (H, W) map of a reply's `map` info and map part."""
    h, w = (int(v) for v in info["shape"])
    if info["encoding"] == "png16":
        q = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if q is None or q.shape != (h, w):
            raise ValueError("map part is not the 16-bit PNG the reply describes")
        return q.astype(np.float32) * np.float32(info["scale"]) + np.float32(info["offset"])
    if info["encoding"] == "float16":
        if len(data) != h * w * 2:
            raise ValueError(f"map part has {len(data)} bytes, float16 {h}x{w} needs {h * w * 2}")
        return np.frombuffer(data, "<f2").reshape(h, w).astype(np.float32)
    raise ValueError(f"unknown map encoding {info['encoding']!r}")
