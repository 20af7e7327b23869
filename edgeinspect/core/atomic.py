"""The one atomic file writer: a kill at any moment leaves either the old file or the new one, never a
torn one (write a temporary sibling, fsync it, rename it over the target, fsync the folder)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's entry list, so a rename into it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name per writer, so two processes writing the same file never share a temporary
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_png_atomic(path: str | Path, pixels: np.ndarray) -> None:
    """A PNG of `pixels` as OpenCV takes them (BGR, or one channel)."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels))
    if not ok:
        raise OSError(f"cannot encode {path} as PNG")
    write_bytes_atomic(path, encoded.tobytes())
