"""Incoming frames -> the model's uint8 RGB square image, with every size checked before memory is spent.

Two steps, so a flood or a bomb costs the socket loop nothing:

* `check_frame` (the socket loop, O(1) in the frame size): raw frames are checked byte for byte
  against their declared shape; PNG and JPEG frames have their size read from the file header (IHDR,
  SOF) and must end with their end marker (IEND, EOI). The header also says what decoding would cost:
  a frame over `max_pixels`, or whose decoded pixels would not fit the per-frame `decode_budget`
  bytes even at the smallest size its codec can decode to, is refused here (no decompression bombs).
* `decode_frame` (the inference worker, only for frames that reach the model): PNG chunks are checked
  against their CRCs (a corrupt file is refused without libpng seeing it), then the frame is decoded at
  full size when that fits the budget - the same pixels as the offline pipeline - else at 8 bits (PNG)
  or at 1/2, 1/4 or 1/8 of its size (JPEG: libjpeg scales in the DCT); it is resized at 8 bits before
  any channel conversion, so no full-size copy is made beyond the decoded frame (and, for 16-bit
  frames, its 8-bit conversion, counted in the budget).

The resulting pixels equal `edgeinspect.data.mvtec.resize_image(to_rgb_uint8(frame), size)` for every
frame decoded at full size (the channel conversions commute with the resize, and the 16 -> 8 bit
conversion rounds x / 257 as `to_rgb_uint8` does).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from edgeinspect.data.mvtec import resize_image
from edgeinspect.runtime.daemon.protocol import ErrorCode, InspectRequest, ProtocolError, RawEncoding

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}  # libjpeg keeps every coefficient of the image for these
# PNG colour type -> channels OpenCV decodes it to with IMREAD_UNCHANGED (palette and gray+alpha: up to BGRA)
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}
_JPEG_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
DEFAULT_DECODE_BUDGET = 64 << 20


@dataclass(frozen=True)
class PngHeader:
    height: int
    width: int
    bit_depth: int
    color_type: int


@dataclass(frozen=True)
class JpegHeader:
    height: int
    width: int
    components: int
    progressive: bool


@dataclass(frozen=True)
class DecodePlan:
    """How a checked frame will be decoded: an OpenCV imdecode flag (None: raw), the size it decodes to,
    and the bytes that decoding allocates."""

    flag: int | None
    height: int
    width: int
    cost_bytes: int


def png_header(data: bytes | memoryview) -> PngHeader | None:
    """The IHDR of a PNG, or None when the bytes do not start like a PNG."""
    if len(data) < 33 or bytes(data[:8]) != PNG_SIGNATURE or bytes(data[12:16]) != b"IHDR":
        return None
    w, h, depth, color = struct.unpack(">IIBB", bytes(data[16:26]))
    return PngHeader(h, w, depth, color)


def png_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, or None when the bytes do not start like a PNG."""
    hdr = png_header(data)
    return None if hdr is None else (hdr.height, hdr.width)


def jpeg_header(data: bytes | memoryview) -> JpegHeader | None:
    """The first start-of-frame segment of a JPEG, or None when there is none."""
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
            if i + 10 > len(b):
                return None
            h, w, comps = struct.unpack(">HHB", b[i + 5:i + 10])
            return JpegHeader(h, w, comps, marker in _JPEG_PROGRESSIVE)
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) from a JPEG's first start-of-frame segment, or None when there is none."""
    hdr = jpeg_header(data)
    return None if hdr is None else (hdr.height, hdr.width)


