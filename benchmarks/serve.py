"""The line daemon end to end over loopback: frames/s and latency for 1 and 4 cameras, daemon overhead,
memory over a long run, backend by backend.

    python benchmarks/serve.py --bundle BUNDLE --threads 2 --frames 200 --long-run-s 600

writes benchmarks/results/serve_<machine>.md and serve_<machine>.json (`--results` for another folder).
Per backend (`--backends onnxruntime,tensorrt`; default onnxruntime):

* direct: the bundle pipeline in this process on the same frames (decoded and resized as the daemon
  does), batch 1, one after another: the model's own latency;
* the daemon (`edgeinspect serve`, a child process on tcp://127.0.0.1, same --threads) fed by the
  camera simulator of `edgeinspect client` (raw frames, closed loop: a camera sends its next frame when
  its previous one is answered):
  - 1 camera, `--frames` frames: fps_1cam, latency percentiles (client-observed, send -> reply);
  - 4 cameras, `--frames` / 4 frames each: fps_4cam (frames answered per second, all cameras), latency;
  - daemon_overhead_ms_p50 = serve p50 (1 camera) - direct p50: transport, JSON, decode, queueing;
  - long run: 4 cameras for `--long-run-s` seconds; rss_mb_start / rss_mb_end are the daemon's resident
    memory (/proc/<pid>/statm) just before and just after it (rss_mb_max: the highest sample, every 1 s).
The client runs on the same machine and takes CPU from the daemon: on a small CPU that is part of the
measured overhead (as it would be for a camera PC running both).

Machine slug (file names): `--machine`, else "cpu<N>" with N the logical CPUs this process may use, or
the GPU's name as a slug when the tensorrt backend ran.

JSON, top level (the first backend's numbers): daemon_overhead_ms_p50, fps_1cam, fps_4cam,
latency_ms_p50, latency_ms_p99 (1 camera), latency_4cam_ms_p50, latency_4cam_ms_p99, rss_mb_start,
rss_mb_end; `backends` has every backend's numbers, runs and daemon stats; plus machine, settings and
the command. Timings taken while other work loads the machine are not representative.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgeinspect.evaluation.machine import cpu_name, gpu_name, logical_cpus, slug
from edgeinspect.core.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
KEYS = ("daemon_overhead_ms_p50", "fps_1cam", "fps_4cam", "latency_ms_p50", "latency_ms_p99", "rss_mb_start",
        "rss_mb_end")












# --------------------------------------------------------------------------- measurements


def direct_latency(bundle: Path, backend: str, precision: str, threads: int | None, images: list[np.ndarray],
                   frames: int, warmup: int) -> dict[str, Any]:
    """The bundle pipeline on the daemon's preprocessed frames, batch 1, in this process."""
    import torch

    from edgeinspect.runtime.detector import bundle_pipeline
    from edgeinspect.runtime.daemon.stats import percentiles
    from edgeinspect.runtime.daemon.worker import images_to_batch

    if threads:
        torch.set_num_threads(threads)
    pipe = bundle_pipeline(bundle, backend, precision=precision, intra_op_threads=threads, max_batch=1)
    times = []
    with torch.inference_mode():
        for i in range(warmup + frames):
            t0 = time.perf_counter()
            pipe(images_to_batch([images[i % len(images)]]))
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    del pipe
    gc.collect()
    return {"frames": frames, "latency_ms": percentiles(times)}


def stream(endpoint: str, frames, cameras: int, count: int | None = None,
           duration_s: float | None = None) -> dict[str, Any]:
    from edgeinspect.runtime.daemon.camera import CameraStreamer, StreamOptions

    opts = StreamOptions(cameras=cameras, fps=0.0, count=count, duration_s=duration_s, timeout_ms=120_000)
    return CameraStreamer(endpoint, frames, opts).run()


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[float] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        from edgeinspect.runtime.daemon.stats import rss_mb

        while not self._stop_event.is_set():
            try:
                self.samples.append(round(rss_mb(self.pid), 1))
            except OSError:
                return
            self._stop_event.wait(self.every_s)

    def stop(self) -> list[float]:
        self._stop_event.set()
        self.join()
        return self.samples


