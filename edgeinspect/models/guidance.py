"""ControlNet-style guidance networks: the DiAD semantic-guided (SG) network with SFF.

A trainable copy of the UNet's time embedding, input conv, encoder blocks and middle block, fed the
noisy latent plus a condition image through a hint stack. Its outputs are added to the frozen
UNet's decoder skip inputs and middle block through zero-initialised 1x1 convs, so training starts
from the plain UNet's behaviour.

SFF (spatial-aware feature fusion, DiAD eq. 8): the second-lowest resolution outputs are brought
down by conv3x3-stride2 -> InstanceNorm -> SiLU blocks, summed and added to every lowest-resolution
output, then SiLU. The authors zero-initialise these convs as well as the injection convs, which
leaves the SFF branch with exactly zero gradient forever; here only the final injection convs start
at zero.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from edgeinspect.config import GuidanceConfig


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class HintEncoder(nn.Module):
    """3x3 conv + SiLU stack from image to latent resolution, zero conv to the first block width.

    Stride 2 sits on the channel-changing convs (as in ControlNet's 16->32, 32->96, 96->256), one per
    factor 2 of the VAE downsampling.
    """

    def __init__(self, channels: list[int], downsample_factor: int, out_channels: int, in_channels: int = 3):
        super().__init__()
        n_down = downsample_factor.bit_length() - 1
        if 2**n_down != downsample_factor:
            raise ValueError(f"downsample factor must be a power of two, got {downsample_factor}")
        # conv i maps channels[i-1] -> channels[i]; strided convs at i = 2, 4, 6, ... (then any left)
        candidates = [i for i in range(1, len(channels)) if i % 2 == 0] + [
            i for i in range(1, len(channels)) if i % 2 == 1
        ]
        if n_down > len(channels) - 1:
            raise ValueError(
                f"hint_channels has {len(channels)} entries: too few convs for {n_down} stride-2 steps "
                f"(needs at least {n_down + 1})"
            )
        strided = set(candidates[:n_down])
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(prev, c, 3, stride=2 if i in strided else 1, padding=1), nn.SiLU()]
            prev = c
        layers.append(zero_module(nn.Conv2d(prev, out_channels, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


@dataclass(frozen=True)
class ResidualSlot:
    channels: int
    level: int  # 0 = latent resolution, each level halves it


def residual_slots(unet: UNet2DConditionModel) -> list[ResidualSlot]:
    """Channels and resolution of each `down_block_res_samples` entry of a diffusers UNet."""
    widths = list(unet.config.block_out_channels)
    layers = unet.config.layers_per_block
    layers = [layers] * len(widths) if isinstance(layers, int) else list(layers)
    slots = [ResidualSlot(widths[0], 0)]
    for i, block in enumerate(unet.down_blocks):
        slots += [ResidualSlot(widths[i], i)] * layers[i]
        if getattr(block, "downsamplers", None):
            slots.append(ResidualSlot(widths[i], i + 1))
    return slots


class SpatialFeatureFusion(nn.Module):
    """Q_i = SiLU(P_i + sum_j F_ij(H_j)), F = conv3x3/s2 -> InstanceNorm -> SiLU (normal init)."""

    def __init__(self, high: list[int], low: list[int]):
        super().__init__()
        self.high_idx, self.low_idx = high, low
        self.blocks = nn.ModuleList()

    @classmethod
    def from_slots(cls, slots: list[ResidualSlot]) -> "SpatialFeatureFusion":
        lowest = max(s.level for s in slots)
        high = [i for i, s in enumerate(slots) if s.level == lowest - 1]
        low = [i for i, s in enumerate(slots) if s.level == lowest]
        sff = cls(high, low)
        for i in low:
            row = nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(slots[j].channels, slots[i].channels, 3, stride=2, padding=1),
                    nn.InstanceNorm2d(slots[i].channels, affine=True),
                    nn.SiLU(),
                )
                for j in high
            )
            sff.blocks.append(row)
        return sff

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = list(feats)
        for row, i in zip(self.blocks, self.low_idx):
            fused = sum(f(feats[j]) for f, j in zip(row, self.high_idx))
            out[i] = torch.nn.functional.silu(feats[i] + fused)
        return out


class GuidanceNet(nn.Module):
    """The SG network: `encode_hint(image)` once per frame, then `forward` once per denoising step.

    `forward` returns (down_residuals, mid_residual) in the form diffusers' UNet takes as
    `down_block_additional_residuals` / `mid_block_additional_residual`. In "mid" injection mode
    the residuals of all but the lowest resolution are zeros (the UNet needs the full tuple).
    """

    def __init__(self, unet: UNet2DConditionModel, cfg: GuidanceConfig, downsample_factor: int,
                 hint_in_channels: int = 3):
        super().__init__()
        self.injection = cfg.injection
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.mid_block = copy.deepcopy(unet.mid_block)
        width0 = unet.config.block_out_channels[0]
        self.hint_encoder = HintEncoder(cfg.hint_channels, downsample_factor, width0, hint_in_channels)
        self.slots = residual_slots(unet)
        lowest = max(s.level for s in self.slots)
        self.injected = [cfg.injection == "full" or s.level == lowest for s in self.slots]
        self.zero_convs = nn.ModuleList(
            zero_module(nn.Conv2d(s.channels, s.channels, 1)) if used else nn.Identity()
            for s, used in zip(self.slots, self.injected)
        )
        mid_ch = unet.config.block_out_channels[-1]
        self.mid_zero_conv = zero_module(nn.Conv2d(mid_ch, mid_ch, 1))
        self.sff = SpatialFeatureFusion.from_slots(self.slots) if cfg.sff else None

    def encode_hint(self, image: torch.Tensor) -> torch.Tensor:
        return self.hint_encoder(image)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                hint: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        t = timestep.reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        h = self.conv_in(sample) + hint
        feats = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            feats.extend(res)
        h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        if self.sff is not None:
            feats = self.sff(feats)
        down = tuple(
            conv(f) if used else torch.zeros_like(f)
            for conv, f, used in zip(self.zero_convs, feats, self.injected)
        )
        return down, self.mid_zero_conv(h)


class GuidedUNet(nn.Module):
    """UNet + SG network fused: one call per denoising step (the unit exported as one graph)."""

    def __init__(self, unet: UNet2DConditionModel, guidance: GuidanceNet):
        super().__init__()
        self.unet, self.guidance = unet, guidance

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                hint: torch.Tensor) -> torch.Tensor:
        down, mid = self.guidance(sample, timestep, encoder_hidden_states, hint)
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
        )[0]
