"""Incoming frames -> the model's uint8 RGB square image, refusing what cannot be decoded safely.

Raw frames are checked byte for byte against their declared shape before any array is made; PNG and
JPEG frames have their pixel count read from the file header (IHDR / SOF) and checked against a limit
before decoding (no decompression bombs), and must end with their end marker (IEND / EOI): a
truncated file is refused rather than decoded to a partly grey image.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from edgeinspect.data.mvtec import DatasetError, resize_image, to_rgb_uint8
from edgeinspect.runtime.daemon.protocol import ErrorCode, InspectRequest, ProtocolError, RawEncoding

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def png_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, or None when the bytes do not start like a PNG."""
    if len(data) < 24 or bytes(data[:8]) != PNG_SIGNATURE or bytes(data[12:16]) != b"IHDR":
        return None
    w, h = struct.unpack(">II", bytes(data[16:24]))
    return h, w


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) from a JPEG's first start-of-frame segment, or None when there is none."""
    b = bytes(data[:min(len(data), 1 << 20)])  # SOF comes after the tables, well inside 1 MiB
    if not b.startswith(JPEG_SOI):
        return None
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", b[i + 2:i + 4])
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if i + 9 > len(b):
                return None
            h, w = struct.unpack(">HH", b[i + 5:i + 9])
            return h, w
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _decode_compressed(req: InspectRequest, data: memoryview, max_pixels: int) -> np.ndarray:
    fmt = req.encoding.format
    cam, fid = req.camera_id, req.frame_id
    if fmt == "png":
        size = png_size(data)
        if size is None:
            raise ProtocolError(ErrorCode.UNDECODABLE, "frame is not a PNG (no PNG signature and IHDR chunk)",
                                cam, fid)
        if bytes(data[-12:-8]) != b"\x00\x00\x00\x00" or bytes(data[-8:-4]) != b"IEND":
            raise ProtocolError(ErrorCode.UNDECODABLE, "PNG is truncated (it does not end with an IEND chunk)",
                                cam, fid)
    else:
        size = jpeg_size(data)
        if size is None:
            raise ProtocolError(ErrorCode.UNDECODABLE, "frame is not a JPEG (no start-of-image and frame header)",
                                cam, fid)
        if b"\xff\xd9" not in bytes(data[-64:]):
            raise ProtocolError(ErrorCode.UNDECODABLE, "JPEG is truncated (no end-of-image marker at its end)",
                                cam, fid)
    h, w = size
    if h < 1 or w < 1:
        raise ProtocolError(ErrorCode.UNDECODABLE, f"{fmt.upper()} header declares an empty image ({h}x{w})", cam, fid)
    if h * w > max_pixels:
        raise ProtocolError(ErrorCode.IMAGE_TOO_LARGE,
                            f"{fmt.upper()} is {h}x{w} = {h * w} pixels, the limit is {max_pixels}", cam, fid)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ProtocolError(ErrorCode.UNDECODABLE, f"{fmt.upper()} data does not decode (corrupt)", cam, fid)
    if img.shape[:2] != (h, w):
        raise ProtocolError(ErrorCode.UNDECODABLE,
                            f"{fmt.upper()} decodes to {img.shape[1]}x{img.shape[0]}, its header says {w}x{h}",
                            cam, fid)
    return img


def _decode_raw(enc: RawEncoding, req: InspectRequest, data: memoryview, max_pixels: int) -> np.ndarray:
    if len(data) != enc.nbytes:
        dims = "x".join(str(d) for d in enc.shape)
        raise ProtocolError(ErrorCode.FRAME_SIZE_MISMATCH,
                            f"frame has {len(data)} bytes, raw {enc.dtype} {dims} needs {enc.nbytes}",
                            req.camera_id, req.frame_id)
    if enc.pixels > max_pixels:
        raise ProtocolError(ErrorCode.IMAGE_TOO_LARGE, f"raw frame has {enc.pixels} pixels, the limit is {max_pixels}",
                            req.camera_id, req.frame_id)
    img = np.frombuffer(data, dtype=np.uint8 if enc.dtype == "uint8" else "<u2").reshape(enc.shape)
    if enc.channel_order == "rgb" and img.ndim == 3 and img.shape[2] in (3, 4):
        img = img[:, :, [2, 1, 0, 3][:img.shape[2]]]  # to the BGR(A) order of OpenCV
    if img.dtype != np.uint16 and img.dtype != np.uint8:  # pragma: no cover - '<u2' is uint16 on every host
        img = img.astype(np.uint16)
    return img


def decode_frame(req: InspectRequest, data: bytes | memoryview, image_size: int, max_pixels: int) -> np.ndarray:
    """The frame of an inspect request as the model's uint8 RGB (image_size, image_size, 3) image;
    raises ProtocolError (frame_size_mismatch, image_too_large, undecodable)."""
    data = memoryview(data)
    enc = req.encoding
    if isinstance(enc, RawEncoding):
        img = _decode_raw(enc, req, data, max_pixels)
    else:
        img = _decode_compressed(req, data, max_pixels)
    try:
        rgb = to_rgb_uint8(img, source=f"camera {req.camera_id} frame {req.frame_id}")
    except DatasetError as e:
        raise ProtocolError(ErrorCode.UNDECODABLE, str(e), req.camera_id, req.frame_id) from None
    return np.ascontiguousarray(resize_image(rgb, image_size))