def bench_backend(args: argparse.Namespace, backend: str, source_frames, images: list[np.ndarray]) -> dict[str, Any]:
    from edgeinspect.runtime.daemon.client import InspectionClient
    from edgeinspect.runtime.daemon.launch import start_daemon
    from edgeinspect.runtime.daemon.stats import rss_mb

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)
    log(f"[{backend}] direct loop: {args.frames} frames")
    direct = direct_latency(args.bundle, backend, args.precision, args.threads, images, args.frames, args.warmup)
    serve_args = ["--backend", backend, "--precision", args.precision, "--log-level", "warning"]
    if args.threads:
        serve_args += ["--threads", str(args.threads)]
    if args.max_batch:
        serve_args += ["--max-batch", str(args.max_batch)]
    serve_args += ["--batch-deadline-ms", str(args.batch_deadline_ms), "--queue-per-camera", "4"]
    serve_args += list(args.serve_arg or [])
    log(f"[{backend}] starting the daemon: edgeinspect serve {' '.join(serve_args)}")
    daemon = start_daemon(args.bundle, *serve_args, timeout_s=600)
    try:
        stream(daemon.endpoint, source_frames, 1, count=args.warmup)
        log(f"[{backend}] 1 camera: {args.frames} frames")
        one = stream(daemon.endpoint, source_frames, 1, count=args.frames)
        per_camera = max(1, args.frames // 4)
        log(f"[{backend}] 4 cameras: {per_camera} frames each")
        four = stream(daemon.endpoint, source_frames, 4, count=per_camera)
        rss_start = rss_mb(daemon.pid)
        log(f"[{backend}] long run: 4 cameras for {args.long_run_s:g} s (RSS at start {rss_start:.1f} MiB)")
        sampler = RssSampler(daemon.pid)
        sampler.start()
        long = stream(daemon.endpoint, source_frames, 4, duration_s=args.long_run_s)
        samples = sampler.stop()
        rss_end = rss_mb(daemon.pid)
        with InspectionClient(daemon.endpoint, timeout_ms=30_000) as c:
            stats = c.stats().data
            health = c.health().data
    finally:
        exit_code = daemon.terminate(timeout=120)
    if exit_code != 0:
        raise RuntimeError(f"the daemon exited with code {exit_code}:\n{daemon.log()}")
    for name, run in (("1 camera", one), ("4 cameras", four), ("long run", long)):
        if run["errors"] or run["lost"] or not run["results"]:
            raise RuntimeError(f"[{backend}] {name}: errors {run['errors']}, lost {run['lost']}, "
                               f"results {run['results']}")
    overhead = one["latency_ms"]["p50"] - direct["latency_ms"]["p50"]
    log(f"[{backend}] fps 1 cam {one['fps']:.2f}, 4 cams {four['fps']:.2f}; p50 {one['latency_ms']['p50']:.2f} ms "
        f"(direct {direct['latency_ms']['p50']:.2f} ms, overhead {overhead:.2f} ms); RSS {rss_start:.1f} -> "
        f"{rss_end:.1f} MiB")
    return {
        "daemon_overhead_ms_p50": round(overhead, 3),
        "fps_1cam": one["fps"], "fps_4cam": four["fps"],
        "latency_ms_p50": one["latency_ms"]["p50"], "latency_ms_p99": one["latency_ms"]["p99"],
        "latency_4cam_ms_p50": four["latency_ms"]["p50"], "latency_4cam_ms_p99": four["latency_ms"]["p99"],
        "rss_mb_start": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
        "rss_mb_max": max(samples, default=round(rss_end, 1)),
        "rss_mb_samples": samples,
        "direct": direct,
        "runs": {"1cam": one, "4cam": four, "long": long},
        "daemon": {"health": health, "stats": stats, "exit_code": exit_code, "args": serve_args},
    }


# --------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Line daemon over loopback: {res['machine']['slug']}", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']['cpu']} ({res['machine']['logical_cpus']} logical CPUs)"
             + (f", GPU {res['machine']['gpu']}" if res['machine'].get("gpu") else "") + f"; {res['date']}", "",
             f"Bundle: `{res['settings']['bundle']}` ({res['settings']['method']}, preset {res['settings']['preset']}, "
             f"{res['settings']['image_size']} px), {res['settings']['source_frames']} source frames from "
             f"`{res['settings']['images']}` sent raw; threads {res['settings']['threads']}, precision "
             f"{res['settings']['precision']}.", "",
             "| backend | direct p50 ms | serve p50 ms (1 cam) | overhead p50 ms | p99 ms (1 cam) | fps 1 cam | "
             "fps 4 cams | p50 / p99 ms (4 cams) | RSS MiB start -> end (max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, b in res["backends"].items():
        lines.append(
            f"| {name} | {b['direct']['latency_ms']['p50']:.2f} | {b['latency_ms_p50']:.2f} | "
            f"{b['daemon_overhead_ms_p50']:.2f} | {b['latency_ms_p99']:.2f} | {b['fps_1cam']:.2f} | {b['fps_4cam']:.2f} | "
            f"{b['latency_4cam_ms_p50']:.2f} / {b['latency_4cam_ms_p99']:.2f} | {b['rss_mb_start']:.1f} -> "
            f"{b['rss_mb_end']:.1f} ({b['rss_mb_max']:.1f}) |")
    lines += ["", "Daemon-side medians per frame (ms, 4 cameras; model stages are per batch):", ""]
    for name, b in res["backends"].items():
        t = b["runs"]["4cam"]["daemon_timings_ms_p50"]
        mean_batch = b["daemon"]["stats"].get("mean_batch_size")
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items())
                     + f"; mean batch {mean_batch}")
    lines += ["", f"Long run: {res['settings']['long_run_s']:g} s with 4 cameras; frames/s "
              + ", ".join(f"{n} {b['runs']['long']['fps']:.2f}" for n, b in res["backends"].items()) + ".", "",
              "overhead = serve p50 (1 camera, client-observed send -> reply) - direct p50 (the same bundle pipeline "
              "in-process, batch 1). Numbers: " + f"`{res['json_file']}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle folder (edgeinspect export)")
    ap.add_argument("--backends", default="onnxruntime", help="comma-separated: onnxruntime,tensorrt")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--images", type=Path, default=REPO / "data" / "mtd_sample" / "test",
                    help="source frames (folder, image or video; default the embedded sample's test split)")
    ap.add_argument("--max-frames", type=int, default=64, help="source frames loaded (default 64)")
    ap.add_argument("--frames", type=int, default=200,
                    help="timed frames per run: direct, 1 camera, 4 cameras (split among them) (default 200)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed frames first (default 10)")
    ap.add_argument("--long-run-s", type=float, default=600.0, help="long run length, seconds (default 600)")
    ap.add_argument("--threads", type=int, help="onnxruntime/torch threads for the daemon and the direct loop")
    ap.add_argument("--max-batch", type=int, help="the daemon's --max-batch (default: the bundle's)")
    ap.add_argument("--batch-deadline-ms", type=float, default=2.0)
    ap.add_argument("--serve-arg", action="append", help="extra argument for edgeinspect serve (repeatable)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for serve_<machine>.md/.json")
    ap.add_argument("--machine", help="machine slug for the file names (default cpu<N> or the GPU name)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from edgeinspect.runtime.bundle_loading import load_bundle
    from edgeinspect.runtime.daemon.camera import load_frames
    from edgeinspect.runtime.daemon.frames import decode_frame
    from edgeinspect.runtime.daemon.protocol import parse_request

    bundle = load_bundle(args.bundle)
    size = int(bundle.manifest["image_size"])
    source = load_frames(args.images, "raw", args.max_frames)
    images = []  # exactly what the daemon hands the model
    for i, f in enumerate(source):
        req = parse_request(json.dumps({"type": "inspect", "camera_id": "bench", "frame_id": i,
                                        "encoding": f.encoding}).encode())
        images.append(decode_frame(req, f.data, size, 10**9))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results = {b: bench_backend(args, b, source, images) for b in backends}
    gpu = gpu_name() if "tensorrt" in backends else None
    machine = args.machine or (slug(gpu) if gpu else f"cpu{logical_cpus()}")
    out_json = args.results / f"serve_{machine}.json"
    out_md = args.results / f"serve_{machine}.md"
    first = results[backends[0]]
    res = {
        **{k: first[k] for k in KEYS},
        "latency_4cam_ms_p50": first["latency_4cam_ms_p50"], "latency_4cam_ms_p99": first["latency_4cam_ms_p99"],
        "primary_backend": backends[0],
        "backends": results,
        "machine": {"slug": machine, "cpu": cpu_name(), "logical_cpus": logical_cpus(), "gpu": gpu,
                    "python": platform.python_version()},
        "settings": {"bundle": str(args.bundle), "method": bundle.method, "preset": bundle.manifest.get("preset"),
                     "image_size": size, "images": str(args.images), "source_frames": len(source),
                     "frames": args.frames, "warmup": args.warmup, "long_run_s": args.long_run_s,
                     "threads": args.threads, "precision": args.precision, "max_batch": args.max_batch,
                     "batch_deadline_ms": args.batch_deadline_ms},
        "command": "python benchmarks/serve.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                       else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "json_file": out_json.name,
    }
    write_text_atomic(out_json, json.dumps(res, indent=2) + "\n")
    write_text_atomic(out_md, markdown(res))
    print(f"wrote {out_md} and {out_json}")
    print(json.dumps({k: res[k] for k in KEYS}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
