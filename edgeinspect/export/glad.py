"""The GLAD networks as export roles: the loop's four (vae_encoder, unet_plain, vae_decoder, features) and
the normal-feature bank search (`bank_distance`, DiAD's builder: the bank and hybrid references).

GLAD runs the same autoencoder and feature extractor as DiAD (GLADModel.role_modules uses the same
VAE wrappers), so those builders are DiAD's; the UNet is the plain one (no guidance, no hint input).

Batch sizes the loop uses for B frames and n = inference.draws noise draws, run as one batch of
R = n x B rows (what TensorRT profiles must cover; onnxruntime takes any batch):
  vae_encoder  B            unet_plain  1..R (the ADP check runs the UNet on the rows not yet fired)
  vae_decoder  1..2R        (the ADP check decodes both clean estimates of the checked rows at once)
  features     2..2R        (rows and references together), at feature_size and adp_feature_size
`batch_multiplier` can express only one factor: the decoder keeps 1 and the pipeline builds its
profiles for max_batch x 2n frames (`runtime.detector.bundle_pipeline`).

The method settings (ADP threshold resolved from the config or the checkpoint's calibration, t0, steps,
min_step, top-K...) are written into the manifest by `glad_method_settings`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from edgeinspect.export.diad import (bank_distance_role, vae_anchor_decoder_role, vae_anchor_encoder_role,
                                    vae_decoder_role, vae_encoder_role)
from edgeinspect.export.examples import IMAGE_AXES, LATENT_AXES, ExportSizes, random_images, seeded_generator
from edgeinspect.export.roles import ExportContext, RoleExport, register_role
from edgeinspect.runtime.glad import resolve_weight_bounds, usable_calibration
from edgeinspect.core.roles import feature_signature
from edgeinspect.models.features import FeatureNet

METHOD = "glad"


def _unet_inputs(ctx: ExportContext, batch: int, latent: int, timesteps: list[float], seed: int
                 ) -> dict[str, torch.Tensor]:
    s = ExportSizes(ctx.cfg)
    if ctx.context is None:
        raise ValueError("the GLAD export needs the prompt context (ExportContext.context)")
    return {
        "sample": torch.randn(batch, s.latent_channels, latent, latent, generator=seeded_generator(seed)),
        "timestep": torch.tensor(timesteps, dtype=torch.float32),
        "encoder_hidden_states": ctx.context.detach().float().expand(batch, *ctx.context.shape[1:]).contiguous(),
    }


register_role(METHOD, "vae_encoder")(vae_encoder_role)
register_role(METHOD, "vae_anchor_encoder")(vae_anchor_encoder_role)


@register_role(METHOD, "unet_plain")
def _unet_plain(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    inf = ctx.cfg.inference
    module = ctx.model.role_modules()["unet_plain"]
    axes = {"sample": LATENT_AXES, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"}}
    return RoleExport(
        "unet_plain", module,
        _unet_inputs(ctx, 2, s.latent, [float(inf.t0), float(inf.min_step)], 21),
        _unet_inputs(ctx, 3, s.probe_latent, [999.0, 99.0, 0.0], 23),
        ("noise_pred",), axes,
        notes="the UNet without guidance: denoising steps and the ADP checks (1..B frames per call)",
    )


register_role(METHOD, "vae_decoder")(vae_decoder_role)
register_role(METHOD, "vae_anchor_decoder")(vae_anchor_decoder_role)


@register_role(METHOD, "features")
def _features(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    if ctx.features is None:
        raise ValueError("the GLAD export needs the feature extractor (ExportContext.features)")
    _, outputs = feature_signature(len(ctx.features.strides))
    return RoleExport(
        "features", FeatureNet(ctx.features), {"image": random_images(4, s.feature, 25)},
        {"image": random_images(6, s.probe_feature, 26)}, outputs, {"image": IMAGE_AXES},
        batch_multiplier=2,
        notes="called with frames and references concatenated (2 x the checked or scored frames), at "
              "scoring.feature_size and, for the ADP checks, scoring.adp_feature_size",
    )


register_role(METHOD, "bank_distance")(bank_distance_role)


def glad_method_settings(cfg: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The GLAD settings a deployment runs with, for the manifest: the category's inference settings, the
    ADP firing threshold and the linear SAFF weight's bounds, each from the config when set there, else
    the ones calibrated at the end of training (checkpoint state `adp_threshold`, `adp_weight_bounds`),
    else none (frames then fire only below min_step; a linear weight without bounds is an error)."""
    extra = extra or {}
    category = cfg.category
    inf = cfg.inference.for_category(category)
    calibrated, bounds = usable_calibration(inf, extra.get("adp_calibration"), extra.get("adp_threshold"),
                                            extra.get("adp_weight_bounds"))
    if inf.threshold is not None:
        thr, source = float(inf.threshold), "config"
    elif calibrated is not None and math.isfinite(float(calibrated)):
        thr, source = float(calibrated), "checkpoint"
    else:
        thr, source = None, "none"
    low, high = resolve_weight_bounds(inf, bounds)
    bounds_source = ("none" if low is None or high is None else
                     "config" if inf.weight_low is not None and inf.weight_high is not None else "checkpoint")
    return {
        "category": category, "t0": inf.t0, "steps": inf.steps, "min_step": inf.min_step,
        "check_every": inf.check_every, "adp_space": inf.adp_space, "adp_threshold": thr, "adp_threshold_source": source,
        "top_k": inf.top_k, "adp_top_k": inf.adp_top_k, "weight_mode": inf.weight_mode,
        "weight_low": low, "weight_high": high, "weight_bounds_source": bounds_source,
        "weight_gamma": inf.weight_gamma,
        "seed": inf.seed, "draws": inf.draws,
        "feature_size": cfg.scoring.feature_size, "adp_feature_size": cfg.scoring.adp_feature_size,
        "blur_sigma": cfg.scoring.blur_sigma,
        # the space the checkpoint's calibration was proposed in (also where the config's own threshold is used)
        "adp_calibration": {**{k: v for k, v in (extra.get("adp_calibration") or {}).items() if k != "max_scores"},
                            **({"adp_space": inf.adp_space} if source != "none" else {})},
    }
