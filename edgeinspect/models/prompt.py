"""Prompt conditioning: CLIP from a local SD folder, or a small trainable prompt encoder.

Both produce `encoder_hidden_states` (B, L, D) for the UNet's cross-attention, so the rest of the
code never knows which one it has.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import torch
from torch import nn

from edgeinspect.config import ModelConfig

_PAD, _UNK = 0, 1


def tokenize(prompts: list[str], vocab_size: int, max_length: int) -> torch.Tensor:
    """Word-level tokens by a stable hash (crc32), so no vocabulary file needs shipping."""
    ids = torch.full((len(prompts), max_length), _PAD, dtype=torch.long)
    for i, p in enumerate(prompts):
        words = re.findall(r"[a-z0-9]+", p.lower())[:max_length]
        for j, w in enumerate(words):
            ids[i, j] = 2 + zlib.crc32(w.encode()) % (vocab_size - 2)
    return ids


class PromptEncoder(nn.Module):
    """Token + position embeddings and a LayerNorm; the empty prompt is all padding tokens."""

    def __init__(self, vocab_size: int, max_length: int, dim: int):
        super().__init__()
        self.vocab_size, self.max_length = vocab_size, max_length
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = tokenize(prompts, self.vocab_size, self.max_length).to(self.positions.device)
        return self.norm(self.tokens(ids) + self.positions)


class CLIPPromptEncoder(nn.Module):
    """CLIP text encoder + tokenizer from a local Stable Diffusion folder (needs `transformers`)."""

    def __init__(self, sd_folder: Path):
        super().__init__()
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("the sd15 preset needs `transformers`: pip install 'edgeinspect[sd15]'") from e
        self.tokenizer = CLIPTokenizer.from_pretrained(Path(sd_folder) / "tokenizer", local_files_only=True)
        self.text_model = CLIPTextModel.from_pretrained(Path(sd_folder) / "text_encoder", local_files_only=True)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.text_model(tok.input_ids.to(self.text_model.device))[0]


def build_prompt_encoder(cfg: ModelConfig) -> nn.Module:
    if cfg.preset == "sd15":
        assert cfg.sd15_path is not None
        return CLIPPromptEncoder(cfg.sd15_path)
    p = cfg.prompt_encoder
    return PromptEncoder(p.vocab_size, p.max_length, cfg.unet.cross_attention_dim)