def _refuse(req: InspectRequest, code: ErrorCode, message: str) -> ProtocolError:
    return ProtocolError(code, message, req.camera_id, req.frame_id)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _png_plan(req: InspectRequest, data: memoryview, budget: int) -> DecodePlan:
    hdr = png_header(data)
    if hdr is None:
        raise _refuse(req, ErrorCode.UNDECODABLE, "frame is not a PNG (no PNG signature and IHDR chunk)")
    if bytes(data[-12:-8]) != b"\x00\x00\x00\x00" or bytes(data[-8:-4]) != b"IEND":
        raise _refuse(req, ErrorCode.UNDECODABLE, "PNG is truncated (it does not end with an IEND chunk)")
    if hdr.color_type not in _PNG_CHANNELS or hdr.bit_depth not in (1, 2, 4, 8, 16):
        raise _refuse(req, ErrorCode.UNDECODABLE, f"PNG header has an invalid colour type {hdr.color_type} or "
                      f"bit depth {hdr.bit_depth}")
    h, w = hdr.height, hdr.width
    channels = _PNG_CHANNELS[hdr.color_type]
    native = h * w * channels * (2 if hdr.bit_depth == 16 else 1)
    if hdr.bit_depth == 16:
        native += h * w * channels  # the 8-bit conversion
    if native <= budget:
        return DecodePlan(cv2.IMREAD_UNCHANGED, h, w, native)
    eight_bit = h * w * (1 if hdr.color_type == 0 else 3)  # IMREAD_ANYCOLOR: gray or BGR, 8 bits, no alpha
    if eight_bit <= budget:
        return DecodePlan(cv2.IMREAD_ANYCOLOR, h, w, eight_bit)
    raise _refuse(req, ErrorCode.IMAGE_TOO_LARGE,
                  f"PNG {w}x{h} decodes to {_mb(eight_bit)} even at 8 bits, over this daemon's per-frame decode "
                  f"budget of {_mb(budget)} (PNG cannot be decoded at a reduced size)")


