"""Where the line daemon's memory goes: RSS after each step of what it loads, in a fresh process.

    python benchmarks/serve_rss.py --bundle BUNDLE [--threads 2] [--ort-arena] [--max-batch N] [--image-rows N]

prints one JSON line: `steps` {step: VmRSS MiB} in load order (interpreter start; numpy, ZeroMQ, pydantic and
OpenCV, torch, onnxruntime imported one at a time; the daemon's modules; the bundle loaded and verified; one
onnxruntime session per network role the pipeline runs; the first frame; the daemon's warm-up batches; its
idle state after malloc_trim), `detail` {step: {rss, anon, file, shmem} MiB} from /proc/self/status, the roles
loaded and the heavy packages imported. benchmarks/serve.py runs it under the daemon's python (`--python`).

Only the standard library is imported before the first step, so each import is measured on its own; the
steps are the daemon's (`InspectionDaemon._load` and `_warmup`), one session at a time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

STATUS_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem", "VmHWM": "peak"}
HEAVY = ("diffusers", "timm", "transformers", "torchvision", "scipy", "sklearn", "matplotlib", "onnx", "peft")


def parse_status(text: str) -> dict[str, float]:
    """MiB of the memory lines of a /proc/<pid>/status text: rss (VmRSS), anon, file, shmem, peak (VmHWM)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            parts = value.split()
            if len(parts) == 2 and parts[1].lower() == "kb":
                out[STATUS_FIELDS[key]] = round(int(parts[0]) / 1024, 1)
    return out


def status_mb(pid: int | str = "self") -> dict[str, float]:
    return parse_status(Path(f"/proc/{pid}/status").read_text())


def breakdown(bundle: Path, threads: int | None, memory_arena: bool, max_batch: int | None,
              image_rows: int | None = 1) -> dict:
    detail: dict[str, dict[str, float]] = {"interpreter start": status_mb()}
    for step, modules in (("+ numpy", ("numpy",)), ("+ ZeroMQ", ("zmq",)), ("+ pydantic, PyYAML", ("pydantic", "yaml")),
                          ("+ OpenCV", ("cv2",)), ("+ torch", ("torch",)), ("+ onnxruntime", ("onnxruntime",)),
                          ("+ edgeinspect daemon and runtime modules", ("edgeinspect.runtime.daemon.server",))):
        for m in modules:
            importlib.import_module(m)
        detail[step] = status_mb()
    import numpy as np
    import torch

    from edgeinspect.config import BANK_REFERENCES
    from edgeinspect.core.networks import Networks
    from edgeinspect.runtime.backends import bundle_networks
    from edgeinspect.runtime.bundle_loading import load_bundle
    from edgeinspect.runtime.daemon.worker import choose_batch, release_free_memory, run_pipeline
    from edgeinspect.runtime.detector import assemble_pipeline, bundle_bank, pipeline_roles

    if threads:
        torch.set_num_threads(threads)
    b = load_bundle(bundle)
    detail["+ bundle loaded and verified"] = status_mb()
    cfg = b.config
    roles = pipeline_roles(b, cfg)
    bank = None
    if cfg.scoring.reference in BANK_REFERENCES:  # as the daemon: the bundle's bank, verified with it
        bank = bundle_bank(b)
        detail["+ normal-feature bank"] = status_mb()
    nets = {}
    for role in roles:
        nets.update(bundle_networks(b, "onnxruntime", intra_op_threads=threads, roles=(role,),
                                    memory_arena=memory_arena, image_rows=image_rows or None))
        detail[f"+ session {role}"] = status_mb()
    pipe = assemble_pipeline(cfg, Networks(nets, torch.device("cpu"), "onnxruntime"), b.context, bank=bank)
    size = pipe.frame_size or int(b.manifest["image_size"])  # frames as the daemon reads them (config.frame_size)
    blank = np.full((size, size, 3), 128, np.uint8)
    run_pipeline(pipe, [blank])
    detail["+ the first frame"] = status_mb()
    top = max_batch or cfg.inference.batch_size
    chosen, per_frame = choose_batch(pipe, size, top) if top > 1 else (1, {})
    detail[f"+ warm-up: batch sizes 1..{top} timed (the daemon's adaptive batch)"] = status_mb()
    release_free_memory()
    detail["after malloc_trim (the daemon's idle state)"] = status_mb()
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    return {"steps": {k: v["rss"] for k, v in detail.items()}, "detail": detail, "roles": list(roles),
            "chosen_batch": chosen, "batch_ms_per_frame": per_frame, "memory_arena": memory_arena, "image_rows": image_rows, "threads": threads, "python": sys.executable,
            "torch": torch.__version__, "other_heavy_packages_imported": heavy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--max-batch", type=int, help="largest warm-up batch (default: the bundle's batch size)")
    ap.add_argument("--ort-arena", action="store_true", help="onnxruntime's CPU arena and memory patterns on")
    ap.add_argument("--image-rows", type=int, default=1, help="the daemon's --image-rows (default 1; 0: whole batch)")
    args = ap.parse_args(argv)
    print(json.dumps(breakdown(args.bundle, args.threads, args.ort_arena, args.max_batch, args.image_rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
