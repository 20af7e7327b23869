"""The line daemon end to end over loopback: frames/s, latency and the daemon's own overhead for 1 and 4
cameras, memory idle and under a 10x overload with where it goes, backend by backend.

    python benchmarks/serve.py --bundle BUNDLE --threads 2 --frames 300 --overload-s 60 [--env .venv-serve]
    python benchmarks/serve.py --make-bundle runs/serve-check     # the benchmark's bundle (training env)

writes benchmarks/results/serve_<machine>.md and serve_<machine>.json (`--results` for another folder).
Per backend (`--backends onnxruntime,tensorrt`; default onnxruntime), the daemon (`edgeinspect serve`, a
child process on tcp://127.0.0.1, same --threads, under `--python` or `--env`'s python when given: the lean
serving environment of `make serve-env`) is fed by the camera simulator of `edgeinspect client` (raw frames,
closed loop: a camera sends its next frame when its previous one is answered):

* idle: rss_mb_idle is the daemon's resident memory (/proc/<pid>/statm) after its warm-up and `--warmup`
  frames, 2 s without requests;
* 1 camera, `--frames` frames (one in flight, so no queueing): fps_1cam, latency percentiles (client-observed,
  send -> reply) and the daemon's overhead per frame: client round trip - the reply's `compute` (the
  worker's decode, model and reply building for the frame's batch) - its `queue_wait` (receipt ->
  batch taken): transport, header checks, hand-over between the daemon's threads.
  daemon_overhead_ms_p50 / _p99 are these;
* 4 cameras, `--frames` frames in all: fps_4cam, latency, overhead (daemon_overhead_4cam_ms_p50 / _p99);
* overload: 4 cameras sending open loop at 10 x fps_4cam in all for `--overload-s` seconds (frames the
  daemon cannot take are dropped with a reply); the daemon's RSS every 0.5 s: rss_mb_overload_max and
  rss_mb_samples;
* rss_breakdown: benchmarks/serve_rss.py in a fresh process under the daemon's python, RSS (/proc status:
  VmRSS, RssAnon, RssFile) after each step of what the daemon loads (interpreter, each import, bundle, each
  session, first frame, warm-up batches, idle after malloc_trim), with onnxruntime's memory arena on and off;
  rss_breakdown_mb (top level) is the arena-off one, the daemon's setting.

The client runs on the same machine and takes CPU from the daemon: on a small CPU that is part of the
measured round trip (as it would be for a camera PC running both).

Machine slug (file names): `--machine`, else "cpu<N>" with N the logical CPUs this process may use, or
the GPU's name as a slug when the tensorrt backend ran. JSON top level: the first backend's KEYS; `backends`
has every backend's numbers, runs and daemon stats; plus machine, load, settings and the command.
Timings taken while other work loads the machine are not representative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgeinspect.evaluation.machine import cpu_name, gpu_name, logical_cpus, slug
from edgeinspect.core.atomic import write_text_atomic
from serve_rss import status_mb  # this script's folder (sys.path[0] when run as a script)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
KEYS = ("daemon_overhead_ms_p50", "daemon_overhead_ms_p99", "daemon_overhead_4cam_ms_p50",
        "daemon_overhead_4cam_ms_p99", "fps_1cam", "fps_4cam", "latency_ms_p50", "latency_ms_p99", "rss_mb_idle",
        "rss_mb_overload_max")
DAEMON_PACKAGES = ("torch", "onnxruntime", "numpy", "pyzmq", "opencv-python-headless", "onnx", "timm", "torchvision",
                   "diffusers")


# --------------------------------------------------------------------------- measurements


def stream(endpoint: str, frames, cameras: int, count: int | None = None, duration_s: float | None = None,
           fps: float = 0.0) -> dict[str, Any]:
    from edgeinspect.runtime.daemon.camera import CameraStreamer, StreamOptions

    opts = StreamOptions(cameras=cameras, fps=fps, count=count, duration_s=duration_s, timeout_ms=120_000)
    return CameraStreamer(endpoint, frames, opts).run()


def serve_python(python: str | None, env: Path | None) -> str:
    """The interpreter the daemon runs under: --python, else --env's bin/python (a virtual environment such as
    .venv-serve, made by `make serve-env`), else this one."""
    if python and env:
        raise ValueError("give --python or --env, not both")
    exe = Path(python) if python else (env / "bin" / "python" if env else Path(sys.executable))
    if not exe.is_file():
        raise ValueError(f"no python at {exe}" + (" (make serve-env creates .venv-serve)" if env else ""))
    return str(exe)


def daemon_packages(python: str) -> dict[str, str | None]:
    """Versions of the packages that weigh in the daemon's memory, in its environment (None: not installed)."""
    code = ("import importlib.metadata as m, json\n"
            "def v(n):\n    try:\n        return m.version(n)\n    except m.PackageNotFoundError:\n        return None\n"
            f"print(json.dumps({{n: v(n) for n in {list(DAEMON_PACKAGES)!r}}}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def breakdown_in_child(python: str, bundle: Path, threads: int | None, memory_arena: bool,
                       max_batch: int | None, image_rows: int = 1) -> dict[str, Any]:
    """benchmarks/serve_rss.py under the daemon's python: RSS after each step of what the daemon loads."""
    cmd = [python, str(Path(__file__).resolve().with_name("serve_rss.py")), "--bundle", str(bundle)]
    cmd += (["--threads", str(threads)] if threads else []) + (["--ort-arena"] if memory_arena else [])
    cmd += (["--max-batch", str(max_batch)] if max_batch else []) + ["--image-rows", str(image_rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def bench_backend(args: argparse.Namespace, backend: str, source_frames) -> dict[str, Any]:
    from edgeinspect.runtime.daemon.client import InspectionClient
    from edgeinspect.runtime.daemon.launch import start_daemon
    from edgeinspect.runtime.daemon.stats import rss_mb

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)
    serve_args = ["--backend", backend, "--precision", args.precision, "--log-level", "warning"]
    if args.threads:
        serve_args += ["--threads", str(args.threads)]
    if args.max_batch:
        serve_args += ["--max-batch", str(args.max_batch)]
    serve_args += ["--batch-deadline-ms", str(args.batch_deadline_ms), "--queue-per-camera", "4"]
    serve_args += ["--image-rows", str(args.image_rows)]
    serve_args += list(args.serve_arg or [])
    log(f"[{backend}] starting the daemon ({args.daemon_python}): edgeinspect serve {' '.join(serve_args)}")
    daemon = start_daemon(args.bundle, *serve_args, timeout_s=900, python=args.daemon_python)
    try:
        stream(daemon.endpoint, source_frames, 1, count=args.warmup)
        time.sleep(2.0)
        rss_idle = rss_mb(daemon.pid)
        idle_status = status_mb(daemon.pid)
        log(f"[{backend}] idle RSS {rss_idle:.1f} MiB; 1 camera: {args.frames} frames")
        one = stream(daemon.endpoint, source_frames, 1, count=args.frames)
        per_camera = max(1, args.frames // 4)
        log(f"[{backend}] 4 cameras: {per_camera} frames each")
        four = stream(daemon.endpoint, source_frames, 4, count=per_camera)
        rate = 10 * four["fps"] / 4
        log(f"[{backend}] overload: 4 cameras at {rate:.2f} frames/s each (10 x {four['fps']:.2f}) for "
            f"{args.overload_s:g} s")
        sampler = RssSampler(daemon.pid, every_s=0.5)
        sampler.start()
        overload = stream(daemon.endpoint, source_frames, 4, duration_s=args.overload_s, fps=rate)
        samples = sampler.stop()
        with InspectionClient(daemon.endpoint, timeout_ms=30_000) as c:
            stats = c.stats().data
            health = c.health().data
    finally:
        exit_code = daemon.terminate(timeout=120)
    if exit_code != 0:
        raise RuntimeError(f"the daemon exited with code {exit_code}:\n{daemon.log()}")
    for name, run in (("1 camera", one), ("4 cameras", four)):
        if run["errors"] or run["lost"] or not run["results"]:
            raise RuntimeError(f"[{backend}] {name}: errors {run['errors']}, lost {run['lost']}, "
                               f"results {run['results']}")
    log(f"[{backend}] fps 1 cam {one['fps']:.2f}, 4 cams {four['fps']:.2f}; overhead p50 {one['overhead_ms']['p50']} "
        f"p99 {one['overhead_ms']['p99']} ms (4 cams {four['overhead_ms']['p50']} / {four['overhead_ms']['p99']}); RSS "
        f"idle {rss_idle:.1f}, overload max {max(samples, default=0):.1f} MiB")
    log(f"[{backend}] RSS breakdown (fresh processes, arena off and on)")
    breakdown = {k: breakdown_in_child(args.daemon_python, args.bundle, args.threads, arena, args.max_batch,
                                       args.image_rows) for k, arena in (("arena_off", False), ("arena_on", True))} \
        if backend == "onnxruntime" and not args.no_breakdown else {}
    return {
        "daemon_overhead_ms_p50": one["overhead_ms"]["p50"], "daemon_overhead_ms_p99": one["overhead_ms"]["p99"],
        "daemon_overhead_4cam_ms_p50": four["overhead_ms"]["p50"],
        "daemon_overhead_4cam_ms_p99": four["overhead_ms"]["p99"],
        "fps_1cam": one["fps"], "fps_4cam": four["fps"],
        "latency_ms_p50": one["latency_ms"]["p50"], "latency_ms_p99": one["latency_ms"]["p99"],
        "latency_4cam_ms_p50": four["latency_ms"]["p50"], "latency_4cam_ms_p99": four["latency_ms"]["p99"],
        "rss_mb_idle": round(rss_idle, 1), "rss_mb_overload_max": max(samples, default=round(rss_idle, 1)),
        "rss_mb_samples": samples, "overload_fps_per_camera": round(rate, 3), "rss_breakdown": breakdown,
        "rss_mb_idle_status": idle_status,
        "runs": {"1cam": one, "4cam": four, "overload": overload},
        "daemon": {"health": health, "stats": stats, "exit_code": exit_code, "args": serve_args},
    }


def make_bundle(out: Path, data: Path) -> Path:
    """The bundle these reports serve: the edge DiAD preset trained 1 step per stage on `data` and exported to
    ONNX fp32 (weights do not matter for memory or overhead). Needs the training environment (.venv)."""
    from edgeinspect.config import build_config
    from edgeinspect.export.bundle import export_bundle
    from edgeinspect.training.diad import train_diad

    # The edge preset scores against the bank of normal features, built at the end of training: the
    # sample's normals hold fewer than the preset's 16384 positions at the coarsest level, so 4096 (as
    # configs/demo.yaml).
    cfg = build_config("diad", "edge", {"train": {"autoencoder_steps": 1, "unet_steps": 1, "guidance_steps": 1,
                                                  "data_root": str(data)}, "scoring": {"bank": {"size": 4096}}})
    ckpt = train_diad(cfg, out / "run", progress=False)
    return export_bundle(ckpt, out / "bundle", precision=("fp32",), overwrite=True)


# --------------------------------------------------------------------------- report


def _breakdown_table(b: dict[str, Any]) -> list[str]:
    off, on = b["arena_off"]["detail"], b["arena_on"]["steps"]
    lines = ["| step | RSS MiB (arena off: the daemon) | + MiB | anonymous / file-backed MiB | RSS MiB (arena on) |",
             "|---|---|---|---|---|"]
    prev = None
    for k, v in off.items():
        step = "" if prev is None else f"{v['rss'] - prev:+.1f}"
        lines.append(f"| {k} | {v['rss']:.1f} | {step} | {v.get('anon', float('nan')):.1f} / "
                     f"{v.get('file', float('nan')):.1f} | {on.get(k, float('nan')):.1f} |")
        prev = v["rss"]
    return lines


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Line daemon over loopback: {res['machine']['slug']}", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']['cpu']} ({res['machine']['logical_cpus']} logical CPUs)"
             + (f", GPU {res['machine']['gpu']}" if res['machine'].get("gpu") else "") + f"; {res['date']}. Load "
             f"average at start {res['machine']['loadavg_start']}, at end {res['machine']['loadavg_end']} (other work "
             "shares these cores: timings are disturbed).", "",
             f"Bundle: `{res['settings']['bundle']}` ({res['settings']['method']}, preset {res['settings']['preset']}, "
             f"{res['settings']['image_size']} px), {res['settings']['source_frames']} source frames from "
             f"`{res['settings']['images']}` sent raw; threads {res['settings']['threads']}, precision "
             f"{res['settings']['precision']}, batches of at most {res['settings']['max_batch'] or 'the bundle default'}, "
             f"--image-rows {res['settings'].get('image_rows')}."
             + (f" {res['settings']['note']}" if res["settings"].get("note") else ""), "",
             f"Daemon environment: `{res['settings'].get('daemon_python')}` with "
             + ", ".join(f"{k} {v}" for k, v in (res["settings"].get("daemon_packages") or {}).items() if v)
             + "; not installed: " + (", ".join(k for k, v in (res["settings"].get("daemon_packages") or {}).items()
                                               if not v) or "none") + ".", "",
             "| backend | overhead p50 / p99 ms (1 cam) | overhead p50 / p99 ms (4 cams) | "
             "serve p50 / p99 ms (1 cam) | "
             "fps 1 cam | fps 4 cams | p50 / p99 ms (4 cams) | RSS MiB idle | RSS MiB max, 10x overload |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, b in res["backends"].items():
        lines.append(
            f"| {name} | {b['daemon_overhead_ms_p50']} / {b['daemon_overhead_ms_p99']} | "
            f"{b['daemon_overhead_4cam_ms_p50']} / {b['daemon_overhead_4cam_ms_p99']} | {b['latency_ms_p50']:.2f} / "
            f"{b['latency_ms_p99']:.2f} | {b['fps_1cam']:.2f} | {b['fps_4cam']:.2f} | {b['latency_4cam_ms_p50']:.2f} / "
            f"{b['latency_4cam_ms_p99']:.2f} | {b['rss_mb_idle']:.1f} | {b['rss_mb_overload_max']:.1f} |")
    lines += ["", "overhead = client round trip - the reply's `compute` (the daemon's decode, model and reply "
              "building for the frame's batch) - its `queue_wait` (receipt -> batch taken), per frame; 1 camera has "
              "one frame in flight, so nothing queues.", "",
              "Daemon-side medians per frame (ms, 4 cameras; model stages are per batch):", ""]
    for name, b in res["backends"].items():
        t = b["runs"]["4cam"]["daemon_timings_ms_p50"]
        s = b["daemon"]["stats"]
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items())
                     + f"; mean batch {s.get('mean_batch_size')}; batch sizes timed at warm-up (ms per frame) "
                     f"{b['daemon']['health'].get('batch_ms_per_frame')}, batches of at most "
                     f"{b['daemon']['health'].get('max_batch')}")
    for name, b in res["backends"].items():
        o = b["runs"]["overload"]
        lines += ["", f"Overload ({name}): 4 cameras at {b['overload_fps_per_camera']} frames/s each for "
                  f"{res['settings']['overload_s']:g} s: {o['results']} results ({o['fps']} /s), errors {o['errors']}; "
                  f"RSS every 0.5 s (MiB): {b['rss_mb_samples']}.", "",
                  f"The daemon idle ({name}, /proc/<pid>/status, MiB): {b.get('rss_mb_idle_status')}."]
        if b.get("rss_breakdown"):
            off, on = b["rss_breakdown"]["arena_off"], b["rss_breakdown"]["arena_on"]
            lines += ["", f"Where the memory goes ({name}; benchmarks/serve_rss.py, one fresh process per column under "
                      f"the daemon's python, --threads {res['settings']['threads']}; sessions for the roles "
                      f"{off['roles']}; other heavy packages imported: {off['other_heavy_packages_imported'] or 'none'}; "
                      "anonymous / file-backed from /proc/self/status RssAnon / RssFile):", ""]
            lines += _breakdown_table(b["rss_breakdown"])
            lines += ["", f"Model ms per frame at warm-up, by batch size: arena off {off.get('batch_ms_per_frame')}, "
                      f"arena on {on.get('batch_ms_per_frame')} (onnxruntime's CPU arena and memory patterns: "
                      "`edgeinspect serve --ort-arena`; off by default)."]
    lines += ["", f"Numbers: `{res['json_file']}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle folder (edgeinspect export)")
    ap.add_argument("--backends", default="onnxruntime", help="comma-separated: onnxruntime,tensorrt")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--images", type=Path, default=REPO / "data" / "mtd_sample" / "test",
                    help="source frames (folder, image or video; default the embedded sample's test split)")
    ap.add_argument("--max-frames", type=int, default=64, help="source frames loaded (default 64)")
    ap.add_argument("--frames", type=int, default=300,
                    help="timed frames: 1 camera, and 4 cameras in all (default 300)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed frames first (default 10)")
    ap.add_argument("--overload-s", type=float, default=60.0, help="10x overload run, seconds (default 60)")
    ap.add_argument("--threads", type=int, help="onnxruntime/torch threads of the daemon")
    ap.add_argument("--max-batch", type=int, help="the daemon's --max-batch (default: the bundle's)")
    ap.add_argument("--batch-deadline-ms", type=float, default=2.0)
    ap.add_argument("--image-rows", type=int, default=1,
                    help="the daemon's --image-rows: frames per call of its full-resolution networks (default 1)")
    ap.add_argument("--serve-arg", action="append", help="extra argument for edgeinspect serve (repeatable)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for serve_<machine>.md/.json")
    ap.add_argument("--machine", help="machine slug for the file names (default cpu<N> or the GPU name)")
    ap.add_argument("--note", help="a sentence for the report about the bundle or the run (how it was made)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--make-bundle", type=Path, metavar="DIR",
                    help="only build the benchmark's bundle into DIR/bundle (edge DiAD, 1 training step per stage, "
                         "ONNX fp32, from --images' dataset) and exit; --bundle is then not needed")
    ap.add_argument("--python", help="run the daemon (and the RSS breakdown) under this python, with edgeinspect "
                                     "installed (default: this one)")
    ap.add_argument("--env", type=Path, help="run the daemon under this virtual environment's python (e.g. "
                                              ".venv-serve from `make serve-env`, the lean serving environment)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the RSS breakdown (two fresh processes)")
    args = ap.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.make_bundle:
        print(make_bundle(args.make_bundle, args.images.parent))
        return 0
    if args.bundle is None:
        ap.error("--bundle is required (or --make-bundle DIR)")
    try:
        args.daemon_python = serve_python(args.python, args.env)
    except ValueError as e:
        ap.error(str(e))

    from edgeinspect.runtime.bundle_loading import load_bundle
    from edgeinspect.runtime.daemon.camera import load_frames

    load_start = [round(v, 2) for v in os.getloadavg()]
    bundle = load_bundle(args.bundle)
    size = int(bundle.manifest["image_size"])
    source = load_frames(args.images, "raw", args.max_frames)
    results = {b: bench_backend(args, b, source) for b in backends}
    gpu = gpu_name() if "tensorrt" in backends else None
    machine = args.machine or (slug(gpu) if gpu else f"cpu{logical_cpus()}")
    out_json = args.results / f"serve_{machine}.json"
    out_md = args.results / f"serve_{machine}.md"
    first = results[backends[0]]
    res = {
        **{k: first[k] for k in KEYS},
        "latency_4cam_ms_p50": first["latency_4cam_ms_p50"], "latency_4cam_ms_p99": first["latency_4cam_ms_p99"],
        "rss_mb_samples": first["rss_mb_samples"],
        "rss_breakdown_mb": (first["rss_breakdown"] or {}).get("arena_off", {}).get("steps", {}),
        "primary_backend": backends[0],
        "backends": results,
        "machine": {"slug": machine, "cpu": cpu_name(), "logical_cpus": logical_cpus(), "gpu": gpu,
                    "python": platform.python_version(), "loadavg_start": load_start,
                    "loadavg_end": [round(v, 2) for v in os.getloadavg()]},
        "settings": {"bundle": str(args.bundle), "method": bundle.method, "preset": bundle.manifest.get("preset"),
                     "image_size": size, "images": str(args.images), "source_frames": len(source),
                     "frames": args.frames, "warmup": args.warmup, "overload_s": args.overload_s,
                     "threads": args.threads, "precision": args.precision, "max_batch": args.max_batch,
                     "image_rows": args.image_rows,
                     "batch_deadline_ms": args.batch_deadline_ms, "note": args.note,
                     "daemon_python": args.daemon_python, "daemon_packages": daemon_packages(args.daemon_python)},
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
