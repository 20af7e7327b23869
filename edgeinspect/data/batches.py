"""Training batches drawn from an in-memory training set, resumable through their seeded generator, and
evenly spread subsets of a set (calibration images, quantisation frames)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from edgeinspect.data.mvtec import uint8_to_model


class TrainingBatches:
    """Random batches from the in-memory training set, with optional flips, from a seeded generator."""

    def __init__(self, images_u8: torch.Tensor, batch_size: int, flips: bool, seed: int):
        self.images = images_u8
        self.batch_size = batch_size
        self.flips = flips
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, flip codes 0..3): bit 0 horizontal, bit 1 vertical."""
        idx = torch.randint(len(self.images), (self.batch_size,), generator=self.gen)
        flip = torch.randint(4 if self.flips else 1, (self.batch_size,), generator=self.gen)
        return idx, flip

    @staticmethod
    def apply_flip(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        for i, c in enumerate(codes.tolist()):
            dims = [d for bit, d in ((1, -1), (2, -2)) if c & bit]
            if dims:
                out[i] = x[i].flip(dims)
        return out

    def images_for(self, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        return self.apply_flip(uint8_to_model(self.images[idx]), flip)

    @classmethod
    def every_image(cls, images_u8: torch.Tensor, flips: bool, batch: int = 16) -> Iterator[tuple[int, torch.Tensor]]:
        """(flip code, model-range chunk) for every image under every flip code training draws, in order."""
        for code in range(4 if flips else 1):
            for s in range(0, len(images_u8), batch):
                chunk = images_u8[s:s + batch]
                yield code, cls.apply_flip(uint8_to_model(chunk), torch.full((len(chunk),), code))


def spread_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n); deterministic."""
    if k >= n:
        return list(range(n))
    return np.unique(np.linspace(0, n - 1, k).round().astype(int)).tolist()
