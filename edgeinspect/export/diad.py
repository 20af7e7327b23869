"""The DiAD networks as export roles: the loop's five (vae_encoder, hint_encoder, unet with the SG
network fused in, vae_decoder, features), the normal-feature bank search (`bank_distance`, used by the bank
and hybrid references) and the SG network on its own (`guidance`).

Every graph is dynamic in batch. The VAE, hint encoder, UNet and feature extractor are also dynamic
in height/width (checked at export by the probe inputs at another size): the UNet needs latent sizes
that are multiples of 2**(UNet levels - 1), the VAE/hint encoder image sizes that are multiples of
the VAE downsampling factor; the feature extractor's TF-"SAME" padding is traced as shape arithmetic
(Shape/Ceil/Pad), so any size works. TensorRT profiles pin height/width to the deployment size.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeinspect.export.roles import ExportContext, RoleExport, register_role
from edgeinspect.core.roles import bank_distance_signature, feature_signature, residual_outputs
from edgeinspect.export.examples import (
    IMAGE_AXES,
    LATENT_AXES,
    UNET_AXES,
    ExportSizes,
    bank_distance_inputs,
    random_images,
    seeded_generator,
)
from edgeinspect.models.features import BankDistance, FeatureNet

METHOD = "diad"


class GuidanceResidualsNet(nn.Module):
    """The SG network alone: (sample, timestep, encoder_hidden_states, hint) -> down_0..down_k, mid."""

    def __init__(self, guidance: nn.Module):
        super().__init__()
        self.guidance = guidance

    def forward(self, sample, timestep, encoder_hidden_states, hint) -> tuple[torch.Tensor, ...]:
        down, mid = self.guidance(sample, timestep, encoder_hidden_states, hint)
        return (*down, mid)


def _context(ctx: ExportContext, batch: int) -> torch.Tensor:
    assert ctx.context is not None, "the DiAD export needs the prompt context"
    return ctx.context.detach().float().expand(batch, *ctx.context.shape[1:]).contiguous()


@register_role(METHOD, "vae_encoder")
def vae_encoder_role(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    module = ctx.model.role_modules()["vae_encoder"]
    return RoleExport("vae_encoder", module, {"image": random_images(2, s.image, 1)}, {"image": random_images(3, s.probe_image, 2)},
                      ("latent",), {"image": IMAGE_AXES}, fp16=False,
                      notes="scaled posterior mean; kept fp32 in the fp16 variant")


@register_role(METHOD, "hint_encoder")
def _hint_encoder(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    module = ctx.model.role_modules()["hint_encoder"]
    return RoleExport("hint_encoder", module, {"image": random_images(2, s.image, 3)}, {"image": random_images(3, s.probe_image, 4)},
                      ("hint",), {"image": IMAGE_AXES})


def _unet_inputs(ctx: ExportContext, batch: int, latent: int, image: int, timesteps: list[float], seed: int):
    s = ExportSizes(ctx.cfg)
    hint_net = ctx.model.role_modules()["hint_encoder"].eval()
    with torch.no_grad():
        hint = hint_net(random_images(batch, image, seed))
    return {
        "sample": torch.randn(batch, s.latent_channels, latent, latent, generator=seeded_generator(seed + 1)),
        "timestep": torch.tensor(timesteps, dtype=torch.float32),
        "encoder_hidden_states": _context(ctx, batch),
        "hint": hint.contiguous(),
    }



@register_role(METHOD, "unet")
def _unet(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    module = ctx.model.role_modules()["unet"]
    return RoleExport(
        "unet", module,
        _unet_inputs(ctx, 2, s.latent, s.image, [999.0, 499.0], 5),
        _unet_inputs(ctx, 3, s.probe_latent, s.probe_image, [999.0, 99.0, 0.0], 7),
        ("noise_pred",), UNET_AXES,
        notes="UNet with the SG network fused in: one call per DDIM step",
    )


@register_role(METHOD, "vae_anchor_encoder")
def vae_anchor_encoder_role(ctx: ExportContext) -> RoleExport | None:
    """The anchored autoencoder's resize encoder (scoring.encoder anchor); none for a KL autoencoder."""
    module = ctx.model.role_modules().get("vae_anchor_encoder")
    if module is None:
        return None
    s = ExportSizes(ctx.cfg)
    return RoleExport(
        "vae_anchor_encoder", module, {"image": random_images(2, s.image, 17)},
        {"image": random_images(3, s.probe_image, 18)}, ("latent",), {"image": IMAGE_AXES}, fp16=False,
        notes="the encoder without its learnt residual: area downscale + pixel unshuffle (scoring.encoder anchor)",
    )


