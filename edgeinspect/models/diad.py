"""The DiAD model: autoencoder, UNet, SG network and prompt encoder, and the per-role modules that
the loops call (and that export turns into graphs)."""

from __future__ import annotations

import torch
from torch import nn

from edgeinspect.config import DiADConfig
from edgeinspect.models.autoencoder import AnchoredAutoencoderKL
from edgeinspect.models.backbones import build_unet, build_vae
from edgeinspect.models.guidance import GuidanceNet, GuidedUNet
from edgeinspect.models.prompt import build_prompt_encoder


class VAEEncoderNet(nn.Module):
    """image in [-1, 1] -> scaled posterior mean (a sample would make scores non-deterministic)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mean * self.vae.config.scaling_factor


class VAEAnchorEncoderNet(nn.Module):
    """The `vae_anchor_encoder` role: an anchored autoencoder's encode without its learnt residual (scaled
    like `vae_encoder`'s latent)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.anchor_only_encode(image) * self.vae.config.scaling_factor


def encoder_roles(vae: nn.Module) -> dict[str, nn.Module]:
    """The encoder roles of an autoencoder: `vae_encoder`, and `vae_anchor_encoder` when it is anchored."""
    roles: dict[str, nn.Module] = {"vae_encoder": VAEEncoderNet(vae)}
    if isinstance(vae, AnchoredAutoencoderKL):
        roles["vae_anchor_encoder"] = VAEAnchorEncoderNet(vae)
    return roles


class VAEDecoderNet(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.vae.config.scaling_factor).sample


class VAEAnchorDecoderNet(nn.Module):
    """The `vae_anchor_decoder` role: an anchored autoencoder's decode without its learnt residual."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.anchor_only_decode(latent / self.vae.config.scaling_factor)


def decoder_roles(vae: nn.Module) -> dict[str, nn.Module]:
    """The decoder roles of an autoencoder: `vae_decoder`, and `vae_anchor_decoder` when it is anchored."""
    roles: dict[str, nn.Module] = {"vae_decoder": VAEDecoderNet(vae)}
    if isinstance(vae, AnchoredAutoencoderKL):
        roles["vae_anchor_decoder"] = VAEAnchorDecoderNet(vae)
    return roles


class HintNet(nn.Module):
    def __init__(self, guidance: GuidanceNet):
        super().__init__()
        self.guidance = guidance

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.guidance.encode_hint(image)


class LatentDiffusionModel(nn.Module):
    """Autoencoder, UNet and prompt encoder under fixed names (`vae.`, `unet.`, `prompt_encoder.`), so
    one method's checkpoint can seed another's (GLAD starts from DiAD's domain-trained UNet)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vae = build_vae(cfg.model)
        self.unet = build_unet(cfg.model)
        self.prompt_encoder = build_prompt_encoder(cfg.model)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def set_scaling_factor(self, value: float) -> None:
        self.vae.register_to_config(scaling_factor=float(value))

    def fit_latent_statistics(self, latents: torch.Tensor) -> torch.Tensor:
        """Centre (anchored autoencoders, whose latent is a picture) and scale the autoencoder's
        latents to unit variance, from `latents` = the training set's encoded posterior means; returns
        them as the diffusion model will see them."""
        if hasattr(self.vae, "set_latent_shift"):
            mean = latents.mean()
            self.vae.set_latent_shift(float(self.vae.latent_shift) + float(mean))
            latents = latents - mean
        self.set_scaling_factor(1.0 / float(latents.std()))
        return latents * self.scaling_factor

    def context(self, prompt: str, batch: int = 1) -> torch.Tensor:
        return self.prompt_encoder([prompt] * batch)


class DiADModel(LatentDiffusionModel):
    """All trainable DiAD parts in one module, so one state dict is one checkpoint."""

    def __init__(self, cfg: DiADConfig):
        super().__init__(cfg)
        self.guidance = GuidanceNet(self.unet, cfg.guidance, cfg.model.vae.downsample_factor)

    def reset_guidance_from_unet(self) -> None:
        """Re-copy the SG encoder from the (now trained) UNet, as ControlNet initialises its copy."""
        fresh = GuidanceNet(self.unet, self.cfg.guidance, self.cfg.model.vae.downsample_factor)
        self.guidance.load_state_dict(fresh.state_dict())

    def role_modules(self) -> dict[str, nn.Module]:
        return {
            **encoder_roles(self.vae),
            "hint_encoder": HintNet(self.guidance),
            "unet": GuidedUNet(self.unet, self.guidance),
            **decoder_roles(self.vae),
        }
