"""The wire protocol of the inspection daemon: request headers, replies and error codes.

A request is a ZeroMQ multipart message sent from a DEALER (or REQ) socket to the daemon's ROUTER:

    [header]            type "health" or "stats"
    [header, frame]     type "inspect": the frame's bytes as the header's `encoding` describes them

The header is UTF-8 JSON as RFC 8259 defines it (no NaN/Infinity, no duplicate keys, numbers that
fit a double or a 64-bit integer), validated by the pydantic models below (strict types, an exact
integer version `"v": 1`, unknown fields refused with their name). A reply is `[reply JSON]`, or
`[reply JSON, map bytes]` when an inspect request asked for the anomaly map (`reply["map"]` says how
to read the bytes). Every request gets exactly one reply (a message part over twice the daemon's
--max-frame-bytes excepted: libzmq closes that connection before reading it), an error reply included
(`"type": "error"`, a `code` from `ErrorCode` and a `message` naming what was wrong), so a client
waiting for an answer never hangs on a daemon that is up.

Results are also published on the daemon's PUB socket as `[camera_id, reply JSON]` (no map), so a
dashboard or PLC gateway subscribes to one camera by topic.

This module needs only pydantic: clients import it without torch.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024
MAX_DIMENSION = 65535
CAMERA_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"
RAW_DTYPES = {"uint8": 1, "uint16": 2}  # little-endian


class ErrorCode(str, Enum):
    """Why a request was refused; the reply's `message` says the details."""

    BAD_PARTS = "bad_parts"  # wrong number of message parts (inspect: 2, health/stats: 1)
    HEADER_TOO_LARGE = "header_too_large"  # header part over MAX_HEADER_BYTES
    BAD_JSON = "bad_json"  # header is not a UTF-8 JSON object
    BAD_HEADER = "bad_header"  # unknown/missing/wrongly typed field, unknown request type
    BAD_ENCODING = "bad_encoding"  # the header's encoding block is invalid (dtype, shape, format)
    FRAME_TOO_LARGE = "frame_too_large"  # frame part over the daemon's --max-frame-bytes
    FRAME_SIZE_MISMATCH = "frame_size_mismatch"  # raw frame bytes != prod(shape) * itemsize (truncated/padded)
    IMAGE_TOO_LARGE = "image_too_large"  # a frame whose pixels, or decoded bytes, are over the daemon's limits
    UNDECODABLE = "undecodable"  # PNG/JPEG bytes that do not decode (corrupt, truncated, wrong format)
    DROPPED = "dropped"  # the camera's queue was full (this older frame was dropped for a newer one), or the
    # frames waiting for the model already hold the daemon's byte budget (this new frame was not queued)
    TOO_MANY_CAMERAS = "too_many_cameras"  # more cameras with queued frames than --max-cameras
    SHUTTING_DOWN = "shutting_down"  # the daemon is draining after SIGTERM/SIGINT: no new frames
    INFERENCE_FAILED = "inference_failed"  # the model raised on the batch holding this frame
    INTERNAL = "internal"  # a bug in the daemon; the request was not processed


