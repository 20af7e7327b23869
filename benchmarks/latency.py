"""Per-frame latency of DiAD and GLAD on every backend and precision this machine has, by stage.

    python benchmarks/latency.py --diad runs/diad_mtd_edge --glad runs/glad_mtd_edge --threads 2

writes benchmarks/results/latency_<machine>.md and latency_<machine>.json (`--results` for another
folder). Either run is optional. `--diad-set` / `--glad-set KEY=VALUE` (repeatable) change a run's
inference or scoring settings for every backend alike, e.g. `--glad-set inference.draws=2`.
What it does, per method:

* builds the torch pipeline from the run folder (torch eager) and exports the run to a bundle in a cache
  folder (`--cache`, default <tmp>/edgeinspect-latency; reused while the run's weights are unchanged,
  re-exported when the feature extractor has random weights, so torch and the bundle share it);
* backends: torch eager; onnxruntime fp32; onnxruntime fp16 (with `--fp16`, or when the cached bundle
  has the fp16 variant); on a machine with a GPU also torch CUDA, onnxruntime CUDA (onnxruntime-gpu) and
  native TensorRT (tensorrt + a GPU; engines built into the cached bundle's engines/ folder);
* `--backends` restricts the timing to those names; a GPU backend that cannot be built or fails its
  warm-up is left out and its error recorded (backend_errors), the others still run;
* the same frames for every backend (`--frames` folder, else the run's data folder test split, else
  seeded noise), batch 1, `--warmup` untimed frames per backend, then `--repeats` timed frames per
  backend interleaved (frame i on every backend, then frame i+1...), so load drift hits all alike;
  median, p10 and p90 of the whole frame and of each stage (the pipelines' own stage timers);
* FLOPs per frame: torch.utils.flop_counter.FlopCounterMode over the torch pipeline on each frame
  (convolutions, matmuls incl. the UNet's attention and GLAD's similarity search, 2 FLOPs per
  multiply-add; elementwise ops, norms and the DDIM arithmetic are not counted), averaged over the frames
  (GLAD's ADP checks stop when a frame fires, so its cost depends on the frame);
* measured peak: the best GFLOP/s of a `--peak-size`^3 fp32 torch matmul on the same thread count; the
  fraction of it each backend reaches is gflop_per_frame / seconds_per_frame / peak.

Machine slug (file names): `--machine`, else "cpu<N>" with N the logical CPUs this process may use
(os.sched_getaffinity), or the GPU's name as a slug when a CUDA GPU backend ran.

JSON, per method (methods.<diad|glad>): torch_ms, ort_ms (onnxruntime fp32, medians), ort_vs_torch_speedup,
stage_ms (backend -> stage -> median ms), gflop_per_frame, peak_fraction (onnxruntime fp32),
peak_fraction_by_backend, backends (backend -> ms/stage median, p10, p90, GFLOP/s, fps), backend_errors,
parity (max |score difference| to torch, and to onnxruntime fp32 on the CPU, absolute and relative to its
largest |score|, on the timed frames); top level: machine, measured_peak, settings, command.

Timings taken while other work loads the machine are not representative: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeinspect.config import frame_size
from edgeinspect.core.atomic import write_text_atomic
from edgeinspect.evaluation.machine import cpu_name, gpu_name, logical_cpus, slug

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
ORT_CPU = "onnxruntime_fp32"  # the reference backend: onnxruntime fp32 on the CPU


# --------------------------------------------------------------------------- machine








def measure_peak_gflops(threads: int, size: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Best GFLOP/s of an fp32 (size x size) @ (size x size) torch matmul on `threads` threads."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g)
    b = torch.randn(size, size, generator=g)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2 * size**3 / best / 1e9, "matmul_size": size, "threads": threads, "repeats": repeats,
            "dtype": "float32", "how": f"best of {repeats} torch.mm of two {size}x{size} fp32 matrices "
                                      f"on {threads} thread(s) (measured peak, not the datasheet's)"}


# --------------------------------------------------------------------------- statistics


def spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90)),
            "mean": float(a.mean()), "n": int(a.size)}


# --------------------------------------------------------------------------- inputs


def load_frames(cfg: Any, frames_dir: Path | None, n: int) -> tuple[torch.Tensor, str]:
    from edgeinspect.data.mvtec import IMAGE_SUFFIXES, image_to_tensor, read_image, resize_image

    # read at the largest size a pipeline takes (the bank's view: config.frame_size); each pipeline gets them
    # area-downscaled to its own frame size outside the timed calls (`frames_for`)
    size = frame_size(cfg.model.image_size, cfg.scoring, "bank")
    folder = frames_dir
    if folder is None and cfg.train.data_root is not None and (Path(cfg.train.data_root) / "test").is_dir():
        folder = Path(cfg.train.data_root) / "test"
    if folder is not None:
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and "ground_truth" not in p.parts)
        if not paths:
            raise SystemExit(f"latency.py: no images under {folder}")
        # spread over the folder (normal and defective frames: GLAD's cost depends on the frame)
        idx = np.unique(np.linspace(0, len(paths) - 1, min(n, len(paths))).round().astype(int))
        frames = torch.stack([image_to_tensor(resize_image(read_image(paths[i]), size)) for i in idx])
        return frames, f"{len(idx)} images from {folder}"
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, f"{n} frames of seeded uniform noise"


# --------------------------------------------------------------------------- pipelines


def torch_side(method: str, run: Path, device: str, overrides: dict | None = None) -> tuple[Any, Any, Any]:
    """(cfg, torch pipeline, feature extractor) from a run folder; `overrides`: inference/scoring settings."""
    if method == "diad":
        from edgeinspect.runtime.run_detector import model_pipeline, run_bank
        from edgeinspect.runtime.torch_backend import load_diad
        from edgeinspect.models.features import build_features

        cfg, model = load_diad(run, overrides)
        torch.manual_seed(0)  # a random extractor (tiny preset) is then the same every time
        features = build_features(cfg)
        return cfg, model_pipeline(cfg, model, features, device=device, bank=run_bank(run, cfg)), features
    from edgeinspect.models.features import build_features
    from edgeinspect.runtime.run_detector import model_pipeline, run_bank
    from edgeinspect.runtime.torch_backend import load_glad

    cfg, model, extra = load_glad(run, overrides)
    torch.manual_seed(0)
    features = build_features(cfg)
    pipe = model_pipeline(cfg, model, features, device=device, threshold=extra.get("adp_threshold"),
                         category=cfg.category, bank=run_bank(run, cfg))
    return cfg, pipe, features


def ensure_bundle(method: str, run: Path, cfg: Any, features: Any, cache: Path, fp16: bool,
                  threads: int) -> Path:
    """A bundle of the run in the cache, exported when missing, stale (other weights), without fp16 when
    asked for, or when the extractor is random (its weights exist only in this process)."""
    from edgeinspect.export.bundle import export_bundle
    from edgeinspect.runtime.bundle_loading import BundleError, load_bundle, sha256_file
    from edgeinspect.core.runs import resolve_checkpoint

    ckpt = resolve_checkpoint(run)
    weights = sha256_file(ckpt / "model.safetensors")
    out = cache / f"{method}-{slug(run.resolve().name)}-{weights[:12]}"
    reuse = cfg.features.weights is not None and out.is_dir()
    if reuse:
        try:
            b = load_bundle(out)
            reuse = b.manifest["source"].get("weights_sha256") == weights and (not fp16 or "fp16" in b.precisions)
        except BundleError:
            reuse = False
    if not reuse:
        precision = ("fp32", "fp16") if fp16 else ("fp32",)
        print(f"[{method}] exporting {run} -> {out} ({', '.join(precision)})", flush=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
            export_bundle(run, out, precision, features=features, overwrite=True, threads=threads)
    return out


def tensorrt_pipeline(bundle: Any, precision: str) -> Any:
    """The TensorRT pipeline of a bundle at batch 1; its engines are built into <bundle>/engines when missing
    (benchmarks/gpu_check.py builds them beforehand through this same call, so the profiles match)."""
    from edgeinspect.runtime.detector import bundle_pipeline

    return bundle_pipeline(bundle, "tensorrt", precision=precision, max_batch=1, verdict=False)


def torch_backend_name(device: str) -> str:
    return f"torch{'_cuda' if device.startswith('cuda') else ''}"


def backends_for(method: str, bundle_dir: Path, torch_pipe: Any, threads: int, device: str,
                 overrides: dict | None = None, only: set[str] | None = None
                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """backend name -> pipeline, for every backend and precision available here (`only`: those of these
    names), and GPU backend name -> why it could not be built (the other backends still run)."""
    from edgeinspect.runtime.bundle_loading import load_bundle
    from edgeinspect.runtime.detector import bundle_pipeline
    from edgeinspect.runtime.tensorrt_engines import engine_support_problems
    from edgeinspect.runtime.ort_backend import CUDA, available_providers

    def wanted(name: str) -> bool:
        return only is None or name in only

    bundle = load_bundle(bundle_dir, overrides=overrides)
    out: dict[str, Any] = {torch_backend_name(device): torch_pipe}
    for precision in bundle.precisions:
        if wanted(f"onnxruntime_{precision}"):
            out[f"onnxruntime_{precision}"] = bundle_pipeline(bundle, "onnxruntime", precision=precision,
                                                              intra_op_threads=threads, verdict=False)
    gpu: dict[str, Any] = {}
    if torch.cuda.is_available() and CUDA in available_providers():
        for precision in bundle.precisions:
            gpu[f"onnxruntime_cuda_{precision}"] = partial(bundle_pipeline, bundle, "onnxruntime", precision=precision,
                                                           providers=["cuda"], verdict=False)
    if not engine_support_problems():
        for precision in bundle.precisions:
            gpu[f"tensorrt_{precision}"] = partial(tensorrt_pipeline, bundle, precision)
    failed: dict[str, str] = {}
    for name, make in gpu.items():
        if wanted(name):
            try:
                out[name] = make()
            except Exception as e:  # e.g. CUDA libraries missing, an engine that does not build: report, go on
                failed[name] = f"{type(e).__name__}: {e}"
                print(f"[{method}] {name} unavailable: {failed[name]}", flush=True)
    return out, failed


# --------------------------------------------------------------------------- measuring


def count_gflop_per_frame(pipe: Any, frames: torch.Tensor) -> tuple[float, dict[str, float]]:
    """Mean GFLOP per frame of the torch pipeline over `frames` (batch 1), and GFLOP per frame by op."""
    from torch.utils.flop_counter import FlopCounterMode

    totals, by_op = [], {}
    for i in range(len(frames)):
        with FlopCounterMode(display=False) as fc:
            pipe(frames[i:i + 1])
        totals.append(fc.get_total_flops())
        for op, v in fc.get_flop_counts().get("Global", {}).items():
            by_op[str(op)] = by_op.get(str(op), 0.0) + v
    n = len(frames)
    return float(np.mean(totals)) / 1e9, {k: v / n / 1e9 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}


def _sync(name: str) -> None:
    if torch.cuda.is_available() and ("cuda" in name or "tensorrt" in name):
        torch.cuda.synchronize()


def frames_for(pipe: Any, frames: torch.Tensor) -> torch.Tensor:
    """`frames` at the size `pipe` reads frames at (area downscale; as they are when it has none)."""
    size = getattr(pipe, "frame_size", None)
    if size is None or frames.shape[-1] == size:
        return frames
    return torch.nn.functional.interpolate(frames, size=(size, size), mode="area")


def time_backends(pipes: dict[str, Any], frames: torch.Tensor, warmup: int, repeats: int,
                  required: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """Interleaved batch-1 timing: per backend the whole-frame and per-stage spread, and the scores of
    each frame (for the parity check). A backend other than the `required` ones that fails in its
    warm-up is dropped and its error returned (third value)."""
    n = len(frames)
    pipes = dict(pipes)
    own = {name: frames_for(pipe, frames) for name, pipe in pipes.items()}
    failed: dict[str, str] = {}
    scores: dict[str, torch.Tensor] = {b: torch.full((n,), float("nan")) for b in pipes}
    for name, pipe in list(pipes.items()):
        try:
            for i in range(warmup):
                r = pipe(own[name][i % n:i % n + 1])
                scores[name][i % n] = float(r.scores[0])
        except Exception as e:
            if name in required:
                raise
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"warm-up of {name} failed, dropped: {failed[name]}", flush=True)
            del pipes[name], scores[name]
    totals: dict[str, list[float]] = {b: [] for b in pipes}
    stages: dict[str, dict[str, list[float]]] = {b: {} for b in pipes}
    for i in range(repeats):
        for name, pipe in pipes.items():
            x = own[name][i % n:i % n + 1]
            _sync(name)
            t0 = time.perf_counter()
            r = pipe(x)
            _sync(name)
            totals[name].append((time.perf_counter() - t0) * 1e3)
            for s, ms in r.timings_ms.items():
                stages[name].setdefault(s, []).append(ms)
            scores[name][i % n] = float(r.scores[0])
    out = {b: {"ms": spread(totals[b]), "stage_ms": {s: spread(v) for s, v in stages[b].items()}} for b in pipes}
    return out, scores, failed


def max_score_diffs(scores: dict[str, torch.Tensor], ref_name: str) -> tuple[dict[str, float | None],
                                                                            dict[str, float | None]]:
    """Per backend, the largest |score - reference score| over the frames both scored, and the same divided
    by the reference's largest |score| (None where no frame was scored by both)."""
    ref = scores[ref_name]
    absolute: dict[str, float | None] = {}
    relative: dict[str, float | None] = {}
    for name, s in scores.items():
        if name == ref_name:
            continue
        seen = ~torch.isnan(ref) & ~torch.isnan(s)
        d = float((s[seen] - ref[seen]).abs().max()) if seen.any() else None
        scale = float(ref[seen].abs().max()) if seen.any() else 0.0
        absolute[name] = d
        relative[name] = d / scale if d is not None and scale > 0 else None
    return absolute, relative


