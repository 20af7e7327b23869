"""Builders for the latent-diffusion networks: the KL autoencoder and the denoising UNet.

The tiny/edge presets build them from scratch with the sizes in the config; the sd15 preset loads
them from a local diffusers Stable Diffusion 1.5 folder (never from a hub).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel

from edgeinspect.config import ModelConfig
from edgeinspect.models.autoencoder import AnchoredAutoencoderKL


def _sd15_folder(cfg: ModelConfig, sub: str) -> Path:
    assert cfg.sd15_path is not None
    folder = Path(cfg.sd15_path) / sub
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers model folder (no config.json); model.sd15_path must point at a "
            "local Stable Diffusion 1.5 folder in diffusers layout (vae/, unet/, text_encoder/, tokenizer/)"
        )
    return folder


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    if cfg.preset == "sd15":
        return AutoencoderKL.from_pretrained(_sd15_folder(cfg, "vae"), local_files_only=True)
    v = cfg.vae
    sizes = dict(block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
                 latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups, sample_size=cfg.image_size,
                 scaling_factor=v.scaling_factor)
    if v.kind == "anchored":
        return AnchoredAutoencoderKL(grey=v.grey, anchor_kind=v.anchor, **sizes)
    n = len(v.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, **sizes)


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    if cfg.preset == "sd15":
        return UNet2DConditionModel.from_pretrained(_sd15_folder(cfg, "unet"), local_files_only=True)
    u = cfg.unet
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.vae.latent_channels,
        out_channels=cfg.vae.latent_channels,
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        cross_attention_dim=u.cross_attention_dim,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )
