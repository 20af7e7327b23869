"""The inspection daemon: a ZeroMQ ROUTER socket loop in front of a bundle's pipeline.

One thread (the caller of `serve`) owns the sockets: it receives requests, validates headers and
checks each frame's declared size from its header (O(1): see `frames.check_frame`), answers
health/stats/bad input at once, queues frames still encoded (bounded per camera, drop-oldest, and in
bytes: see `queueing`), and sends the replies the worker built. One worker thread decodes the frames
of a batch, runs the model and builds the replies, maps included (see `worker`); it wakes the loop
through an inproc PAIR socket when a batch is done. Nothing on the loop costs time in proportion to a
frame or a map, so health is answered within milliseconds whatever the data path is doing.

A frame pushed out of its camera's queue is answered `dropped` when a newer frame of its camera has
been through the model (the newest waiting frame holds the frames pushed out before it, at most
MAX_HELD_DROPS): a client that sends again as soon as it is answered is then paced by the model,
instead of spinning the loop (and taking the CPU the model needs) with frames that can only be
dropped.

Shutdown (SIGTERM/SIGINT, or `request_stop`): new frames are refused with `shutting_down`, frames
already queued or on the model are finished and answered, then the sockets close (lingering so the
replies leave) and `serve` returns 0. A second signal (or the drain timeout) stops at once: the queued
frames and those on the model are answered with `shutting_down`, and `serve` returns 1, logging how
many accepted frames got no result. Exit status 0 means every accepted frame got its reply.

Memory is bounded whatever the clients do:
- requests: at most `rcv_hwm` wait in ZeroMQ per connected peer (then TCP flow control holds the sender
  back); a part over 2 x max_frame_bytes makes libzmq close that connection before it is buffered (a
  message is read whole, so a larger one cannot be answered); parts up to that get `frame_too_large`;
- frames: waiting frames hold at most `max_queued_bytes` (and queue_per_camera x max_cameras frames);
  each frame's decode allocates at most `max_decode_bytes` (checked from its header, decoded at reduced
  size where the codec allows, else refused), one frame at a time;
- replies: at most `max_reply_bytes_per_client` per connection and `max_reply_bytes` in all wait to be
  written (see `outbound`); replies that do not fit are dropped and counted in stats; maps are at most
  `max_map_size` square;
- statistics keep fixed-size windows.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Literal

import zmq
from pydantic import BaseModel, ConfigDict, Field, model_validator

import edgeinspect
from edgeinspect.runtime.daemon.codec_noise import codec_noise
from edgeinspect.runtime.daemon.frames import DEFAULT_DECODE_BUDGET, check_frame
from edgeinspect.runtime.daemon.outbound import Outbox
from edgeinspect.runtime.daemon.protocol import (
    MAX_HEADER_BYTES,
    ErrorCode,
    HealthReply,
    InspectRequest,
    ProtocolError,
    StatsReply,
    error_reply,
    parse_request,
)
from edgeinspect.runtime.daemon.queueing import FrameQueue, QueueClosed, QueueFull, TooManyCameras
from edgeinspect.runtime.daemon.security import (
    SecurityError,
    apply_server_curve,
    check_bind,
    load_server_keys,
    start_authenticator,
)
from edgeinspect.runtime.daemon.stats import DaemonStats
from edgeinspect.runtime.daemon.verdict import Judge, judge_for
from edgeinspect.runtime.daemon.worker import (
    BatchOutcome,
    FrameReply,
    InferenceWorker,
    PendingFrame,
    ReplyContext,
    choose_batch,
    release_free_memory,
    run_pipeline,
)
from edgeinspect.runtime.bundle_loading import BundleError, load_bundle
from edgeinspect.runtime.detector import bundle_pipeline

log = logging.getLogger("edgeinspect.serve")

RECV_BURST = 256  # messages handled before the loop looks at finished batches again
MAX_HELD_DROPS = 64  # dropped frames whose reply waits on one queued frame; older ones are answered at once
MAP_BYTES_PER_PIXEL = 4  # a float16 map is 2 bytes a pixel, a png16 of noise a little over: a reply fits 4


class DaemonError(RuntimeError):
    """The daemon cannot start (bundle, bind, keys); the message says why."""


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: Path
    bind: str = "tcp://127.0.0.1:5555"
    pub: str | None = "tcp://127.0.0.1:5556"  # None: no PUB socket
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"  # int8: the Q/DQ graphs of `calibrate --int8`
    threads: int | None = Field(None, ge=1)  # onnxruntime intra-op and torch threads (None: library default)
    max_batch: int | None = Field(None, ge=1, le=256)  # None: the bundle's inference.batch_size
    batch_deadline_ms: float = Field(2.0, ge=0)
    queue_per_camera: int = Field(2, ge=1, le=4096)
    max_cameras: int = Field(64, ge=1, le=65536)
    max_frame_bytes: int = Field(64 << 20, ge=1024)
    max_pixels: int = Field(50_000_000, ge=1)
    max_decode_bytes: int = Field(DEFAULT_DECODE_BUDGET, ge=1 << 20)  # bytes one frame's decode may allocate
    max_queued_bytes: int = Field(256 << 20, ge=1 << 20)  # encoded frames waiting for the model, all cameras
    max_map_size: int = Field(1024, ge=8, le=4096)  # largest map a request may ask for (square side)
    max_reply_bytes_per_client: int = Field(16 << 20, ge=1 << 16)  # replies waiting to be written, per connection
    max_reply_bytes: int = Field(64 << 20, ge=1 << 16)  # replies waiting to be written, all connections
    adaptive_batch: bool = True  # at warm-up, time batch sizes up to max_batch; keep the cheapest per frame
    # onnxruntime's CPU arena and per-shape memory plans keep the peak of every batch size seen: off, the
    # daemon's memory stays at its idle level whatever the batches (see benchmarks/results/serve_cpu2.md)
    ort_memory_arena: bool = False
    # the full-resolution networks (VAE, hint encoder, feature extractor) run this many frames per call
    # (onnxruntime on the CPU; 0: the whole batch): their ms per frame does not fall with the batch, their
    # memory grows with it (about 40 MiB a frame for the edge preset), so only the UNet sees the whole batch
    image_rows: int = Field(1, ge=0)
    # replies (ROUTER send) and results (PUB) waiting per peer, messages; the reply byte budgets bound the memory,
    # this only bounds the count (a burst of small `dropped` replies to a client that reads must fit)
    hwm: int = Field(1000, ge=1)
    # requests waiting in ZeroMQ per connected peer: small, so a sender faster than the daemon is held back
    # by TCP flow control instead of filling this process with frames (memory <= rcv_hwm x frame x peers)
    rcv_hwm: int = Field(4, ge=1)
    threshold: float | None = None  # used when the bundle has no calibrated threshold
    overrides: dict[str, Any] = Field(default_factory=dict)  # inference/scoring overrides (e.g. steps)
    curve_server_key: Path | None = None  # the server's .key_secret file
    curve_authorized_dir: Path | None = None  # folder of authorised client public keys (*.key)
    insecure: bool = False  # allow a non-loopback bind without CurveZMQ
    drain_timeout_s: float = Field(30.0, gt=0)
    linger_ms: int = Field(2000, ge=0)
    stats_window: int = Field(1024, ge=1)
    live_window_s: float = Field(1.0, ge=0)
    warmup: bool = True  # run a batch of 1 and of max_batch before serving (first runs are slow)

    @model_validator(mode="after")
    def _consistent(self) -> "DaemonConfig":
        if (self.curve_server_key is None) != (self.curve_authorized_dir is None):
            raise ValueError("CurveZMQ needs both curve_server_key and curve_authorized_dir")
        largest_reply = MAP_BYTES_PER_PIXEL * self.max_map_size ** 2 + MAX_HEADER_BYTES
        if min(self.max_reply_bytes_per_client, self.max_reply_bytes) < largest_reply:
            raise ValueError(f"max_reply_bytes_per_client and max_reply_bytes must hold one reply with the largest "
                             f"map ({largest_reply} bytes at max_map_size {self.max_map_size})")
        if self.max_queued_bytes < self.max_frame_bytes:
            raise ValueError("max_queued_bytes must hold one frame of max_frame_bytes")
        return self

    @property
    def curve(self) -> bool:
        return self.curve_server_key is not None


def _bind(sock: zmq.Socket, endpoint: str, what: str) -> str:
    if "[" in endpoint:
        sock.ipv6 = True
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        raise DaemonError(f"cannot bind the {what} socket to {endpoint}: {e}") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class InspectionDaemon:
    """`InspectionDaemon(DaemonConfig(bundle=...)).serve()`; `pipeline=` injects a ready pipeline
    (with `image_size`, `info`) instead of loading one from the bundle (tests, custom backends)."""

    def __init__(self, config: DaemonConfig, *, pipeline: Any = None, image_size: int | None = None,
                 info: dict[str, Any] | None = None, judge: Judge | None = None):
        self.config = config
        self.started = time.time()
        keys = None
        if config.curve:
            try:
                keys = load_server_keys(config.curve_server_key, config.curve_authorized_dir)
            except SecurityError as e:
                raise DaemonError(str(e)) from None
        for endpoint in filter(None, (config.bind, config.pub)):
            try:
                check_bind(endpoint, config.curve, config.insecure)
            except SecurityError as e:
                raise DaemonError(str(e)) from None
        if pipeline is None:
            pipeline, image_size, info, judge = self._load(config)
        if image_size is None:
            raise DaemonError("an injected pipeline needs image_size")
        self.pipeline = pipeline
        self.image_size = int(image_size)
        self.info = {"bundle": str(config.bundle), "method": "?", "preset": "?", "max_batch": 1, **(info or {})}
        self.max_batch = int(config.max_batch or self.info["max_batch"])
        self.batch_ms_per_frame: dict[int, float] | None = None
        self.judge = judge or judge_for(None, config.threshold)
        if config.warmup:
            self._warmup()
        self.info["max_batch"] = self.max_batch

        self.stats = DaemonStats(config.stats_window)
        self.queue = FrameQueue(config.queue_per_camera, config.max_cameras, config.live_window_s,
                                max_bytes=config.max_queued_bytes)
        self._outcomes: queue_mod.SimpleQueue[BatchOutcome] = queue_mod.SimpleQueue()
        self._stop = threading.Event()
        self._force = threading.Event()
        self.draining = False
        self.endpoint = self.pub_endpoint = None
        self.accepted = 0  # frames queued for the model
        self.answered = 0  # of those, frames whose reply was handed to ZeroMQ (or dropped for a full client)
        self.cut = 0  # of those, frames answered `shutting_down` by a forced stop
        self.unanswered = 0  # accepted frames left without a reply when `serve` returned

        self.ctx = zmq.Context()
        self._wake_lock = threading.Lock()
        self._auth = None
        try:
            if keys is not None:
                self._auth = start_authenticator(self.ctx, keys)
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.linger = config.linger_ms
            self.router.rcvhwm = config.rcv_hwm
            self.router.sndhwm = config.hwm
            self.router.router_mandatory = 1  # a reply that cannot be queued raises: it is counted, not lost
            self.router.maxmsgsize = 2 * config.max_frame_bytes
            self.pub = None
            if keys is not None:
                apply_server_curve(self.router, keys)
            self.endpoint = _bind(self.router, config.bind, "inspection (ROUTER)")
            self.outbox = Outbox(self.router, config.max_reply_bytes_per_client, config.max_reply_bytes)
            if config.pub:
                self.pub = self.ctx.socket(zmq.PUB)
                self.pub.linger = 0
                self.pub.sndhwm = config.hwm
                if keys is not None:
                    apply_server_curve(self.pub, keys)
                self.pub_endpoint = _bind(self.pub, config.pub, "results (PUB)")
            wake = f"inproc://edgeinspect-wake-{id(self)}"
            self._wake_rx = self.ctx.socket(zmq.PAIR)
            self._wake_rx.bind(wake)
            self._wake_tx = self.ctx.socket(zmq.PAIR)  # used by the worker thread only
            self._wake_tx.connect(wake)
        except BaseException:
            self._close_sockets(0)
            raise
        self.worker = self._start_worker()
        self.worker_restarts = 0

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _load(config: DaemonConfig):
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        try:
            bundle = load_bundle(config.bundle, overrides=config.overrides or None)
            pipeline = bundle_pipeline(bundle, config.backend, precision=config.precision,
                                       intra_op_threads=config.threads, max_batch=config.max_batch,
                                       memory_arena=config.ort_memory_arena,
                                       image_rows=config.image_rows or None)
        except (BundleError, OSError, ValueError) as e:  # ValueError: e.g. a calibration record it cannot read
            raise DaemonError(str(e)) from None
        except ImportError as e:
            raise DaemonError(f"backend {config.backend!r} is not available here: {e}") from None
        cfg = bundle.config
        info = {"bundle": str(bundle.path), "method": bundle.method, "preset": bundle.manifest.get("preset", "?"),
                "max_batch": cfg.inference.batch_size, "backend": config.backend, "precision": config.precision}
        # frames are decoded at the size the detector reads them at: the model image, or the bank's larger view
        return pipeline, pipeline.frame_size, info, judge_for(bundle.calibration, config.threshold)

    def _warmup(self) -> None:
        """First runs are slow: run the model before serving; with adaptive_batch, also choose the batch size."""
        import numpy as np

        try:
            if self.config.adaptive_batch and self.max_batch > 1:
                allowed = self.max_batch
                self.max_batch, self.batch_ms_per_frame = choose_batch(self.pipeline, self.image_size, allowed)
                log.info("batch sizes, model ms per frame: %s; batches of at most %d", self.batch_ms_per_frame,
                         self.max_batch)
            else:
                blank = np.full((self.image_size, self.image_size, 3), 128, np.uint8)
                for b in sorted({1, self.max_batch}):
                    run_pipeline(self.pipeline, [blank] * b)
        except Exception as e:
            raise DaemonError(f"the model fails on a warm-up batch: {type(e).__name__}: {e}") from None
        release_free_memory()

    def _start_worker(self) -> InferenceWorker:
        deadline = self.config.batch_deadline_ms / 1e3
        context = ReplyContext(self.image_size, self.config.max_pixels, self.config.max_decode_bytes, self.judge,
                               self.judge.threshold, self.judge.source)
        w = InferenceWorker(self.pipeline, self.queue, self.max_batch, deadline, self._on_batch_done, context)
        w.start()
        return w

    def _on_batch_done(self, outcome: BatchOutcome) -> None:  # worker thread
        self._outcomes.put(outcome)
        with self._wake_lock:  # the loop may close the socket at a forced stop
            if self._wake_tx.closed:
                return
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:  # the loop drains the outcomes on its next poll anyway
                pass

    # ------------------------------------------------------------------ control

    def request_stop(self, force: bool = False) -> None:
        """Begin a graceful shutdown (thread-safe); force=True skips waiting for queued frames."""
        if force or self._stop.is_set():
            self._force.set()
        self._stop.set()

    def _on_signal(self, signum, _frame) -> None:
        log.info("%s: %s", signal.Signals(signum).name,
                 "stopping now" if self._stop.is_set() else "finishing queued frames, then stopping")
        self.request_stop()

    # ------------------------------------------------------------------ replies

    def _send(self, route: list[bytes], parts: list[bytes]) -> bool:
        dropped = self.outbox.send(route, parts)
        if dropped is not None:
            self.stats.reply_dropped(dropped)
        return dropped is None

    def _send_error(self, route: list[bytes], code: ErrorCode, message: str, camera_id: str | None = None,
                    frame_id: int | str | None = None) -> None:
        self.stats.error(code.value, camera_id)
        self._send(route, [error_reply(code, message, camera_id, frame_id)])

    def _answer(self, pf: PendingFrame, code: ErrorCode, message: str) -> None:
        """An error reply for an accepted frame (dropped, shutting down)."""
        if pf.answered:
            return
        pf.answered = True
        self.answered += 1
        req = pf.request
        self._send_error(pf.route, code, message, req.camera_id, req.frame_id)

    def _health(self) -> bytes:
        i = self.info
        return HealthReply(
            status="draining" if self._stop.is_set() else "serving", version=edgeinspect.__version__, pid=os.getpid(),
            bundle=str(i["bundle"]), method=str(i["method"]), preset=str(i["preset"]), image_size=self.image_size,
            backend=str(i.get("backend", self.config.backend)),
            precision=str(i.get("precision", self.config.precision)),
            max_batch=self.max_batch, batch_ms_per_frame=self.batch_ms_per_frame,
            batch_deadline_ms=self.config.batch_deadline_ms,
            queue_per_camera=self.config.queue_per_camera, max_frame_bytes=self.config.max_frame_bytes,
            max_map_size=self.config.max_map_size,
            threshold=self.judge.threshold, threshold_source=self.judge.source, curve=self.config.curve,
            model_busy=self.worker.busy, queue_depth=self.queue.depth(),
            uptime_s=round(time.time() - self.started, 3)).model_dump_json().encode()

    def _stats(self) -> bytes:
        snap = self.stats.snapshot(self.queue.depth_by_camera())
        return StatsReply(status="draining" if self._stop.is_set() else "serving", accepted=self.accepted,
                          queued_bytes=self.queue.queued_bytes(), reply_bytes_pending=self.outbox.pending_bytes,
                          codec_messages=codec_noise.count, **snap).model_dump_json().encode()

    def _reply_outcome(self, o: BatchOutcome) -> None:
        if o.model_frames:
            self.stats.batch(o.model_frames, o.model_ms)
        for fr in o.replies:
            self._release_displaced(fr.frame)
            self._send_reply(fr)

    def _release_displaced(self, pf: PendingFrame, keep: int = 0) -> None:
        """Answer the frames pf holds as pushed out (all but the newest `keep`)."""
        while len(pf.displaced) > keep:
            d = pf.displaced.pop(0)
            self._answer(d, ErrorCode.DROPPED, d.drop_message)

    def _send_reply(self, fr: FrameReply) -> None:
        pf = fr.frame
        if pf.answered:  # a forced stop answered it while it was on the model
            return
        pf.answered = True
        self.answered += 1
        req = pf.request
        if fr.code is not None:
            self.stats.error(fr.code, req.camera_id)
            self._send(pf.route, fr.parts)
            return
        self._send(pf.route, fr.parts)
        if self.pub is not None:
            try:
                self.pub.send_multipart([req.camera_id.encode(), fr.parts[0]], zmq.NOBLOCK)
            except zmq.Again:
                pass
        self.stats.result(req.camera_id, fr.latency_ms, fr.queue_wait_ms)

    # ------------------------------------------------------------------ requests

    def _handle(self, parts: list[zmq.Frame]) -> None:
        received = time.perf_counter()
        self.stats.requests += 1
        route = [parts[0].bytes]
        rest = parts[1:]
        if rest and len(rest[0]) == 0:  # a REQ client's empty delimiter: keep it for the reply
            route.append(b"")
            rest = rest[1:]
        if not rest:
            return self._send_error(route, ErrorCode.BAD_PARTS,
                                    "empty message: expected [header] (health, stats) or [header, frame] (inspect)")
        if len(rest[0]) > MAX_HEADER_BYTES:
            return self._send_error(route, ErrorCode.HEADER_TOO_LARGE,
                                    f"header has {len(rest[0])} bytes, the limit is {MAX_HEADER_BYTES}")
        try:
            req = parse_request(rest[0].bytes)
        except ProtocolError as e:
            return self._send_error(route, e.code, e.message, e.camera_id, e.frame_id)
        if req.type in ("health", "stats"):
            if len(rest) != 1:
                return self._send_error(route, ErrorCode.BAD_PARTS,
                                        f"a {req.type} request has 1 part [header], got {len(rest)}")
            return self._send(route, [self._health() if req.type == "health" else self._stats()])
        cam, fid = req.camera_id, req.frame_id
        if len(rest) != 2:
            return self._send_error(route, ErrorCode.BAD_PARTS,
                                    f"an inspect request has 2 parts [header, frame], got {len(rest)}", cam, fid)
        if self._stop.is_set():
            return self._send_error(route, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down: frame not accepted",
                                    cam, fid)
        opts = req.options
        if opts.return_map and (opts.map_size or self.image_size) > self.config.max_map_size:
            return self._send_error(route, ErrorCode.BAD_HEADER,
                                    f"options.map_size: {opts.map_size or self.image_size} is over this daemon's "
                                    f"limit of {self.config.max_map_size}", cam, fid)
        frame = rest[1]
        n = len(frame)
        if n > self.config.max_frame_bytes:
            return self._send_error(route, ErrorCode.FRAME_TOO_LARGE,
                                    f"frame has {n} bytes, the limit is {self.config.max_frame_bytes}", cam, fid)
        if n == 0:
            return self._send_error(route, ErrorCode.FRAME_SIZE_MISMATCH, "frame part is empty", cam, fid)
        self.stats.received(cam)
        try:
            check_frame(req, frame.buffer, self.config.max_pixels, self.config.max_decode_bytes)
        except ProtocolError as e:
            return self._send_error(route, e.code, e.message, cam, fid)
        pf = PendingFrame(route, req, frame.buffer, received)
        try:
            dropped = self.queue.put(cam, pf, n)
        except TooManyCameras as e:
            return self._send_error(route, ErrorCode.TOO_MANY_CAMERAS, str(e), cam, fid)
        except QueueFull as e:
            return self._send_error(route, ErrorCode.DROPPED, f"frame not queued: {e}", cam, fid)
        except QueueClosed:
            return self._send_error(route, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down: frame not accepted",
                                    cam, fid)
        self.accepted += 1
        if dropped is not None:
            d: InspectRequest = dropped.request
            dropped.data = None  # its bytes go now; only the route and the header wait for the reply
            dropped.drop_message = (f"camera {d.camera_id!r} sent frame {fid!r} while its queue was full "
                                    f"({self.config.queue_per_camera} frames): this older frame was dropped "
                                    "(drop-oldest policy)")
            pf.displaced = [*dropped.displaced, dropped]
            dropped.displaced = []
            self._release_displaced(pf, keep=MAX_HELD_DROPS)

    def _handle_safely(self, parts: list[zmq.Frame]) -> None:
        try:
            self._handle(parts)
        except Exception as e:  # a bug must cost one reply, never the daemon
            log.error("internal error on a request: %s\n%s", e, traceback.format_exc())
            try:
                route = [parts[0].bytes] + ([b""] if len(parts) > 1 and len(parts[1]) == 0 else [])
                self._send_error(route, ErrorCode.INTERNAL, f"internal error: {type(e).__name__}")
            except Exception:
                pass

    # ------------------------------------------------------------------ the loop

    def _drain_outcomes(self) -> None:
        while True:
            try:
                outcome = self._outcomes.get_nowait()
            except queue_mod.Empty:
                return
            self._reply_outcome(outcome)

    def _begin_drain(self) -> float:
        self.draining = True
        self.queue.close()
        log.info("draining: %d frame(s) queued, model %s", self.queue.depth(), "busy" if self.worker.busy else "idle")
        return time.monotonic() + self.config.drain_timeout_s

    def _stop_now(self) -> None:
        """A forced stop: answer the queued frames and the batch on the model with `shutting_down`."""
        self._drain_outcomes()
        for pf in [*self.queue.pop_all(), *self.worker.current]:
            self._release_displaced(pf)
            if not pf.answered:
                self.cut += 1
                self._answer(pf, ErrorCode.SHUTTING_DOWN, "the daemon was stopped (second signal or drain timeout) "
                             "before this frame's result")

    def serve(self, install_signals: bool | None = None) -> int:
        """Run until stopped; returns the exit code: 0 when every accepted frame got its reply, else 1."""
        if install_signals is None:
            install_signals = threading.current_thread() is threading.main_thread()
        previous = {}
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        drain_deadline = None
        try:
            while True:
                if self._stop.is_set() and drain_deadline is None:
                    drain_deadline = self._begin_drain()
                if self._force.is_set():
                    self._stop_now()
                    log.info("stopped without waiting for the model")
                    break
                if drain_deadline is not None:
                    if not self.worker.is_alive():
                        self._drain_outcomes()
                        log.info("drained: every accepted frame answered")
                        break
                    if time.monotonic() > drain_deadline:
                        log.error("drain timed out after %.0f s", self.config.drain_timeout_s)
                        self._force.set()
                        continue
                elif not self.worker.is_alive():  # only a bug gets here: keep serving with a new worker
                    log.error("the inference worker died; starting a new one")
                    self.worker_restarts += 1
                    for pf in self.worker.current:
                        self._release_displaced(pf)
                        self._answer(pf, ErrorCode.INTERNAL, "the inference worker died on this frame's batch")
                    self.worker = self._start_worker()
                events = dict(poller.poll(50))
                if self._wake_rx in events:
                    try:
                        while True:
                            self._wake_rx.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                self._drain_outcomes()
                if self.router in events:
                    for _ in range(RECV_BURST):
                        try:
                            parts = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle_safely(parts)
                    self._drain_outcomes()
                self.outbox.reap()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()
        self.unanswered = self.accepted - self.answered
        dropped = self.stats.replies_dropped
        if self.cut or self.unanswered:
            log.error("%d accepted frame(s) got no result: %d answered shutting_down by a forced stop, %d got no "
                      "reply at all (%d replies were dropped for clients that did not read)",
                      self.cut + self.unanswered, self.cut, self.unanswered, dropped)
            return 1
        log.info("every accepted frame answered (%d frames; %d replies dropped for clients that did not read)",
                 self.accepted, dropped)
        return 0

    def _close_sockets(self, linger: int | None) -> None:
        with self._wake_lock:
            for name in ("_wake_tx", "_wake_rx", "pub", "router"):
                sock = getattr(self, name, None)
                if sock is not None and not sock.closed:
                    sock.close(linger=linger if name == "router" else 0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.ctx.term()  # waits up to `linger` for the last replies to leave

    @property
    def model_running(self) -> bool:
        """A batch is still on the model (only after a forced stop): exit the process with os._exit."""
        return self.worker.is_alive()

    def close(self) -> None:
        """Stop the worker (it finishes its batch) and close the sockets, letting queued replies leave."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.queue.close()
        if self.worker.is_alive() and not self._force.is_set():
            self.worker.join(timeout=self.config.drain_timeout_s)
        self._close_sockets(self.config.linger_ms)

    def describe(self) -> str:
        i = self.info
        thr = "none" if self.judge.threshold is None else f"{self.judge.threshold:.6g} ({self.judge.source})"
        pub = f", publish {self.pub_endpoint}" if self.pub_endpoint else ""
        return (f"ready: inspect {self.endpoint}{pub} ({i['method']} {i['preset']}, {self.image_size} px, "
                f"{i.get('backend', self.config.backend)} {i.get('precision', self.config.precision)}, batch <= "
                f"{self.max_batch} / {self.config.batch_deadline_ms:g} ms, queue {self.config.queue_per_camera} per "
                f"camera, threshold {thr}{', CurveZMQ' if self.config.curve else ''}, pid {os.getpid()})")