def bench_method(method: str, run: Path, args: argparse.Namespace, peak: dict[str, Any]) -> dict[str, Any]:
    from edgeinspect.config import parse_overrides

    sets = getattr(args, f"{method}_set")
    overrides = parse_overrides(sets)
    cfg, torch_pipe, features = torch_side(method, run, args.device, overrides)
    frames, frames_source = load_frames(cfg, args.frames, args.num_frames)
    bundle_dir = ensure_bundle(method, run, cfg, features, args.cache, args.fp16, args.threads)
    pipes, backend_errors = backends_for(method, bundle_dir, torch_pipe, args.threads, args.device, overrides,
                                         args.backends)
    print(f"[{method}] backends: {', '.join(pipes)}; counting FLOPs", flush=True)
    gflop, by_op = count_gflop_per_frame(torch_pipe, frames_for(torch_pipe, frames))
    print(f"[{method}] {gflop:.3f} GFLOP/frame; timing {args.repeats} frames per backend", flush=True)
    torch_name = torch_backend_name(args.device)
    timed, scores, warmup_errors = time_backends(pipes, frames, args.warmup, args.repeats,
                                                 required=(torch_name, ORT_CPU))
    backend_errors |= warmup_errors
    backends = {}
    for name, t in timed.items():
        sec = t["ms"]["median"] / 1e3
        on_gpu = runs_on_gpu(name)
        backends[name] = {**t, "runs_on": "gpu" if on_gpu else "cpu", "gflops_achieved": gflop / sec,
                          # the measured peak is the CPU's: no fraction of it for a GPU backend
                          "peak_fraction": None if on_gpu else gflop / sec / peak["gflops"],
                          "vs_torch_speedup": timed[torch_name]["ms"]["median"] / t["ms"]["median"],
                          "fps": 1e3 / t["ms"]["median"]}
    levers = {}
    if args.levers is not None and method in args.levers:
        levers = bench_levers(method, run, args.levers[method], args, overrides, frames, bundle_dir, cfg)
    vs_torch, _ = max_score_diffs(scores, torch_name)
    vs_ort_cpu, vs_ort_cpu_rel = max_score_diffs(scores, ORT_CPU)
    torch_ms = timed[torch_name]["ms"]["median"]
    ort_ms = timed[ORT_CPU]["ms"]["median"]
    settings = ({"t_start": cfg.inference.t_start, "steps": cfg.inference.steps} if method == "diad" else
                {k: getattr(torch_pipe.inference, k) for k in ("t0", "steps", "min_step", "top_k", "adp_top_k",
                                                                "check_every", "draws")}
                | {"adp_threshold": None if not np.isfinite(torch_pipe.threshold) else torch_pipe.threshold})
    return {
        "run": str(run), "overrides": sets, "bundle": str(bundle_dir), "preset": cfg.model.preset,
        "image_size": cfg.model.image_size,
        "feature_size": cfg.scoring.feature_size or cfg.model.image_size, "settings": settings,
        "frames": frames_source,
        "torch_ms": torch_ms, "ort_ms": ort_ms, "ort_vs_torch_speedup": torch_ms / ort_ms,
        "stage_ms": {b: {s: v["median"] for s, v in t["stage_ms"].items()} for b, t in timed.items()},
        "gflop_per_frame": gflop, "gflop_by_op": by_op,
        "peak_fraction": backends[ORT_CPU]["peak_fraction"],
        "peak_fraction_by_backend": {b: v["peak_fraction"] for b, v in backends.items()},
        "backends": backends, "backend_errors": backend_errors,
        "parity": {"max_abs_score_diff_vs_torch": vs_torch,
                   # onnxruntime fp32 on the CPU: the reference every GPU backend of the bundle is checked against
                   "max_abs_score_diff_vs_onnxruntime_cpu": vs_ort_cpu,
                   "max_rel_score_diff_vs_onnxruntime_cpu": vs_ort_cpu_rel},
        **levers,
    }