@register_role(METHOD, "vae_decoder")
def vae_decoder_role(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    module = ctx.model.role_modules()["vae_decoder"]
    return RoleExport(
        "vae_decoder", module,
        {"latent": torch.randn(2, s.latent_channels, s.latent, s.latent, generator=seeded_generator(9))},
        {"latent": torch.randn(3, s.latent_channels, s.probe_latent, s.probe_latent, generator=seeded_generator(10))},
        ("image",), {"latent": LATENT_AXES}, fp16=False, notes="kept fp32 in the fp16 variant",
    )


@register_role(METHOD, "vae_anchor_decoder")
def vae_anchor_decoder_role(ctx: ExportContext) -> RoleExport | None:
    """The anchored autoencoder's resize decoder (scoring.decoder anchor); none for a KL autoencoder."""
    module = ctx.model.role_modules().get("vae_anchor_decoder")
    if module is None:
        return None
    s = ExportSizes(ctx.cfg)
    return RoleExport(
        "vae_anchor_decoder", module,
        {"latent": torch.randn(2, s.latent_channels, s.latent, s.latent, generator=seeded_generator(19))},
        {"latent": torch.randn(3, s.latent_channels, s.probe_latent, s.probe_latent, generator=seeded_generator(20))},
        ("image",), {"latent": LATENT_AXES}, fp16=False,
        notes="the decoder without its learnt residual: pixel shuffle + bicubic upscale (scoring.decoder anchor)",
    )


@register_role(METHOD, "features")
def _features(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    if ctx.features is None:
        raise ValueError("the DiAD export needs the feature extractor (ExportContext.features)")
    levels = len(ctx.features.strides)
    _, outputs = feature_signature(levels)
    return RoleExport(
        "features", FeatureNet(ctx.features), {"image": random_images(4, s.feature, 11)},
        {"image": random_images(6, s.probe_feature, 12)}, outputs, {"image": IMAGE_AXES}, batch_multiplier=2,
        notes="called with the frames and their reconstructions concatenated (2 x batch)",
    )


@register_role(METHOD, "bank_distance")
def bank_distance_role(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    if ctx.features is None:
        raise ValueError("the bank_distance export needs the feature extractor (ExportContext.features)")
    levels = len(ctx.features.strides)
    inputs, outputs = bank_distance_signature(levels)
    size = ctx.cfg.scoring.bank.size
    axes = {name: ({0: "batch", 2: f"height_{name[-1]}", 3: f"width_{name[-1]}"} if name.startswith("feature_")
                   else {0: "bank"}) for name in inputs}
    return RoleExport(
        "bank_distance", BankDistance(levels), bank_distance_inputs(ctx.features, s.feature, size, 2, 17),
        bank_distance_inputs(ctx.features, s.probe_feature, max(1, size // 2), 3, 19), outputs, axes,
        fp16=False, notes="per level, each position's cosine distance to the nearest bank vector (MatMul + "
                          "ReduceMax; the bank an input: the payload 'bank', scoring.bank.size rows per level); "
                          "called with the frames only, in chunks of scoring.bank.chunk_mb",
    )


@register_role(METHOD, "guidance")
def _guidance(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    n_down = len(ctx.model.guidance.slots)
    outputs = residual_outputs(n_down)
    return RoleExport(
        "guidance", GuidanceResidualsNet(ctx.model.guidance),
        _unet_inputs(ctx, 2, s.latent, s.image, [999.0, 499.0], 13),
        _unet_inputs(ctx, 3, s.probe_latent, s.probe_image, [999.0, 99.0, 0.0], 15),
        outputs, UNET_AXES, pipeline=False,
        notes="the SG network alone (its residuals, as diffusers' UNet takes them); the loop uses the fused unet",
    )
