import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "mtd_sample"

# Test networks are tiny: one thread each is as fast and keeps parallel work (subprocess daemons,
# trainers) from oversubscribing the cores.
torch.set_num_threads(1)


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) as a module, registered in sys.modules because
    dataclasses look their module up while a class is built."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _quiet_random_extractor_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        yield


@pytest.fixture
def sample_root() -> Path:
    return SAMPLE


def make_mvtec(root: Path, n_train: int = 6, n_good: int = 2, n_defect: int = 2, size=(40, 56),
               gray: bool = True, seed: int = 0) -> Path:
    """A small synthetic MVTec-layout folder: non-square (grayscale by default) images, square defects."""
    rng = np.random.default_rng(seed)
    h, w = size

    def img():
        base = (rng.random((h, w)) * 60 + 100).astype(np.uint8)
        return base if gray else np.stack([base] * 3, -1)

    (root / "train/good").mkdir(parents=True)
    for i in range(n_train):
        cv2.imwrite(str(root / f"train/good/{i:03d}.png"), img())
    (root / "test/good").mkdir(parents=True)
    for i in range(n_good):
        cv2.imwrite(str(root / f"test/good/{i:03d}.png"), img())
    (root / "test/scratch").mkdir(parents=True)
    (root / "ground_truth/scratch").mkdir(parents=True)
    for i in range(n_defect):
        im = img()
        mask = np.zeros((h, w), np.uint8)
        mask[10:20, 20:34] = 255
        im[mask > 0] = 250
        cv2.imwrite(str(root / f"test/scratch/{i:03d}.png"), im)
        cv2.imwrite(str(root / f"ground_truth/scratch/{i:03d}_mask.png"), mask)
    return root


@pytest.fixture
def synthetic_mvtec(tmp_path) -> Path:
    return make_mvtec(tmp_path / "cat")


def check_resume_bit_for_bit(train, cfg, tmp_path: Path, batches_cls, monkeypatch, stage: str) -> None:
    """`train(cfg, run, resume=..., progress=False)` interrupted at the start of its 4th step (before
    that step draws anything, as a step-boundary SIGTERM does) refuses to restart without --resume,
    and resumed ends bit for bit where an uninterrupted run does."""
    from safetensors.torch import load_file

    from edgeinspect.core.runs import CheckpointError, latest_checkpoint, load_state

    train(cfg, tmp_path / "ref", progress=False)
    real = batches_cls.draw
    calls = {"n": 0}

    def interrupt_at_call_4(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(batches_cls, "draw", interrupt_at_call_4)
    with pytest.raises(KeyboardInterrupt, match="checkpoint written"):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(batches_cls, "draw", real)
    state = load_state(latest_checkpoint(tmp_path / "cut"))
    assert (state.stage, state.step) == (stage, 3)
    with pytest.raises(CheckpointError, match="--resume"):
        train(cfg, tmp_path / "cut", progress=False)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    ref = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    cut = load_file(str(latest_checkpoint(tmp_path / "cut") / "model.safetensors"))
    assert ref.keys() == cut.keys() and all(torch.equal(ref[k], cut[k]) for k in ref)
