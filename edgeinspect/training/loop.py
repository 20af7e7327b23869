"""The one trainer loop: staged, step-based, checkpointed, resumable, interrupt-safe.

A method describes its training as an ordered list of `Stage`s (name, number of steps, the
parameters it trains, a loss function). The loop runs them in order, writes a checkpoint every
`checkpoint_every` steps and at the end of each stage, and on resume continues from the stage and
step recorded in the latest checkpoint, with the optimizer and RNG state restored. SIGTERM and
Ctrl-C write a checkpoint before exiting.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from edgeinspect.config import dump_config
from edgeinspect.core.runs import CheckpointError, TrainState, latest_checkpoint, load_model_weights, load_state
from edgeinspect.training.checkpoint import load_optimizer, load_rng, save_checkpoint
from edgeinspect.core.atomic import write_json_atomic


def training_device(name: str) -> torch.device:
    """train.device as a torch device; "auto" is the first GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={name}, but this PyTorch sees no CUDA GPU "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
                               "use train.device=cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"train.device={name}, but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", index)
        # TF32 matmuls/convolutions: the usual speed-for-precision trade for training on Ampere+.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # each stage's shapes are fixed
    return device


def prepare_run(cfg, run_dir: Path, resume: bool) -> torch.device:
    """Checks shared by every method before training in `run_dir`: data set, device, threads, no
    silent overwrite of an existing run, no resume with a different model; then writes config.json.
    Returns the device to train on."""
    t = cfg.train
    if t.data_root is None:
        raise ValueError("train.data_root is not set: point it at an MVTec-layout category folder")
    device = training_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    existing = latest_checkpoint(run_dir) if run_dir.exists() else None
    if existing is not None and not resume:
        raise CheckpointError(f"{run_dir} already has checkpoints; pass --resume to continue it or pick a new run dir")
    if resume and (run_dir / "config.json").is_file():
        saved = json.loads((run_dir / "config.json").read_text())
        if saved.get("model") != dump_config(cfg).get("model"):
            raise CheckpointError(f"{run_dir}/config.json has a different model config than the one given")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", dump_config(cfg))
    return device


@dataclass
class Stage:
    name: str
    steps: int
    lr: float
    params: Callable[[], Iterable[torch.nn.Parameter]]
    loss: Callable[[int], torch.Tensor]  # step -> scalar loss (draws its own batch)
    setup: Callable[[bool], None] = lambda starting_fresh: None  # freezing, caches; True at step 0
    finish: Callable[[], dict] = field(default=lambda: {})  # after the last step; returns state extras
    warmup: int = 0  # linear learning-rate warm-up over this many steps
    schedule: str = "constant"  # then "constant", or "cosine" (to 0 at the last step)

    def lr_at(self, step: int) -> float:
        """The learning rate of `step` (a function of the step alone, so a resumed run needs no
        scheduler state)."""
        factor = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.schedule == "cosine":
            factor *= 0.5 * (1 + math.cos(math.pi * min(step, self.steps) / max(self.steps, 1)))
        elif self.schedule != "constant":
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}")
        return self.lr * factor


class Interrupted(Exception):
    pass