class ProtocolError(Exception):
    """A request refused with an error reply."""

    def __init__(self, code: ErrorCode, message: str, camera_id: str | None = None,
                 frame_id: int | str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.camera_id = camera_id
        self.frame_id = frame_id


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------- requests


class RawEncoding(_Message):
    """Uncompressed pixels, row-major, little-endian: (H, W) gray or (H, W, C) with C = 1, 3, 4."""

    format: Literal["raw"]
    dtype: Literal["uint8", "uint16"]
    shape: tuple[int, int] | tuple[int, int, int]
    channel_order: Literal["bgr", "rgb"] = "bgr"  # for C = 3 or 4 (4: BGRA / RGBA)

    @model_validator(mode="after")
    def _check_shape(self) -> "RawEncoding":
        h, w = self.shape[:2]
        if not (1 <= h <= MAX_DIMENSION and 1 <= w <= MAX_DIMENSION):
            raise ValueError(f"height and width must be in 1..{MAX_DIMENSION}, got {list(self.shape)}")
        if len(self.shape) == 3 and self.shape[2] not in (1, 3, 4):
            raise ValueError(f"channels must be 1, 3 or 4, got {self.shape[2]}")
        return self

    @property
    def nbytes(self) -> int:
        n = RAW_DTYPES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    @property
    def pixels(self) -> int:
        return self.shape[0] * self.shape[1]


class PngEncoding(_Message):
    format: Literal["png"]  # 8 or 16 bit, gray/gray+alpha/RGB/RGBA


class JpegEncoding(_Message):
    format: Literal["jpeg"]


Encoding = Annotated[Union[RawEncoding, PngEncoding, JpegEncoding], Field(discriminator="format")]


class InspectOptions(_Message):
    return_map: bool = False
    # png16: 16-bit PNG of (map - offset) / scale (lossless to 1/65535 of the map's range);
    # float16: raw little-endian float16, H x W.
    map_encoding: Literal["png16", "float16"] = "png16"
    map_size: int | None = Field(None, ge=8, le=4096)  # square size of the returned map (default: the model's);
    # a daemon caps it lower (--max-map-size) and refuses a larger request


class InspectRequest(_Message):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["inspect"]
    camera_id: str = Field(pattern=CAMERA_ID_PATTERN)
    frame_id: Annotated[int, Field(ge=0, le=2**63 - 1)] | Annotated[str, Field(min_length=1, max_length=128)]
    timestamp: float | None = None  # the camera's time, echoed in the reply
    encoding: Encoding
    options: InspectOptions = InspectOptions()


class HealthRequest(_Message):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["health"]


class StatsRequest(_Message):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["stats"]


Request = Annotated[Union[InspectRequest, HealthRequest, StatsRequest], Field(discriminator="type")]
_REQUEST = TypeAdapter(Request)


def _ids_of(raw: bytes) -> tuple[str | None, int | str | None]:
    """camera_id and frame_id of a header that failed validation, when they are readable (for the reply)."""
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None
    if not isinstance(d, dict):
        return None, None
    cam, fid = d.get("camera_id"), d.get("frame_id")
    cam = cam[:64] if isinstance(cam, str) else None
    if isinstance(fid, bool) or not isinstance(fid, (int, str)):
        fid = None
    elif isinstance(fid, str):
        fid = fid[:128]
    elif not 0 <= fid < 2**63:
        fid = None
    return cam, fid


def _loc(loc: tuple[Any, ...]) -> str:
    # the discriminated unions put the tag first ("inspect", "raw"): leave them out of the path
    parts = [str(p) for p in loc if p not in ("inspect", "health", "stats", "raw", "png", "jpeg",
                                              "int", "str", "constrained-int", "constrained-str")]
    parts = [p for p in parts if not p.startswith("tuple[")]
    return ".".join(parts) or "header"


def describe_validation_error(e: ValidationError, limit: int = 4) -> tuple[ErrorCode, str]:
    errors = e.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return ErrorCode.BAD_JSON, f"header is not valid JSON: {errors[0]['msg']}"
    if errors and errors[0]["type"] in ("dict_type", "model_type") and not errors[0]["loc"]:
        return ErrorCode.BAD_JSON, "header must be a JSON object"
    seen: list[str] = []
    for err in errors:
        where = _loc(tuple(err["loc"]))
        if err["type"] == "union_tag_not_found":
            key = "type" if where == "header" else f"{where}.format"
            text = f"{key}: missing (one of inspect, health, stats)" if key == "type" else \
                f"{key}: missing (one of raw, png, jpeg)"
        elif err["type"] == "union_tag_invalid":
            tag = err.get("ctx", {}).get("tag")
            key = "type" if where == "header" else f"{where}.format"
            text = f"{key}: unknown value {tag!r} ({err.get('ctx', {}).get('expected_tags', '')})"
        elif err["type"] == "extra_forbidden":
            text = f"{where}: unknown field"
        else:
            text = f"{where}: {err['msg']}"
        if text not in seen:
            seen.append(text)
    more = f" (+{len(seen) - limit} more)" if len(seen) > limit else ""
    message = "; ".join(seen[:limit]) + more
    in_encoding = all(_loc(tuple(err["loc"])).startswith("encoding") for err in errors)
    return (ErrorCode.BAD_ENCODING if in_encoding else ErrorCode.BAD_HEADER), message


MAX_JSON_INT = 2**64  # larger integers fit no field (frame_id is < 2**63)


class _NotStrictJson(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NotStrictJson(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise _NotStrictJson(f"number {text[:40]} is out of range (over the largest double)")
    return v


def _bounded_int(text: str) -> int:
    if len(text) > 20 or abs(v := int(text)) > MAX_JSON_INT:
        raise _NotStrictJson(f"integer {text[:40]}{'...' if len(text) > 40 else ''} is out of range (over 2**64)")
    return v


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _NotStrictJson(f"duplicate key {dup[:64]!r}")
    return d


def strict_json(raw: bytes) -> Any:
    """The header's JSON value, refusing what RFC 8259 does not define or leaves ambiguous (NaN, Infinity,
    out-of-range numbers, duplicate keys). Raises ProtocolError(bad_json)."""
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant,
                          parse_float=_finite_float, parse_int=_bounded_int)
    except _NotStrictJson as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"header is not valid JSON: {e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"header is not valid JSON: {e}") from None


def parse_request(raw: bytes) -> InspectRequest | HealthRequest | StatsRequest:
    """A header part -> a validated request; raises ProtocolError (bad_json, bad_header, bad_encoding)."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.HEADER_TOO_LARGE,
                            f"header has {len(raw)} bytes, the limit is {MAX_HEADER_BYTES}")
    value = strict_json(raw)
    if isinstance(value, dict) and "v" in value and (type(value["v"]) is not int or value["v"] != PROTOCOL_VERSION):
        # pydantic's Literal[1] also takes 1.0 and true from JSON: the version is compared exactly here
        cam, fid = _ids_of(raw)
        raise ProtocolError(ErrorCode.BAD_HEADER, f"v: must be the integer {PROTOCOL_VERSION}, got "
                            f"{json.dumps(value['v'])[:40]}", cam, fid)
    try:
        return _REQUEST.validate_json(raw)
    except ValidationError as e:
        code, message = describe_validation_error(e)
        cam, fid = _ids_of(raw) if code != ErrorCode.BAD_JSON else (None, None)
        raise ProtocolError(code, message, cam, fid) from None
    except (ValueError, RecursionError) as e:  # defensive: the JSON parser's own limits
        raise ProtocolError(ErrorCode.BAD_JSON, f"header is not valid JSON: {e}") from None


def inspect_header(camera_id: str, frame_id: int | str, encoding: dict[str, Any], *,
                   timestamp: float | None = None, return_map: bool = False, map_encoding: str = "png16",
                   map_size: int | None = None) -> bytes:
    """The header part of an inspect request, as bytes (validated, so a client fails before sending)."""
    options: dict[str, Any] = {}
    if return_map:
        options = {"return_map": True, "map_encoding": map_encoding}
        if map_size is not None:
            options["map_size"] = map_size
    body: dict[str, Any] = {"type": "inspect", "camera_id": camera_id, "frame_id": frame_id,
                            "encoding": encoding}
    if timestamp is not None:
        body["timestamp"] = timestamp
    if options:
        body["options"] = options
    raw = json.dumps(body, separators=(",", ":")).encode()
    parse_request(raw)
    return raw


def raw_encoding(shape: tuple[int, ...], dtype: str = "uint8", channel_order: str = "bgr") -> dict[str, Any]:
    enc: dict[str, Any] = {"format": "raw", "dtype": dtype, "shape": list(shape)}
    if channel_order != "bgr":
        enc["channel_order"] = channel_order
    return enc


HEALTH_REQUEST = b'{"type":"health"}'
STATS_REQUEST = b'{"type":"stats"}'


# --------------------------------------------------------------------------- replies


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MapInfo(_Reply):
    """How to read the map part: value = offset + stored * scale, shape (H, W)."""

    encoding: Literal["png16", "float16"]
    shape: tuple[int, int]
    scale: float
    offset: float
    bytes: int


class Timings(_Reply):
    """Milliseconds. `model` holds the pipeline's stages for the whole batch (`batch_size` frames)."""

    decode: float  # this frame's decode + resize (in the inference worker, when its batch was taken)
    queue_wait: float  # received -> its batch taken by the inference worker (header checks, queueing)
    model: dict[str, float]
    model_total: float
    encode_reply: float  # this frame's map encoding and reply building
    # the worker's time on this frame's batch until this reply was built: every frame's decode, the model, the
    # replies built before it. A client's round trip - compute - queue_wait is the daemon's own overhead
    # (transport, header checks, hand-over between threads).
    compute: float
    daemon_total: float  # received -> reply built (less its final JSON serialisation)


class ResultReply(_Reply):
    v: int = PROTOCOL_VERSION
    type: Literal["result"] = "result"
    ok: Literal[True] = True
    camera_id: str
    frame_id: int | str
    timestamp: float | None = None
    score: float
    # calibrated bundles: (score - median) / (p99 - median) of the calibration normals
    normalized_score: float | None = None
    verdict: Literal["OK", "NG"] | None = None  # None: no threshold configured
    threshold: float | None = None
    threshold_source: str | None = None  # "calibration" (bundle) or "config" (--threshold)
    fire_step: int | None = None  # GLAD: the timestep at which the frame fired (-1: never)
    batch_size: int
    timings_ms: Timings
    map: MapInfo | None = None


class ErrorReply(_Reply):
    v: int = PROTOCOL_VERSION
    type: Literal["error"] = "error"
    ok: Literal[False] = False
    code: ErrorCode
    message: str
    camera_id: str | None = None
    frame_id: int | str | None = None


class HealthReply(_Reply):
    v: int = PROTOCOL_VERSION
    type: Literal["health"] = "health"
    ok: Literal[True] = True
    status: Literal["serving", "draining"]
    version: str  # edgeinspect
    pid: int
    bundle: str
    method: str
    preset: str
    image_size: int  # the size frames are read at (config.frame_size): the model image or the bank's view
    backend: str
    precision: str
    max_batch: int  # the batch size the daemon forms at most (adaptive: the cheapest per frame it measured)
    batch_ms_per_frame: dict[int, float] | None = None  # model ms per frame at each batch size timed at warm-up
    batch_deadline_ms: float
    queue_per_camera: int
    max_frame_bytes: int
    max_map_size: int
    threshold: float | None
    threshold_source: str | None
    curve: bool
    model_busy: bool
    queue_depth: int
    uptime_s: float


class StatsReply(_Reply):
    """Counters since start; latencies (ms, received -> reply sent) over each camera's last frames."""

    v: int = PROTOCOL_VERSION
    type: Literal["stats"] = "stats"
    ok: Literal[True] = True
    status: Literal["serving", "draining"]
    uptime_s: float
    requests: int
    accepted: int  # frames queued for the model
    replies_dropped: int  # replies not queued for their client (errors: reply_dropped_budget/_hwm/_gone)
    reply_bytes_pending: int  # replies queued for clients and not yet written to their connections
    queued_bytes: int  # encoded frames waiting for the model
    codec_messages: int  # libpng/libjpeg messages about bad frames kept out of the log
    batches: int
    mean_batch_size: float | None
    model_ms: dict[str, float | int | None]
    errors: dict[str, int]  # by error code, over all cameras (and requests with no readable camera)
    queue_depth: int
    cameras: dict[str, dict[str, Any]]  # received, results, dropped, errors, queue_depth, latency_ms, queue_wait_ms
    rss_mb: float


def error_reply(code: ErrorCode, message: str, camera_id: str | None = None,
                frame_id: int | str | None = None) -> bytes:
    return ErrorReply(code=code, message=message, camera_id=camera_id, frame_id=frame_id).model_dump_json().encode()


def parse_reply(raw: bytes) -> dict[str, Any]:
    """A reply part as a dict (clients read it without strict validation, so newer daemons may add fields)."""
    d = json.loads(raw)
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError("not an edgeinspect reply")
    return d
