"""AdaBLDM Algorithm 2: online decoder adaptation, in PyTorch whatever backend ran the sampling loop.

Per sample a fresh copy of the VAE decoder (post-quant conv + decoder) is fine-tuned on
L = L_i + lambda_con * L_d, with L_i = mean((decode(z*) - x_OK)^2 over the non-defect pixels) and
L_d = mean((decode(z*) - x*)^2 over the defect pixels), x* = decode(z*) by the original decoder:
the adapted decoder reproduces the normal image around the defect and keeps the defect the
original decoder drew. The original decoder is never modified (its copy is what trains), so a
long generation job can adapt thousands of samples from one loaded decoder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


class LatentDecoder(nn.Module):
    """Scaled latent -> image in [-1, 1]: the part of a diffusers AutoencoderKL that adaptation trains,
    split into a `prefix` (post-quant conv, conv_in, middle, all but the last up block) and a `tail`
    (last up block, output norm and conv) so that adapting only the tail can compute the prefix once.
    An anchored autoencoder's resize path (`anchor`, no parameters) is added to the tail's output."""

    def __init__(self, post_quant_conv: nn.Module, decoder: nn.Module, scaling_factor: float,
                 anchor: nn.Module | None = None):
        super().__init__()
        self.post_quant_conv, self.decoder = post_quant_conv, decoder
        self.anchor = anchor
        self.scaling_factor = float(scaling_factor)

    @classmethod
    def from_vae(cls, vae: nn.Module) -> "LatentDecoder":
        pqc = vae.post_quant_conv if vae.post_quant_conv is not None else nn.Identity()
        anchor = copy.deepcopy(vae.anchor) if hasattr(vae, "anchor") else None
        return cls(copy.deepcopy(pqc), copy.deepcopy(vae.decoder), vae.config.scaling_factor, anchor)

    def _raw(self, latent: torch.Tensor) -> torch.Tensor:
        raw = latent / self.scaling_factor
        return raw + self.anchor.latent_shift if self.anchor is not None else raw

    def prefix(self, latent: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        h = d.mid_block(d.conv_in(self.post_quant_conv(self._raw(latent))), None)
        for up in d.up_blocks[:-1]:
            h = up(h, None)
        return h

    def tail(self, h: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        out = d.conv_out(d.conv_act(d.conv_norm_out(d.up_blocks[-1](h, None))))
        if self.anchor is None:
            return out
        return self.anchor.image_out(out + self.anchor.decode(self._raw(latent)))

    def tail_parameters(self) -> list[nn.Parameter]:
        d = self.decoder
        return [p for m in (d.up_blocks[-1], d.conv_norm_out, d.conv_out) for p in m.parameters()]

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.tail(self.prefix(latent), latent)


@dataclass
class AdaptationResult:
    image: torch.Tensor  # (3, H, W) in [-1, 1], decoded by the adapted copy
    before: torch.Tensor  # (3, H, W): x* from the original decoder
    loss_inside: list[float]  # L_d per step (defect region, vs x*)
    loss_outside: list[float]  # L_i per step (normal region, vs x_OK)


def _masked_mse(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the pixels where m = 1 (0 when there are none)."""
    w = m.expand_as(a)
    return ((a - b) ** 2 * w).sum() / w.sum().clamp(min=1.0)


def adapt_decoder(decoder: LatentDecoder, latent: torch.Tensor, x_ok: torch.Tensor, mask: torch.Tensor,
                  steps: int, lr: float, lambda_con: float, scope: str = "decoder") -> AdaptationResult:
    """Adapt a fresh copy of `decoder` to one sample: latent (C,h,w), x_ok (3,H,W), mask (1,H,W).

    scope "decoder" trains the whole decoder (the paper); "last_up_block" only its full-resolution
    tail, whose input is then computed once: several times cheaper per step on a CPU, and the
    tail is where the fine texture that adaptation restores is drawn."""
    if scope not in ("decoder", "last_up_block"):
        raise ValueError(f"scope must be 'decoder' or 'last_up_block', not {scope!r}")
    device = next(decoder.parameters()).device
    z = latent.unsqueeze(0).to(device).detach()
    x_ok = x_ok.unsqueeze(0).to(device)
    m = mask.unsqueeze(0).to(device).float()
    work = copy.deepcopy(decoder).train()
    work.requires_grad_(False)
    with torch.no_grad():
        before = decoder(z)
        frozen = work.prefix(z) if scope == "last_up_block" else None
    params = work.tail_parameters() if scope == "last_up_block" else list(work.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    inside, outside = [], []
    with torch.enable_grad():
        for _ in range(steps):
            x = work.tail(frozen, z) if frozen is not None else work(z)
            l_i = _masked_mse(x, x_ok, 1 - m)
            l_d = _masked_mse(x, before, m)
            loss = l_i + lambda_con * l_d
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            outside.append(float(l_i.detach()))
            inside.append(float(l_d.detach()))
    with torch.no_grad():
        image = work.eval()(z)
    return AdaptationResult(image[0].clamp(-1, 1).cpu(), before[0].clamp(-1, 1).cpu(), inside, outside)