# --------------------------------------------------------------------------- speed levers


def read_levers(path: Path) -> dict[str, Any]:
    """The levers file (YAML): per method a `baseline` (today's pipeline), the new `default` and named
    `levers`, each {backend: torch | onnxruntime_<precision>, set: {KEY: VALUE}} (set: inference/scoring
    overrides on top of the run's config; the default usually has none: it is what the run ships with;
    accuracy: false skips a lever's AUROC under --accuracy, for one whose scores cannot differ)."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text()) or {}
    for method, m in spec.items():
        if method not in ("diad", "glad"):
            raise SystemExit(f"{path}: unknown method {method!r} (diad, glad)")
        for name, entry in {"baseline": m.get("baseline"), "default": m.get("default"),
                            **(m.get("levers") or {})}.items():
            if not isinstance(entry, dict) or "backend" not in entry:
                raise SystemExit(f"{path}: {method}.{name} needs a backend (torch or onnxruntime_<precision>)")
            if entry["backend"] != "torch" and not str(entry["backend"]).startswith("onnxruntime_"):
                raise SystemExit(f"{path}: {method}.{name}: backend {entry['backend']!r} is not torch or "
                                 "onnxruntime_<precision>")
    return spec


def lever_entries(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {backend, set} with the baseline and the default first."""
    return {"baseline": spec["baseline"], "default": spec["default"], **(spec.get("levers") or {})}


