"""The GLAD model: DiAD's latent diffusion parts without guidance, and its plain UNet role."""

from __future__ import annotations

import torch
from torch import nn

from edgeinspect.config import GLADConfig
from edgeinspect.models.diad import LatentDiffusionModel, decoder_roles, encoder_roles


class PlainUNet(nn.Module):
    """The `unet_plain` role: (sample, timestep, encoder_hidden_states) -> noise_pred."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


class GLADModel(LatentDiffusionModel):
    """The latent diffusion parts alone, under DiADModel's names, so a DiAD checkpoint's `vae.`,
    `unet.` and `prompt_encoder.` weights load as they are."""

    def __init__(self, cfg: GLADConfig):
        super().__init__(cfg)

    def role_modules(self) -> dict[str, nn.Module]:
        return {**encoder_roles(self.vae), "unet_plain": PlainUNet(self.unet), **decoder_roles(self.vae)}
