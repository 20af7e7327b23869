"""Per-stage wall-clock timing of a loop, synchronising CUDA so GPU stages are measured, not queued."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates milliseconds per stage name: `with timer("decode"): ...`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3