def _overrides(base: dict | None, sets: dict[str, Any] | None) -> dict:
    from edgeinspect.config import merge_config, parse_overrides

    return merge_config(base or {}, parse_overrides([f"{k}={v}" for k, v in (sets or {}).items()]))


def ensure_int8(bundle_dir: Path, data_root: Path | None, images: int = 32) -> None:
    """The bundle's int8 (Q/DQ) graphs, calibrated on `images` training normals when it has none yet."""
    from edgeinspect.calibration.qdq import quantize_bundle, spread_indices
    from edgeinspect.data.mvtec import IMAGE_SUFFIXES
    from edgeinspect.runtime.bundle_loading import load_bundle

    if "int8" in load_bundle(bundle_dir).precisions:
        return
    if data_root is None:
        raise SystemExit("an int8 lever needs training normals to calibrate on: the run has no data folder")
    normals = sorted(p for p in (Path(data_root) / "train" / "good").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    print(f"[int8] calibrating Q/DQ graphs of {bundle_dir} on {images} training normals", flush=True)
    quantize_bundle(bundle_dir, [normals[i] for i in spread_indices(len(normals), images)])


def lever_pipeline(method: str, run: Path, bundle_dir: Path, entry: dict[str, Any], base: dict | None,
                   args: argparse.Namespace, backend: str | None = None) -> Any:
    """The pipeline of one lever entry (on `backend` instead of its own when given)."""
    from edgeinspect.runtime.detector import bundle_pipeline

    backend = backend or entry["backend"]
    over = _overrides(base, entry.get("set"))
    if backend == "torch":
        return torch_side(method, run, args.device, over)[1]
    return bundle_pipeline(bundle_dir, "onnxruntime", precision=backend.removeprefix("onnxruntime_"),
                           overrides=over, intra_op_threads=args.threads, verdict=False)


def lever_accuracy(pipe: Any, data_root: Path, size: int, batch: int, every: int) -> dict[str, Any]:
    """Image and pixel AUROC of a pipeline over every `every`-th image of the test split (frames at the
    pipeline's frame size, masks at the model image `size`)."""
    from edgeinspect.data.mvtec import MVTecFolder, uint8_to_model
    from edgeinspect.evaluation.metrics import auroc

    split = MVTecFolder(data_root, "test", pipe.frame_size or size, mask_size=size)
    idx = list(range(0, len(split), every))
    scores, maps, masks, labels = [], [], [], []
    for s in range(0, len(idx), batch):
        ims, ms = zip(*(split.load(i) for i in idx[s:s + batch]))
        r = pipe(uint8_to_model(torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2)))
        scores.append(r.scores.double().numpy())
        maps.append(r.maps.float().numpy())
        masks.append(np.stack(ms))
    labels = np.array([split.samples[i].label for i in idx])
    masks_a, maps_a = np.concatenate(masks), np.concatenate(maps)
    return {"image_auroc": round(auroc(labels, np.concatenate(scores)), 4),
            "pixel_auroc": round(auroc(masks_a.reshape(-1), maps_a.reshape(-1)), 4), "images": len(idx)}


