"""The normal-feature bank a detector may compare frames with (`scoring.reference` bank or hybrid).

A bank holds, per feature level, unit feature vectors of training normals (a greedy k-centre coreset:
`edgeinspect bank`, edgeinspect/calibration/bank.py) and, for the hybrid reference, two scales measured on
training normals held out of the bank. It lives in one safetensors file, `bank.safetensors`: in the
checkpoint folder of a run, or in a bundle as its payload "bank" (hashed and verified like every file).

The nearest-neighbour search is a network role, `bank_distance` (models.features.BankDistance: one MatMul
and one ReduceMax per level, the bank an input), so it runs on whatever backend runs the other networks
and torch, onnxruntime and TensorRT give the same distances.

Hybrid, per pixel:  h = m_rec / s_rec + m_bank / s_bank
where m_rec is the map the reconstruction reference gives (the method's own: DiAD's aligned 1 - cos, GLAD's
min over the reconstruction's positions), m_bank the map the bank reference gives (same blur), and s_rec,
s_bank the `bank.scale_percentile` of each map's pixels on held-out training normals. Why this shape:
- the two distances fail differently (the bank does not know where a texture belongs, the reconstruction
  carries the autoencoder's and sampler's errors): a sum keeps each one's evidence, so a misplaced but
  normal-looking structure (bank ~ 0, reconstruction high) and a texture flaw the reconstruction copied
  (reconstruction ~ 0, bank high) both score; a min or product would drop one kind;
- dividing by a high percentile on normals puts both in units of "normal's upper range", so neither
  dominates for its units (1 - cos against a bank of near copies is far smaller than against one
  reconstruction), and the weights come from normals only, never from defects;
- both maps are blurred the same way before the sum (the blur is linear), so the hybrid of a frame is the
  weighted sum of exactly the two single-reference maps, and its image score is the method's pooling of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edgeinspect.core.networks import Networks

BANK_FILE = "bank.safetensors"
BANK_PAYLOAD = "bank"  # its name among a bundle's payload files
SCALES_KEY = "hybrid_scales"  # (s_rec, s_bank)


class BankError(ValueError):
    """A bank that is missing or does not fit the detector; the message says how to build one."""


@dataclass
class NormalBank:
    vectors: list[torch.Tensor]  # per level (M, C), unit rows
    scales: tuple[float, float] | None = None  # (s_rec, s_bank) for the hybrid reference; None: not measured
    info: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors content (what `read_bank` reads back)."""
        out = {f"bank_{i}": v.float().contiguous() for i, v in enumerate(self.vectors)}
        if self.scales is not None:
            out[SCALES_KEY] = torch.tensor(self.scales, dtype=torch.float32)
        return out

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * 4 for v in self.vectors)


def bank_from_tensors(tensors: dict[str, torch.Tensor], source: str) -> NormalBank:
    levels = sorted(int(k.split("_", 1)[1]) for k in tensors if k.startswith("bank_"))
    if not levels or levels != list(range(len(levels))):
        raise BankError(f"{source}: no bank_0..bank_L-1 tensors (found {sorted(tensors)})")
    scales = tensors.get(SCALES_KEY)
    return NormalBank([tensors[f"bank_{i}"].float() for i in levels],
                      None if scales is None else (float(scales[0]), float(scales[1])))


def read_bank(path: str | Path) -> NormalBank:
    path = Path(path)
    if not path.is_file():
        raise BankError(f"no normal-feature bank at {path}: build it with `edgeinspect bank --model RUN --data DIR`")
    return bank_from_tensors(load_file(str(path)), str(path))


def check_bank(bank: NormalBank | None, reference: str) -> None:
    """Refuse a bank that cannot serve `reference` (bank or hybrid), with how to get one."""
    if bank is None:
        raise BankError(f"scoring.reference {reference!r} needs the normal-feature bank: build it with "
                        "`edgeinspect bank --model RUN|--bundle BUNDLE --data DIR`")
    if reference == "hybrid" and bank.scales is None:
        raise BankError("scoring.reference 'hybrid' needs the bank's hybrid scales, measured on held-out training "
                        "normals: build the bank with scoring.bank.scale_images > 0")


def bank_distance_maps(nets: Networks, feats: list[torch.Tensor], bank: NormalBank, size: tuple[int, int],
                       chunk_mb: float) -> list[torch.Tensor]:
    """Per level, each position's distance to its nearest bank vector (the `bank_distance` network),
    bilinearly upsampled to `size`: [(B, H, W)] (the reference's map is their sum).

    Memory: a call holds a (positions x bank) similarity per level. Frames go to the network in chunks whose
    similarity fits `chunk_mb`; when one frame's alone does not fit, its feature maps go in horizontal
    strips (each position's distance is its own, so strips give the same distances), except on TensorRT,
    whose engines are built for the whole map: one frame per call there."""
    b = feats[0].shape[0]
    per_frame = max(f.shape[-2] * f.shape[-1] * v.shape[0] * 4 for f, v in zip(feats, bank.vectors, strict=True))
    budget = chunk_mb * 2**20
    rows = max(1, int(budget // per_frame))
    strips = 1
    if per_frame > budget and nets.name != "tensorrt":
        strips = min(math.ceil(per_frame / budget), min(f.shape[-2] for f in feats))
    banks = {f"bank_{i}": v for i, v in enumerate(bank.vectors)}
    net = nets["bank_distance"]
    levels: list[list[torch.Tensor]] = [[] for _ in feats]
    for s in range(0, b, rows):
        parts = [f[s:s + rows].tensor_split(strips, dim=2) for f in feats]  # per level, `strips` row bands
        outs = [net(**{f"feature_{i}": p[j] for i, p in enumerate(parts)}, **banks) for j in range(strips)]
        for i in range(len(feats)):
            d = torch.cat([o[f"distance_{i}"].float() for o in outs], dim=1)
            levels[i].append(F.interpolate(d.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0])
    assert feats and b, "no feature levels or no frames"
    return [torch.cat(chunks) for chunks in levels]


def hybrid_maps(reconstruction_maps: torch.Tensor, bank_maps: torch.Tensor, scales: tuple[float, float]
                ) -> torch.Tensor:
    """m_rec / s_rec + m_bank / s_bank (see the module's docstring for why)."""
    s_rec, s_bank = scales
    return reconstruction_maps / s_rec + bank_maps / s_bank