class _SignalGuard:
    """Turns SIGTERM into an exception at a step boundary, so a checkpoint can be written."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self._old = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handler(self, *_):
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class Trainer:
    def __init__(self, run_dir: str | Path, model: torch.nn.Module, stages: list[Stage], *,
                 checkpoint_every: int, keep: int, log_every: int, weight_decay: float, grad_clip: float,
                 state_extra: Callable[[], dict] | None = None, progress: bool = True,
                 generators: dict[str, torch.Generator] | None = None):
        self.run_dir = Path(run_dir)
        self.model = model
        self.stages = stages
        self.checkpoint_every = checkpoint_every
        self.keep = keep
        self.log_every = log_every
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.state_extra = state_extra or (lambda: {})
        self.progress = progress
        self.generators = generators or {}
        self.state = TrainState(stage=stages[0].name)

    def resume(self) -> bool:
        """Load the latest checkpoint if there is one; True when something was resumed."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        load_model_weights(self.model, ckpt)
        self.state = load_state(ckpt)
        self._resume_ckpt = ckpt
        return True

    def _optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        params = [p for p in stage.params() if p.requires_grad]
        if not params:
            raise RuntimeError(f"stage {stage.name!r} has no trainable parameters")
        return torch.optim.AdamW(params, lr=stage.lr, weight_decay=self.weight_decay)

    def _save(self, name: str, opt: torch.optim.Optimizer | None) -> None:
        self.state.extra.update(self.state_extra())
        save_checkpoint(self.run_dir, name, self.model, self.state, opt, keep=self.keep,
                        generators=self.generators)

    def _log(self, record: dict) -> None:
        with open(self.run_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self) -> TrainState:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        names = [s.name for s in self.stages]
        if self.state.stage == "done":
            return self.state
        if self.state.stage not in names:
            raise RuntimeError(f"checkpoint stage {self.state.stage!r} is not one of {names}")
        start = names.index(self.state.stage)
        with _SignalGuard() as guard:
            for stage in self.stages[start:]:
                if self.state.stage != stage.name:
                    self.state = TrainState(stage.name, 0, self.state.train_seconds, self.state.extra)
                self._run_stage(stage, guard)
        self.state = TrainState("done", 0, self.state.train_seconds, self.state.extra)
        self._save("done", None)
        return self.state

    def _run_stage(self, stage: Stage, guard: _SignalGuard) -> None:
        fresh = self.state.step == 0
        stage.setup(fresh)
        opt = self._optimizer(stage)
        resumed = getattr(self, "_resume_ckpt", None)
        if resumed is not None:
            load_rng(resumed, self.generators)
            if not fresh:
                load_optimizer(opt, resumed)
        self._resume_ckpt = None
        bar = tqdm(total=stage.steps, initial=self.state.step, desc=stage.name, disable=not self.progress,
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        running = None
        # RNG states at the start of the step in progress (None between steps): a Ctrl-C inside a
        # step must checkpoint the states from before that step's draws, or the resumed run redraws
        # differently and is no longer bit-for-bit the uninterrupted one.
        step_rng: tuple | None = None
        try:
            while self.state.step < stage.steps:
                step_rng = (torch.get_rng_state(), {k: g.get_state() for k, g in self.generators.items()})
                self.model.train()
                for group in opt.param_groups:
                    group["lr"] = stage.lr_at(self.state.step)
                loss = stage.loss(self.state.step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{stage.name} step {self.state.step}: loss is {loss.item()}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in opt.param_groups for p in g["params"]], self.grad_clip)
                opt.step()
                self.state.step += 1
                step_rng = None
                now = time.perf_counter()
                self.state.train_seconds += now - t_last
                t_last = now
                value = float(loss.detach())
                running = value if running is None or math.isnan(running) else 0.95 * running + 0.05 * value
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                if self.state.step % self.log_every == 0:
                    self._log({"stage": stage.name, "step": self.state.step, "loss": value,
                               "loss_ema": running, "train_seconds": round(self.state.train_seconds, 1)})
                if guard.hit:
                    raise Interrupted()
                if self.state.step % self.checkpoint_every == 0 and self.state.step < stage.steps:
                    self._save(f"{stage.name}-{self.state.step:07d}", opt)
                    t_last = time.perf_counter()  # checkpoint I/O is not training time
        except (KeyboardInterrupt, Interrupted):
            bar.close()
            if step_rng is not None:  # interrupted inside a step: that step is redone from scratch
                torch.set_rng_state(step_rng[0])
                for k, g in self.generators.items():
                    g.set_state(step_rng[1][k])
            self._save(f"{stage.name}-{self.state.step:07d}", opt)
            raise KeyboardInterrupt(f"interrupted in {stage.name} at step {self.state.step}; checkpoint written")
        bar.close()
        self.state.extra.update(stage.finish() or {})
        self._save(f"{stage.name}-final", opt)