def bench_levers(method: str, run: Path, spec: dict[str, Any], args: argparse.Namespace, base: dict | None,
                 frames: torch.Tensor, bundle_dir: Path, cfg: Any) -> dict[str, Any]:
    """Each lever of the levers file timed in one interleaved loop (batch 1) with the baseline and the default;
    speed-ups against the baseline; with --accuracy, image/pixel AUROC of each on the test split (scores are
    backend-independent within the parity measured above, so a torch entry is scored on onnxruntime fp32 with
    its settings, which is much faster; an int8 entry on its int8 graphs)."""
    entries = lever_entries(spec)
    if any(e["backend"] == "onnxruntime_int8" for e in entries.values()):
        ensure_int8(bundle_dir, cfg.train.data_root)
    pipes = {name: lever_pipeline(method, run, bundle_dir, e, base, args) for name, e in entries.items()}
    print(f"[{method}] levers: timing {', '.join(pipes)}", flush=True)
    timed, _, _ = time_backends(pipes, frames, args.warmup, args.repeats, required=tuple(pipes))
    base_ms = timed["baseline"]["ms"]["median"]
    rows: dict[str, Any] = {}
    for name, e in entries.items():
        ms = timed[name]["ms"]["median"]
        rows[name] = {"backend": e["backend"], "set": e.get("set") or {}, "ms": timed[name]["ms"],
                      "stage_ms": {s: v["median"] for s, v in timed[name]["stage_ms"].items()},
                      "speedup_vs_baseline": base_ms / ms}
    if args.accuracy:
        data = args.accuracy_data or cfg.train.data_root
        if data is None:
            raise SystemExit("--accuracy needs test data: the run has no data folder; pass --accuracy-data")
        for name, e in entries.items():
            if e.get("accuracy", True) is False and name not in ("baseline", "default"):
                continue  # e.g. the baseline's settings on another fp32 backend: the same scores within parity
            backend = "onnxruntime_fp32" if e["backend"] == "torch" else e["backend"]
            t0 = time.perf_counter()
            pipe = lever_pipeline(method, run, bundle_dir, e, base, args, backend)
            acc = lever_accuracy(pipe, Path(data), cfg.model.image_size, cfg.inference.batch_size,
                                 args.accuracy_every)
            rows[name].update(acc, accuracy_backend=backend)
            print(f"[{method}] {name}: image AUROC {acc['image_auroc']:.4f}, pixel {acc['pixel_auroc']:.4f} "
                  f"({acc['images']} images, {time.perf_counter() - t0:.0f} s)", flush=True)
    out: dict[str, Any] = {"levers": rows, "speedup_vs_baseline": rows["default"]["speedup_vs_baseline"],
                           "baseline_ms": base_ms, "default_ms": rows["default"]["ms"]["median"]}
    if args.accuracy:
        out |= {"image_auroc_fast": rows["default"]["image_auroc"],
                "image_auroc_accurate": rows["baseline"]["image_auroc"],
                "pixel_auroc_fast": rows["default"]["pixel_auroc"],
                "pixel_auroc_accurate": rows["baseline"]["pixel_auroc"]}
    return out


