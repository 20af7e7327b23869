"""`edgeinspect serve` (the line daemon), `edgeinspect serve keys` (CurveZMQ keys) and `edgeinspect client`
(simulated cameras). Wired into `edgeinspect.cli` by `add_serve_parsers(sub)`; also runnable alone:
`python -m edgeinspect.runtime.daemon.cli serve --bundle DIR`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edgeinspect.config import ConfigError, parse_overrides
from edgeinspect.data.visualize import heatmap_overlay, label, write_png
from edgeinspect.runtime.daemon.camera import CameraStreamer, SourceError, StreamOptions, load_frames
from edgeinspect.runtime.daemon.client import DaemonTimeout, InspectionClient
from edgeinspect.runtime.daemon.codec_noise import codec_noise
from edgeinspect.runtime.daemon.security import SecurityError, create_keys, load_client_keys
from edgeinspect.runtime.daemon.server import DaemonConfig, DaemonError, InspectionDaemon

SERVE_EPILOG = """\
protocol: requests are ZeroMQ multipart [JSON header] (health, stats) or [JSON header, frame bytes]
(inspect) sent to the ROUTER endpoint; see edgeinspect/runtime/daemon/protocol.py. Frames from several
cameras are batched up to --max-batch (at warm-up the daemon times batch sizes up to it and keeps the
cheapest per frame) or --batch-deadline-ms; each camera queues at most --queue-per-camera frames, a
newer frame drops the camera's oldest (its sender gets a "dropped" error reply) before it is decoded.
Memory budgets: --max-decode-bytes per frame's decode, --max-queued-bytes of waiting frames,
--max-reply-bytes-per-client / --max-reply-bytes of replies not yet written (replies over them are
dropped and counted in stats), --max-map-size. SIGTERM/SIGINT: finish and answer queued frames, then
exit 0; a second signal answers queued and running frames "shutting_down" and exits 1 (exit 1 whenever
an accepted frame got no result; the count is logged).
Binding anything but loopback needs CurveZMQ (--curve-server-key/--curve-authorized-dir; keys:
`edgeinspect serve keys --out DIR`) or --insecure."""


def _fail(verb: str, message: str) -> int:
    print(f"edgeinspect {verb}: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    if getattr(args, "serve_action", None) == "keys":
        return cmd_serve_keys(args)
    if args.bundle is None:
        return _fail("serve", "--bundle DIR is required (or `edgeinspect serve keys --out DIR`)")
    from pydantic import ValidationError

    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper()),
                        format="edgeinspect serve: %(message)s")
    try:
        overrides = parse_overrides(args.overrides)
        config = DaemonConfig(
            bundle=args.bundle, bind=args.bind, pub=None if args.pub.lower() == "none" else args.pub,
            backend=args.backend, precision=args.precision, threads=args.threads, max_batch=args.max_batch,
            batch_deadline_ms=args.batch_deadline_ms, queue_per_camera=args.queue_per_camera,
            max_cameras=args.max_cameras, max_frame_bytes=args.max_frame_bytes, max_pixels=args.max_pixels,
            max_decode_bytes=args.max_decode_bytes, max_queued_bytes=args.max_queued_bytes,
            max_map_size=args.max_map_size, max_reply_bytes_per_client=args.max_reply_bytes_per_client,
            max_reply_bytes=args.max_reply_bytes, adaptive_batch=not args.fixed_batch, ort_memory_arena=args.ort_arena, image_rows=args.image_rows, hwm=args.hwm, rcv_hwm=args.rcv_hwm, threshold=args.threshold, overrides=overrides, curve_server_key=args.curve_server_key,
            curve_authorized_dir=args.curve_authorized_dir, insecure=args.insecure,
            drain_timeout_s=args.drain_timeout_s)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'config'}: {x['msg']}" for x in e.errors())
        return _fail("serve", errs)
    except ConfigError as e:
        return _fail("serve", str(e))
    try:
        daemon = InspectionDaemon(config)
    except DaemonError as e:
        return _fail("serve", str(e))
    print(f"edgeinspect serve: {daemon.describe()}", flush=True)
    codec_noise.start()
    try:
        code = daemon.serve()
    finally:
        codec_noise.stop()
    if daemon.model_running:  # a forced stop left a batch on the model: do not wait for it, nor let the
        sys.stdout.flush()    # interpreter tear down under a running inference thread
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_serve_keys(args: argparse.Namespace) -> int:
    if args.out is None:
        return _fail("serve keys", "--out DIR is required")
    try:
        paths = create_keys(args.out, args.clients)
    except SecurityError as e:
        return _fail("serve keys", str(e))
    out = Path(args.out)
    client = args.clients[0]
    print(f"CurveZMQ keys in {out}:")
    for role, path in paths.items():
        print(f"  {role:16s} {path}")
    print(f"daemon: edgeinspect serve --bundle DIR --bind tcp://0.0.0.0:5555 --curve-server-key "
          f"{out / 'server.key_secret'} --curve-authorized-dir {out / 'authorized'}")
    print(f"client: edgeinspect client --endpoint tcp://HOST:5555 --curve-server-key {out / 'server.key'} "
          f"--curve-client-key {out / (client + '.key_secret')} --images DIR")
    print("copy server.key and one <client>.key_secret to each client machine; keep server.key_secret on the daemon")
    return 0


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run the inspection daemon on a bundle (ZeroMQ ROUTER + PUB)",
        description="Serve an exported bundle over ZeroMQ: inspect frames from line cameras, reply with score, "
                    "verdict, timings and optionally the anomaly map; publish results per camera.",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="bundle folder written by `edgeinspect export`")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ROUTER endpoint (default %(default)s)")
    p.add_argument("--pub", default="tcp://127.0.0.1:5556",
                   help="PUB endpoint for results, topic = camera id; 'none' for no PUB socket (default %(default)s)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="graphs to run (int8: the Q/DQ graphs `edgeinspect calibrate --int8` wrote, the other roles "
                        "in fp16, else fp32; with --backend tensorrt the engines are built on first load)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op / torch threads (default: the library's)")
    p.add_argument("--max-batch", type=int, help="largest batch (default: the bundle's inference.batch_size)")
    p.add_argument("--batch-deadline-ms", type=float, default=2.0,
                   help="longest a frame waits for a batch to fill (default %(default)s; a batch leaves at once "
                        "when every active camera has a frame in it)")
    p.add_argument("--queue-per-camera", type=int, default=2,
                   help="frames a camera may have waiting; more drop its oldest (default %(default)s)")
    p.add_argument("--max-cameras", type=int, default=64, help="cameras with frames waiting at once (default %(default)s)")
    p.add_argument("--max-frame-bytes", type=int, default=64 << 20,
                   help="largest frame part; a larger one up to twice this gets a frame_too_large reply, beyond that "
                        "libzmq closes the connection unread (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=50_000_000, help="largest frame in pixels (default %(default)s)")
    p.add_argument("--max-decode-bytes", type=int, default=64 << 20,
                   help="most one frame's decode may allocate; larger JPEGs decode at 1/2..1/8 size, larger PNGs at "
                        "8 bits, else are refused (default %(default)s)")
    p.add_argument("--max-queued-bytes", type=int, default=256 << 20,
                   help="encoded frames waiting for the model, all cameras (default %(default)s)")
    p.add_argument("--max-map-size", type=int, default=1024,
                   help="largest anomaly map a request may ask for, square side (default %(default)s)")
    p.add_argument("--max-reply-bytes-per-client", type=int, default=16 << 20,
                   help="replies waiting to be written to one connection; more are dropped and counted "
                        "(default %(default)s)")
    p.add_argument("--max-reply-bytes", type=int, default=64 << 20,
                   help="replies waiting to be written, all connections (default %(default)s)")
    p.add_argument("--fixed-batch", action="store_true",
                   help="batch up to --max-batch without timing the batch sizes at warm-up")
    p.add_argument("--image-rows", type=int, default=1, metavar="N",
                   help="onnxruntime on the CPU: the full-resolution networks (VAE, hint encoder, feature extractor) "
                        "run N frames per call, only the UNet the whole batch (default 1: the same speed, a memory "
                        "peak that does not grow with the batch; 0: the whole batch)")
    p.add_argument("--ort-arena", action="store_true",
                   help="keep onnxruntime's CPU memory arena and per-shape memory plans (faster, but memory grows to "
                        "the peak of every batch size seen)")
    p.add_argument("--hwm", type=int, default=1000,
                   help="ZeroMQ send high-water mark (replies, published results), messages; memory is bounded by the "
                        "reply byte budgets (default %(default)s)")
    p.add_argument("--rcv-hwm", type=int, default=4,
                   help="requests buffered per connected client before TCP flow control holds it back "
                        "(default %(default)s)")
    p.add_argument("--threshold", type=float,
                   help="image-score threshold for OK/NG when the bundle has no calibrated one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inference/scoring setting of the bundle, e.g. --set inference.steps=5")
    p.add_argument("--curve-server-key", type=Path, help="CurveZMQ: the server's secret key file (.key_secret)")
    p.add_argument("--curve-authorized-dir", type=Path, help="CurveZMQ: folder of authorised client public keys")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without CurveZMQ")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, how long to wait for queued frames (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve, serve_action=None)
    sp = p.add_subparsers(dest="serve_action", metavar="{keys}")
    k = sp.add_parser("keys", help="write CurveZMQ server and client key pairs",
                      description="Write server.key/.key_secret, <client>.key/.key_secret and authorized/<client>.key "
                                  "(zmq.auth.create_certificates).")
    k.add_argument("--out", type=Path, required=True, help="folder for the key files")
    k.add_argument("--clients", nargs="+", default=["client"], help="client key names (default: client)")
    return p


# --------------------------------------------------------------------------- client


def _curve_client(args: argparse.Namespace):
    if (args.curve_server_key is None) != (args.curve_client_key is None):
        raise ValueError("CurveZMQ needs both --curve-server-key (server.key) and --curve-client-key "
                         "(<client>.key_secret)")
    if args.curve_server_key is None:
        return None

    return load_client_keys(args.curve_server_key, args.curve_client_key)


def _overlay_writer(folder: Path, limit: int):
    import numpy as np

    written = [0]

    def on_reply(camera: str, frame, reply) -> None:
        if reply.type != "result" or written[0] >= limit:
            return
        amap = reply.anomaly_map()
        if amap is None:
            return
        img = frame.image
        if img.dtype == np.uint16:
            img = (img / 257.0).round().astype(np.uint8)
        if img.ndim == 2 or img.shape[2] == 1:
            rgb = np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)
        else:
            rgb = np.ascontiguousarray(img[:, :, 2::-1])
        over = heatmap_overlay(rgb, amap, 0.0, max(float(amap.max()), 1e-6))
        text = f"{camera} #{reply['frame_id']} score {reply['score']:.4g} {reply.get('verdict') or ''}"
        tile = label(np.concatenate([rgb, over], axis=1), text)
        write_png(folder / f"{camera}_{int(reply['frame_id']):06d}.png", tile)
        written[0] += 1

    return on_reply


def cmd_client(args: argparse.Namespace) -> int:
    try:
        curve = _curve_client(args)
    except (ValueError, SecurityError) as e:
        return _fail("client", str(e))
    if args.health or args.stats:
        with InspectionClient(args.endpoint, args.timeout_ms, curve=curve) as c:
            try:
                reply = c.health() if args.health else c.stats()
            except DaemonTimeout as e:
                return _fail("client", str(e))
        print(json.dumps(reply.data, indent=2))
        return 0
    if args.images is None:
        return _fail("client", "--images DIR_OR_VIDEO is required (or --health / --stats)")
    try:
        frames = load_frames(args.images, args.encoding, args.max_frames)
    except SourceError as e:
        return _fail("client", str(e))
    opts = StreamOptions(cameras=args.cameras, fps=args.fps, count=args.count, duration_s=args.duration,
                         timeout_ms=args.timeout_ms, inflight=args.inflight, return_map=args.overlays is not None,
                         camera_prefix=args.camera_prefix, live_interval_s=args.live_interval)
    on_reply = _overlay_writer(args.overlays, args.max_overlays) if args.overlays else None
    streamer = CameraStreamer(args.endpoint, frames, opts, curve=curve, on_reply=on_reply,
                              live=None if args.quiet else sys.stderr)
    try:
        summary = streamer.run()
    except KeyboardInterrupt:
        return 130
    text = json.dumps(summary, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    print(text)
    return 0 if summary["results"] > 0 else 1


def _add_client_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "client", help="stream images or a video to the daemon from simulated cameras",
        description="Simulated line cameras: stream a folder of images (or a video) to `edgeinspect serve`, print a "
                    "live summary (fps, latency percentiles, verdicts, errors) and a final JSON summary.")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="daemon ROUTER endpoint (default %(default)s)")
    p.add_argument("--images", type=Path, help="image folder (recursive), image file, or video file")
    p.add_argument("--cameras", type=int, default=1, help="simulated cameras, one connection each (default 1)")
    p.add_argument("--fps", type=float, default=0.0,
                   help="frames/s per camera; 0: next frame as soon as one is answered (default 0)")
    p.add_argument("--count", type=int, help="frames per camera (default: each source frame once)")
    p.add_argument("--duration", type=float, help="stream for this many seconds instead of --count")
    p.add_argument("--timeout-ms", type=int, default=2000,
                   help="a frame unanswered this long is lost; the camera reconnects (default %(default)s)")
    p.add_argument("--inflight", type=int, help="unanswered frames per camera (default 1 at --fps 0, else 64)")
    p.add_argument("--encoding", choices=["raw", "png", "jpeg", "file"], default="raw",
                   help="how frames travel: raw pixels, re-encoded PNG/JPEG, or the files' own bytes (default raw)")
    p.add_argument("--max-frames", type=int, default=256, help="source frames loaded into memory (default 256)")
    p.add_argument("--camera-prefix", default="cam", help="camera ids are PREFIX0, PREFIX1, ... (default cam)")
    p.add_argument("--overlays", type=Path, help="ask for anomaly maps and write input | heat-map PNGs here")
    p.add_argument("--max-overlays", type=int, default=64)
    p.add_argument("--out", type=Path, help="also write the final JSON summary here")
    p.add_argument("--quiet", action="store_true", help="no live summary lines")
    p.add_argument("--live-interval", type=float, default=1.0, help="seconds between live lines (default 1)")
    p.add_argument("--health", action="store_true", help="print the daemon's health reply and exit")
    p.add_argument("--stats", action="store_true", help="print the daemon's stats reply and exit")
    p.add_argument("--curve-server-key", type=Path, help="CurveZMQ: the server's public key file (server.key)")
    p.add_argument("--curve-client-key", type=Path, help="CurveZMQ: this client's secret key file (.key_secret)")
    p.set_defaults(func=cmd_client)
    return p


def add_serve_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` (with `serve keys`) and `client` verbs to edgeinspect's subparsers."""
    _add_serve_parser(subparsers)
    _add_client_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgeinspect", description=__doc__)
    add_serve_parsers(ap.add_subparsers(dest="verb", required=True))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