def _jpeg_plan(req: InspectRequest, data: memoryview, budget: int) -> DecodePlan:
    hdr = jpeg_header(data)
    if hdr is None:
        raise _refuse(req, ErrorCode.UNDECODABLE, "frame is not a JPEG (no start-of-image and frame header)")
    if b"\xff\xd9" not in bytes(data[-64:]):
        raise _refuse(req, ErrorCode.UNDECODABLE, "JPEG is truncated (no end-of-image marker at its end)")
    h, w = hdr.height, hdr.width
    if hdr.components not in (1, 3, 4):
        raise _refuse(req, ErrorCode.UNDECODABLE, f"JPEG header declares {hdr.components} components (1, 3 or 4)")
    # a progressive JPEG holds all its DCT coefficients (2 bytes per sample) whatever the output scale
    coefficients = h * w * hdr.components * 2 if hdr.progressive else 0
    for reduce in (1, 2, 4, 8):
        rh, rw = -(-h // reduce), -(-w // reduce)
        cost = rh * rw * 3 + coefficients
        if cost <= budget:
            return DecodePlan(cv2.IMREAD_UNCHANGED if reduce == 1 else _JPEG_REDUCED[reduce], rh, rw, cost)
    raise _refuse(req, ErrorCode.IMAGE_TOO_LARGE,
                  f"JPEG {w}x{h}{' (progressive)' if hdr.progressive else ''} needs {_mb(cost)} to decode even at "
                  f"1/8 of its size, over this daemon's per-frame decode budget of {_mb(budget)}")


def check_frame(req: InspectRequest, data: bytes | memoryview, max_pixels: int,
                budget: int = DEFAULT_DECODE_BUDGET) -> DecodePlan:
    """The decode plan of an inspect request's frame, from its header alone; raises ProtocolError
    (frame_size_mismatch, image_too_large, undecodable). Cheap: the socket loop calls it on every frame."""
    data = memoryview(data)
    enc = req.encoding
    if isinstance(enc, RawEncoding):
        if len(data) != enc.nbytes:
            dims = "x".join(str(d) for d in enc.shape)
            raise _refuse(req, ErrorCode.FRAME_SIZE_MISMATCH,
                          f"frame has {len(data)} bytes, raw {enc.dtype} {dims} needs {enc.nbytes}")
        if enc.pixels > max_pixels:
            raise _refuse(req, ErrorCode.IMAGE_TOO_LARGE,
                          f"raw frame has {enc.pixels} pixels, the limit is {max_pixels}")
        cost = enc.nbytes // 2 if enc.dtype == "uint16" else 0  # the 8-bit conversion; uint8 is used in place
        if cost > budget:
            raise _refuse(req, ErrorCode.IMAGE_TOO_LARGE, f"raw uint16 frame needs {_mb(cost)} to convert to 8 "
                          f"bits, over this daemon's per-frame decode budget of {_mb(budget)}")
        return DecodePlan(None, enc.shape[0], enc.shape[1], cost)
    fmt = enc.format.upper()
    size = png_size(data) if enc.format == "png" else jpeg_size(data)
    if size is not None:
        h, w = size
        if h < 1 or w < 1:
            raise _refuse(req, ErrorCode.UNDECODABLE, f"{fmt} header declares an empty image ({h}x{w})")
        if h * w > max_pixels:
            raise _refuse(req, ErrorCode.IMAGE_TOO_LARGE,
                          f"{fmt} is {h}x{w} = {h * w} pixels, the limit is {max_pixels}")
    return _png_plan(req, data, budget) if enc.format == "png" else _jpeg_plan(req, data, budget)


def _check_png_chunks(req: InspectRequest, data: memoryview) -> None:
    """Every chunk's length and CRC, IHDR to IEND (libpng would print an error line for a bad one)."""
    i, n = 8, len(data)
    while i + 12 <= n:
        (length,) = struct.unpack(">I", data[i:i + 4])
        end = i + 12 + length
        if end > n:
            raise _refuse(req, ErrorCode.UNDECODABLE,
                          f"PNG is corrupt: its chunk at byte {i} runs past the end of the frame")
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(data[i + 4:end - 4]) != crc:
            kind = bytes(data[i + 4:i + 8]).decode("latin-1")
            raise _refuse(req, ErrorCode.UNDECODABLE, f"PNG chunk {kind!r} at byte {i} is corrupt (CRC mismatch)")
        if bytes(data[i + 4:i + 8]) == b"IEND":
            return
        i = end
    raise _refuse(req, ErrorCode.UNDECODABLE, "PNG is corrupt: its chunks do not lead to an IEND chunk")


def _to_model_rgb(img: np.ndarray, image_size: int, rgb_order: bool) -> np.ndarray:
    """A decoded gray/BGR(A)/RGB(A) uint8 or uint16 frame -> uint8 RGB (S, S, 3): 8 bits, resize, channels."""
    if img.dtype == np.uint16:
        img = cv2.convertScaleAbs(img, alpha=1 / 257)  # round(x / 257), as to_rgb_uint8, in 1 byte per sample
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    small = resize_image(img, image_size)
    if small.ndim == 2:
        return np.repeat(small[:, :, None], 3, axis=2)
    if small.shape[2] == 3:
        return np.ascontiguousarray(small) if rgb_order else cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(small, cv2.COLOR_RGBA2RGB if rgb_order else cv2.COLOR_BGRA2RGB)


def decode_frame(req: InspectRequest, data: bytes | memoryview, image_size: int, max_pixels: int,
                 budget: int = DEFAULT_DECODE_BUDGET) -> np.ndarray:
    """The frame of an inspect request as the model's uint8 RGB (image_size, image_size, 3) image;
    raises ProtocolError (frame_size_mismatch, image_too_large, undecodable)."""
    data = memoryview(data)
    plan = check_frame(req, data, max_pixels, budget)
    enc = req.encoding
    if isinstance(enc, RawEncoding):
        img = np.frombuffer(data, dtype=np.uint8 if enc.dtype == "uint8" else "<u2").reshape(enc.shape)
        return _to_model_rgb(img, image_size, enc.channel_order == "rgb")
    fmt = enc.format.upper()
    if enc.format == "png":
        _check_png_chunks(req, data)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), plan.flag)
    if img is None or img.size == 0:
        raise _refuse(req, ErrorCode.UNDECODABLE, f"{fmt} data does not decode (corrupt)")
    if img.shape[:2] != (plan.height, plan.width):
        raise _refuse(req, ErrorCode.UNDECODABLE, f"{fmt} decodes to {img.shape[1]}x{img.shape[0]}, its header "
                      f"says {plan.width}x{plan.height}")
    return _to_model_rgb(img, image_size, False)