# --------------------------------------------------------------------------- reporting


def runs_on_gpu(backend: str) -> bool:
    return "cuda" in backend or "tensorrt" in backend


def _diff(d: float | None) -> str:
    return "-" if d is None else f"{d:.1e}"


def markdown(res: dict[str, Any]) -> str:
    m, pk, st = res["machine"], res["measured_peak"], res["settings"]
    lines = [
        f"# Latency per frame: {m['slug']}", "",
        "Command:", "", f"    {res['command']}", "",
        *([res["note"], ""] if res.get("note") else []),
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs available, {m['threads']} thread(s) used "
        f"(torch and onnxruntime intra-op); {m['platform']}; torch {m['torch']}, onnxruntime {m['onnxruntime']}"
        + (f"; GPU {m['gpu']}" if m.get("gpu") else "") + ".",
        f"Measured peak (CPU): {pk['gflops']:.1f} GFLOP/s ({pk['how']}); GPU backends get no fraction of it.",
        f"Batch 1; {st['warmup']} warm-up frame(s) per backend, then {st['repeats']} timed frames per backend, "
        "interleaved across backends; median and p10-p90 of the whole frame (wall clock around the pipeline "
        "call) and of each stage (the pipelines' stage timers). FLOPs: torch.utils.flop_counter over the torch "
        "pipeline (convolutions, matmuls, attention; 2 per multiply-add; elementwise ops not counted).", "",
    ]
    names = {"diad": "DiAD", "glad": "GLAD"}
    for method, r in res["methods"].items():
        lines += [f"## {names.get(method, method)}", "",
                  f"Run `{r['run']}` (preset {r['preset']}, {r['image_size']} px model image, features at "
                  f"{r['feature_size']} px; {', '.join(f'{k} {v}' for k, v in r['settings'].items())}); "
                  f"frames: {r['frames']}" + (f"; overrides {', '.join(r['overrides'])}" if r.get("overrides") else "")
                  + f". {r['gflop_per_frame']:.3f} GFLOP per frame.", "",
                  "| backend | runs on | median ms/frame | p10 | p90 | vs torch eager | GFLOP/s | of measured peak | "
                  "max abs score diff vs torch | frames/s | max abs score diff vs onnxruntime CPU |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        par = r["parity"]["max_abs_score_diff_vs_torch"]
        par_ort = r["parity"].get("max_abs_score_diff_vs_onnxruntime_cpu", {})
        for b, v in r["backends"].items():
            where = "GPU" if runs_on_gpu(b) else f"CPU, {m['threads']} thr"
            frac = "-" if v.get("peak_fraction") is None else f"{100 * v['peak_fraction']:.1f} %"
            fps = f"{v['fps']:.1f}" if "fps" in v else "-"
            lines.append(f"| {b} | {where} | {v['ms']['median']:.1f} | {v['ms']['p10']:.1f} | {v['ms']['p90']:.1f} | "
                         f"{v['vs_torch_speedup']:.2f}x | {v['gflops_achieved']:.2f} | {frac} | "
                         f"{_diff(par.get(b))} | {fps} | {_diff(par_ort.get(b))} |")
        errors = r.get("backend_errors", {})
        lines += ["", *(f"- {b}: not measured: {err}" for b, err in errors.items()), *([""] if errors else [])]
        lines += [f"**onnxruntime fp32 vs torch eager: {r['ort_vs_torch_speedup']:.2f}x** "
                  f"({r['ort_ms']:.1f} ms vs {r['torch_ms']:.1f} ms per frame).", ""]
        backends = list(r["stage_ms"])
        stages = list(dict.fromkeys(s for b in backends for s in r["stage_ms"][b]))
        lines += ["Stage medians (ms per frame):", "", "| stage | " + " | ".join(backends) + " |",
                  "|---|" + "---:|" * len(backends)]
        for s in stages:
            lines.append(f"| {s} | " + " | ".join(f"{r['stage_ms'][b].get(s, 0.0):.2f}" for b in backends) + " |")
        if r.get("levers"):
            lines += ["", f"**Speed levers** (batch 1, timed interleaved in one loop; baseline = today's pipeline, "
                          f"default = what the edge preset now ships with): **default {r['speedup_vs_baseline']:.1f}x "
                          f"faster than the baseline** ({r['default_ms']:.1f} vs {r['baseline_ms']:.1f} ms per frame)"
                          + (f"; image AUROC {r['image_auroc_fast']:.4f} (default) vs {r['image_auroc_accurate']:.4f} "
                             f"(baseline), pixel AUROC {r['pixel_auroc_fast']:.4f} vs {r['pixel_auroc_accurate']:.4f}"
                             if "image_auroc_fast" in r else "") + ".", "",
                      "| lever | backend | settings | median ms | p10 | p90 | vs baseline | image AUROC | "
                      "pixel AUROC |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
            for name, v in r["levers"].items():
                sets = ", ".join(f"{k}={val}" for k, val in v["set"].items()) or "(the run's)"
                acc = (f"{v['image_auroc']:.4f} | {v['pixel_auroc']:.4f}" if "image_auroc" in v else "- | -")
                lines.append(f"| {name} | {v['backend']} | {sets} | {v['ms']['median']:.1f} | {v['ms']['p10']:.1f} | "
                             f"{v['ms']['p90']:.1f} | {v['speedup_vs_baseline']:.2f}x | {acc} |")
            first = next(iter(r["levers"].values()))
            if "images" in first:  # levers without AUROC: the same scores as another row (accuracy: false)
                lines += ["", f"AUROC on {first['images']} test images (every {res['settings']['accuracy_every']}"
                              f"th); a torch lever is scored on onnxruntime fp32 with its settings (same scores "
                              f"within the parity above)."]
            lines += ["", "Stage medians of the levers (ms per frame):", "",
                      "| stage | " + " | ".join(r["levers"]) + " |", "|---|" + "---:|" * len(r["levers"])]
            lstages = list(dict.fromkeys(s for v in r["levers"].values() for s in v["stage_ms"]))
            for s in lstages:
                lines.append(f"| {s} | " + " | ".join(f"{v['stage_ms'].get(s, 0.0):.2f}" for v in r["levers"].values())
                             + " |")
        top = list(r["gflop_by_op"].items())[:6]
        lines += ["", "GFLOP per frame by op: " + ", ".join(f"{k} {v:.3f}" for k, v in top), ""]
    return "\n".join(lines) + "\n"




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diad", type=Path, help="DiAD run folder")
    ap.add_argument("--glad", type=Path, help="GLAD run folder")
    for m in ("diad", "glad"):
        ap.add_argument(f"--{m}-set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"inference/scoring override for the {m} run, all backends alike, e.g. "
                             f"inference.steps=10 (repeatable)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch and onnxruntime (default: the logical CPUs available)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed frames per backend first (default 3)")
    ap.add_argument("--repeats", type=int, default=20, help="timed frames per backend (default 20)")
    ap.add_argument("--frames", type=Path, help="folder of input frames (default: the run's data test split)")
    ap.add_argument("--num-frames", type=int, default=8, help="distinct frames, cycled (default 8)")
    ap.add_argument("--fp16", action="store_true", help="also export and time the fp16 variant")
    ap.add_argument("--device", default="cpu", help="torch device for the torch backend (default cpu)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgeinspect-latency",
                    help="folder for the exported bundles")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for latency_<machine>.md/.json")
    ap.add_argument("--machine", help="machine slug for the file names (default cpu<N> or the GPU name)")
    ap.add_argument("--note", help="a paragraph for the report, e.g. how the runs were made")
    ap.add_argument("--peak-size", type=int, default=2048, help="matmul size for the measured peak (default 2048)")
    ap.add_argument("--backends", type=lambda v: {b.strip() for b in v.split(",") if b.strip()},
                    help="comma-separated backends to time, of those available (default: all); the torch one "
                         f"(torch or torch_cuda) and {ORT_CPU} are always needed")
    ap.add_argument("--levers", type=Path,
                    help="a levers file (YAML, e.g. benchmarks/speed_levers.yaml): per method today's pipeline "
                         "(baseline), the new default and named levers, timed together; speedup_vs_baseline")
    ap.add_argument("--accuracy", action="store_true",
                    help="with --levers: image and pixel AUROC of every lever on the test split")
    ap.add_argument("--accuracy-data", type=Path, help="dataset root for --accuracy (default: the run's)")
    ap.add_argument("--accuracy-every", type=int, default=1,
                    help="--accuracy on every k-th test image (default 1: all)")
    args = ap.parse_args(argv)
    if args.levers is not None:
        args.levers = read_levers(args.levers)
    if args.accuracy and args.levers is None:
        ap.error("--accuracy needs --levers")
    if args.diad is None and args.glad is None:
        ap.error("give --diad and/or --glad")
    if args.repeats < 1 or args.warmup < 0 or args.num_frames < 1:
        ap.error("--repeats and --num-frames must be >= 1, --warmup >= 0")
    if args.backends is not None:
        missing = sorted({torch_backend_name(args.device), ORT_CPU} - args.backends)
        if missing:
            ap.error(f"--backends must include {' and '.join(missing)} (the references)")
    args.threads = args.threads or logical_cpus()
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import onnxruntime

    torch.set_num_threads(args.threads)
    command = "python benchmarks/latency.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    peak = measure_peak_gflops(args.threads, args.peak_size)
    print(f"measured peak: {peak['gflops']:.1f} GFLOP/s ({args.threads} thread(s))", flush=True)
    methods = {}
    for method, run in (("diad", args.diad), ("glad", args.glad)):
        if run is not None:
            methods[method] = bench_method(method, run, args, peak)
    gpu_used = any(runs_on_gpu(b) for r in methods.values() for b in r["backends"])
    gpu = gpu_name()
    machine_slug = args.machine or (slug(gpu) if gpu_used and gpu else f"cpu{logical_cpus()}")
    res = {
        "command": command,
        "note": args.note,
        "machine": {"slug": machine_slug, "slug_rule": "--machine, else cpu<logical CPUs available>, else the GPU "
                                                       "name when a GPU backend ran",
                    "cpu": cpu_name(), "logical_cpus": logical_cpus(), "threads": args.threads,
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "gpu": gpu},
        "measured_peak": peak,
        "settings": {"batch": 1, "warmup": args.warmup, "repeats": args.repeats, "num_frames": args.num_frames,
                     "fp16": args.fp16, "device": args.device, "levers": args.levers,
                     "accuracy_every": args.accuracy_every if args.accuracy else None},
        "methods": methods,
    }
    out_json = args.results / f"latency_{machine_slug}.json"
    write_text_atomic(out_json, json.dumps(res, indent=2) + "\n")
    write_text_atomic(out_json.with_suffix(".md"), markdown(res))
    for method, r in methods.items():
        print(f"[{method}] torch {r['torch_ms']:.1f} ms, onnxruntime fp32 {r['ort_ms']:.1f} ms per frame: "
              f"{r['ort_vs_torch_speedup']:.2f}x; {r['gflop_per_frame']:.3f} GFLOP/frame, "
              f"{100 * r['peak_fraction']:.1f} % of the measured peak")
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}")
    return res


if __name__ == "__main__":
    main()
