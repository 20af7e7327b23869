"""The inspection daemon: a ZeroMQ ROUTER socket loop in front of a bundle's pipeline.

One thread (the caller of `serve`) owns the sockets: it receives requests, validates and decodes
frames, answers health/stats/bad input at once, queues frames (bounded per camera, drop-oldest: see
`queueing`), and sends the replies of finished batches. One worker thread runs the model (see
`worker`); it wakes the loop through an inproc PAIR socket when a batch is done, so a reply leaves
as soon as its batch does.

Shutdown (SIGTERM/SIGINT, or `request_stop`): new frames are refused with `shutting_down`, frames
already queued or on the model are finished and answered, then the sockets close (lingering so the
replies leave) and `serve` returns 0. A second signal stops at once, answering queued frames with
`shutting_down` (a batch on the model then gets no reply).

Memory is bounded whatever the senders do: at most `rcv_hwm` requests wait in ZeroMQ per connected
peer (then TCP flow control holds the sender back), at most `hwm` replies per peer, at most queue_per_camera x max_cameras decoded frames wait for the model, frames over
`max_frame_bytes` are refused (and parts over max_frame_bytes + 1 MiB make libzmq drop the
connection before they are buffered), and statistics keep fixed-size windows.
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
from edgeinspect.runtime.daemon.codec import encode_map
from edgeinspect.runtime.daemon.frames import decode_frame
from edgeinspect.runtime.daemon.protocol import (
    MAX_HEADER_BYTES,
    ErrorCode,
    HealthReply,
    InspectRequest,
    MapInfo,
    ProtocolError,
    ResultReply,
    StatsReply,
    Timings,
    error_reply,
    parse_request,
)
from edgeinspect.runtime.daemon.queueing import FrameQueue, QueueClosed, TooManyCameras
from edgeinspect.runtime.daemon.security import (
    SecurityError,
    apply_server_curve,
    check_bind,
    load_server_keys,
    start_authenticator,
)
from edgeinspect.runtime.daemon.stats import DaemonStats
from edgeinspect.runtime.daemon.verdict import Judge, judge_for
from edgeinspect.runtime.daemon.worker import BatchOutcome, InferenceWorker, PendingFrame, images_to_batch
from edgeinspect.runtime.bundle_loading import BundleError, load_bundle
from edgeinspect.runtime.detector import bundle_pipeline

log = logging.getLogger("edgeinspect.serve")

HARD_PART_MARGIN = 1 << 20  # ZMQ_MAXMSGSIZE = max_frame_bytes + this
RECV_BURST = 256  # messages handled before the loop looks at finished batches again


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
    hwm: int = Field(100, ge=1)  # replies (ROUTER send) and results (PUB) waiting per peer, messages
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
    def _curve_pair(self) -> "DaemonConfig":
        if (self.curve_server_key is None) != (self.curve_authorized_dir is None):
            raise ValueError("CurveZMQ needs both curve_server_key and curve_authorized_dir")
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
        self.info["max_batch"] = self.max_batch
        self.judge = judge or judge_for(None, config.threshold)
        if config.warmup:
            self._warmup()

        self.stats = DaemonStats(config.stats_window)
        self.queue = FrameQueue(config.queue_per_camera, config.max_cameras, config.live_window_s)
        self._outcomes: queue_mod.SimpleQueue[BatchOutcome] = queue_mod.SimpleQueue()
        self._stop = threading.Event()
        self._force = threading.Event()
        self.draining = False
        self.endpoint = self.pub_endpoint = None

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
            self.router.maxmsgsize = config.max_frame_bytes + HARD_PART_MARGIN
            self.pub = None
            if keys is not None:
                apply_server_curve(self.router, keys)
            self.endpoint = _bind(self.router, config.bind, "inspection (ROUTER)")
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
                                       intra_op_threads=config.threads, max_batch=config.max_batch)
        except (BundleError, OSError, ValueError) as e:  # ValueError: e.g. a calibration record it cannot read
            raise DaemonError(str(e)) from None
        except ImportError as e:
            raise DaemonError(f"backend {config.backend!r} is not available here: {e}") from None
        cfg = bundle.config
        info = {"bundle": str(bundle.path), "method": bundle.method, "preset": bundle.manifest.get("preset", "?"),
                "max_batch": cfg.inference.batch_size, "backend": config.backend, "precision": config.precision}
        return pipeline, int(bundle.manifest["image_size"]), info, judge_for(bundle.calibration, config.threshold)

    def _warmup(self) -> None:
        import numpy as np

        blank = np.full((self.image_size, self.image_size, 3), 128, np.uint8)
        for b in sorted({1, self.max_batch}):
            try:
                import torch

                with torch.inference_mode():
                    self.pipeline(images_to_batch([blank] * b))
            except Exception as e:
                raise DaemonError(f"the model fails on a warm-up batch of {b}: {type(e).__name__}: {e}") from None

    def _start_worker(self) -> InferenceWorker:
        deadline = self.config.batch_deadline_ms / 1e3
        w = InferenceWorker(self.pipeline, self.queue, self.max_batch, deadline, self._on_batch_done)
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

    def _send(self, route: list[bytes], parts: list[bytes]) -> None:
        try:
            self.router.send_multipart([*route, *parts], zmq.NOBLOCK)
        except zmq.Again:  # the peer's queue is full (or gone): ROUTER drops, like the HWM would
            self.stats.error("reply_dropped")

    def _send_error(self, route: list[bytes], code: ErrorCode, message: str, camera_id: str | None = None,
                    frame_id: int | str | None = None) -> None:
        self.stats.error(code.value, camera_id)
        self._send(route, [error_reply(code, message, camera_id, frame_id)])

    def _health(self) -> bytes:
        i = self.info
        return HealthReply(
            status="draining" if self._stop.is_set() else "serving", version=edgeinspect.__version__, pid=os.getpid(),
            bundle=str(i["bundle"]), method=str(i["method"]), preset=str(i["preset"]), image_size=self.image_size,
            backend=str(i.get("backend", self.config.backend)), precision=str(i.get("precision", self.config.precision)),
            max_batch=self.max_batch, batch_deadline_ms=self.config.batch_deadline_ms,
            queue_per_camera=self.config.queue_per_camera, max_frame_bytes=self.config.max_frame_bytes,
            threshold=self.judge.threshold, threshold_source=self.judge.source, curve=self.config.curve,
            model_busy=self.worker.busy, queue_depth=self.queue.depth(),
            uptime_s=round(time.time() - self.started, 3)).model_dump_json().encode()

    def _stats(self) -> bytes:
        snap = self.stats.snapshot(self.queue.depth_by_camera())
        return StatsReply(status="draining" if self._stop.is_set() else "serving", **snap).model_dump_json().encode()

    def _reply_outcome(self, o: BatchOutcome) -> None:
        self.stats.batch(len(o.frames), o.model_ms)
        for i, pf in enumerate(o.frames):
            req: InspectRequest = pf.request
            try:
                if o.error is not None:
                    self._send_error(pf.route, ErrorCode.INFERENCE_FAILED,
                                     f"the model failed on this frame's batch: {o.error}", req.camera_id,
                                     req.frame_id)
                    continue
                t0 = time.perf_counter()
                score = float(o.scores[i])
                verdict, norm = self.judge(score)
                extra: list[bytes] = []
                map_info = None
                if req.options.return_map:
                    info, data = encode_map(o.maps[i], req.options.map_encoding, req.options.map_size)
                    map_info = MapInfo(**info)
                    extra.append(data)
                queue_wait = (o.dispatched - pf.enqueued) * 1e3
                now = time.perf_counter()
                timings = Timings(decode=round(pf.decode_ms, 3), queue_wait=round(queue_wait, 3), model=o.timings_ms,
                                  model_total=round(o.model_ms, 3), encode_reply=round((now - t0) * 1e3, 3),
                                  daemon_total=round((now - pf.received) * 1e3, 3))
                body = ResultReply(
                    camera_id=req.camera_id, frame_id=req.frame_id, timestamp=req.timestamp, score=score,
                    normalized_score=norm, verdict=verdict, threshold=self.judge.threshold,
                    threshold_source=self.judge.source,
                    fire_step=None if o.fire_steps is None else o.fire_steps[i], batch_size=len(o.frames),
                    timings_ms=timings, map=map_info).model_dump_json().encode()
                self._send(pf.route, [body, *extra])
                if self.pub is not None:
                    try:
                        self.pub.send_multipart([req.camera_id.encode(), body], zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                self.stats.result(req.camera_id, (time.perf_counter() - pf.received) * 1e3, queue_wait)
            except Exception as e:  # never lose the rest of the batch over one reply
                log.error("building the reply of %s/%s failed: %s\n%s", req.camera_id, req.frame_id, e,
                          traceback.format_exc())
                self._send_error(pf.route, ErrorCode.INTERNAL, f"reply failed: {type(e).__name__}",
                                 req.camera_id, req.frame_id)

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
        frame = rest[1]
        n = len(frame)
        if n > self.config.max_frame_bytes:
            return self._send_error(route, ErrorCode.FRAME_TOO_LARGE,
                                    f"frame has {n} bytes, the limit is {self.config.max_frame_bytes}", cam, fid)
        if n == 0:
            return self._send_error(route, ErrorCode.FRAME_SIZE_MISMATCH, "frame part is empty", cam, fid)
        self.stats.received(cam)
        try:
            image = decode_frame(req, frame.buffer, self.image_size, self.config.max_pixels)
        except ProtocolError as e:
            return self._send_error(route, e.code, e.message, cam, fid)
        pf = PendingFrame(route, req, image, received, (time.perf_counter() - received) * 1e3)
        pf.enqueued = time.perf_counter()
        try:
            dropped = self.queue.put(cam, pf)
        except TooManyCameras as e:
            return self._send_error(route, ErrorCode.TOO_MANY_CAMERAS, str(e), cam, fid)
        except QueueClosed:
            return self._send_error(route, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down: frame not accepted",
                                    cam, fid)
        if dropped is not None:
            d: InspectRequest = dropped.request
            self.stats.dropped(d.camera_id)
            self._send(dropped.route, [error_reply(
                ErrorCode.DROPPED, f"camera {d.camera_id!r} sent frame {fid!r} while its queue was full "
                f"({self.config.queue_per_camera} frames): this older frame was dropped (drop-oldest policy)",
                d.camera_id, d.frame_id)])

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

    def serve(self, install_signals: bool | None = None) -> int:
        """Run until stopped; returns the exit code (0 after a graceful drain)."""
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
        code = 0
        try:
            while True:
                if self._stop.is_set() and drain_deadline is None:
                    drain_deadline = self._begin_drain()
                if self._force.is_set():
                    for pf in self.queue.pop_all():
                        self._send_error(pf.route, ErrorCode.SHUTTING_DOWN, "the daemon stopped before this frame "
                                         "reached the model", pf.request.camera_id, pf.request.frame_id)
                    self._drain_outcomes()
                    log.info("stopped without waiting for the model")
                    break
                if drain_deadline is not None:
                    if not self.worker.is_alive():
                        self._drain_outcomes()
                        log.info("drained: every accepted frame answered")
                        break
                    if time.monotonic() > drain_deadline:
                        log.error("drain timed out after %.0f s: the frames on the model get no reply",
                                  self.config.drain_timeout_s)
                        self._force.set()
                        code = 1
                        continue
                elif not self.worker.is_alive():  # only a bug gets here: keep serving with a new worker
                    log.error("the inference worker died; starting a new one")
                    self.worker_restarts += 1
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
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()
        return code

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
