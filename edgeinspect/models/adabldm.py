"""The AdaBLDM model: autoencoder, UNet, prompt encoder and one trimap control branch per defect type.

A control branch is DiAD's ControlNet-style copy (models/guidance.py) with a one-channel hint stack
for the trimap, injecting into every decoder skip and the middle block through zero-initialised
1x1 convs, without SFF. It sees the empty prompt (the method's choice: the trimap, not the text,
drives it), so the fused per-step network keeps the empty-prompt embedding as a buffer and has the
same signature as DiAD's guided UNet: (sample, timestep, encoder_hidden_states, hint).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeinspect.config import AdaBLDMConfig
from edgeinspect.models.diad import LatentDiffusionModel, VAEDecoderNet, VAEEncoderNet
from edgeinspect.models.guidance import GuidanceNet

class TrimapEncoderNet(nn.Module):
    """The `trimap_encoder` role: trimap (B,1,H,W) in {0, 0.5, 1} -> hint at latent resolution."""

    def __init__(self, control: GuidanceNet):
        super().__init__()
        self.control = control

    def forward(self, trimap: torch.Tensor) -> torch.Tensor:
        return self.control.encode_hint(trimap)


class ControlledUNet(nn.Module):
    """Frozen UNet + one trimap control branch: one call per denoising step (one exported graph)."""

    def __init__(self, unet: nn.Module, control: GuidanceNet, empty_context: torch.Tensor):
        super().__init__()
        self.unet, self.control = unet, control
        self.register_buffer("empty_context", empty_context.detach().clone(), persistent=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                hint: torch.Tensor) -> torch.Tensor:
        ctx = self.empty_context.expand(sample.shape[0], *self.empty_context.shape[1:])
        down, mid = self.control(sample, timestep, ctx, hint)
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
        )[0]


class AdaBLDMModel(LatentDiffusionModel):
    """All AdaBLDM weights in one module (one state dict = one checkpoint); controls by defect type."""

    def __init__(self, cfg: AdaBLDMConfig, defect_types: list[str]):
        super().__init__(cfg)
        if not defect_types:
            raise ValueError("AdaBLDM needs at least one defect type")
        self.defect_types = list(defect_types)
        self.controls = nn.ModuleDict({t: self._new_control() for t in self.defect_types})

    def _new_control(self) -> GuidanceNet:
        return GuidanceNet(self.unet, self.cfg.control, self.cfg.model.vae.downsample_factor, hint_in_channels=1)

    def reset_control_from_unet(self, defect_type: str) -> None:
        """Re-copy a control branch from the (domain-trained) UNet, as ControlNet initialises its copy."""
        self.controls[defect_type].load_state_dict(self._new_control().state_dict())

    def control(self, defect_type: str) -> GuidanceNet:
        if defect_type not in self.controls:
            raise KeyError(f"no control branch for defect type {defect_type!r}; this model has {self.defect_types}")
        return self.controls[defect_type]

    @torch.no_grad()
    def empty_context(self) -> torch.Tensor:
        return self.prompt_encoder([""])

    def controlled_unet(self, defect_type: str) -> ControlledUNet:
        return ControlledUNet(self.unet, self.control(defect_type), self.empty_context())

    def role_modules(self, defect_type: str) -> dict[str, nn.Module]:
        return {
            "vae_encoder": VAEEncoderNet(self.vae),
            "trimap_encoder": TrimapEncoderNet(self.control(defect_type)),
            "unet": self.controlled_unet(defect_type),
            "vae_decoder": VAEDecoderNet(self.vae),
        }
