"""The DualAnoDiff networks as export roles: vae_encoder (the BCM backgrounds), the dual-branch UNet
and vae_decoder, plus the loop's prompt contexts.

The dual-branch UNet is one graph for both LoRA branches with SAIM and BCM: `dual_unet` when the
model has BCM (inputs include the noised background latent), `dual_unet_plain` without; the builder
of the role that does not apply returns None. The per-row-block LoRA layers and the SAIM/BCM hooks
trace as they are: the row-block count (2 or 3) is a constant of each graph, and every per-branch
operation is a reshape to (blocks, n, ...) of the traced batch size, so batch and latent size stay
dynamic (checked by the probe at another batch and size).

Batch multipliers (what TensorRT profiles must cover per sample): the dual UNet sees each pair twice
under classifier-free guidance (the exported sampling.guidance_scale != 1: conditional and empty-prompt
rows); the decoder decodes the whole and part latents of every pair in one call (2x).

Contexts in the bundle: "whole", "part" and "empty" (the bundle's single `context` is "whole").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from edgeinspect.export.diad import vae_decoder_role, vae_encoder_role
from edgeinspect.export.examples import LATENT_AXES, ExportSizes, seeded_generator
from edgeinspect.export.onnx import ExportError
from edgeinspect.export.roles import ExportContext, RoleExport, register_role

METHOD = "dualanodiff"
_PAIR_AXES = {"sample_whole": LATENT_AXES, "sample_part": LATENT_AXES,
              "background": LATENT_AXES, "timestep": {0: "batch"}, "ctx_whole": {0: "batch"},
              "ctx_part": {0: "batch"}}


def _rows(ctx: ExportContext, name: str, batch: int) -> torch.Tensor:
    """Prompt rows as the guided loop batches them: conditional rows, then a third of empty ones."""
    missing = {"whole", "part", "empty"} - set(ctx.contexts)
    if missing:
        raise ExportError(f"the DualAnoDiff export needs the prompt contexts {sorted(missing)}")
    empty = batch // 3
    return torch.cat([ctx.contexts[name]] * (batch - empty) + [ctx.contexts["empty"]] * empty).float().contiguous()


def _pair_inputs(ctx: ExportContext, batch: int, latent: int, timesteps: list[float], seed: int, background: bool
                 ) -> dict[str, torch.Tensor]:
    s = ExportSizes(ctx.cfg)
    g = seeded_generator(seed)

    def noise() -> torch.Tensor:
        return torch.randn(batch, s.latent_channels, latent, latent, generator=g)

    inputs = {"sample_whole": noise(), "sample_part": noise()}
    if background:
        inputs["background"] = noise()
    inputs.update(timestep=torch.tensor(timesteps, dtype=torch.float32), ctx_whole=_rows(ctx, "whole", batch),
                  ctx_part=_rows(ctx, "part", batch))
    return inputs


def _dual(ctx: ExportContext, role: str, background: bool) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    inputs = _pair_inputs(ctx, 2, s.latent, [999.0, 499.0], 51, background)
    return RoleExport(
        role, ctx.model.role_modules()[role], inputs,
        _pair_inputs(ctx, 3, s.probe_latent, [999.0, 99.0, 0.0], 53, background),
        ("noise_whole", "noise_part"), {k: _PAIR_AXES[k] for k in inputs},
        batch_multiplier=2 if ctx.cfg.sampling.guidance_scale != 1.0 else 1,
        notes="frozen UNet with the whole/part LoRA branches, SAIM" + (" and BCM" if background else "") +
              " in one call per step; 2 x the pairs under classifier-free guidance",
    )


register_role(METHOD, "vae_encoder")(vae_encoder_role)


@register_role(METHOD, "dual_unet")
def _dual_unet(ctx: ExportContext) -> RoleExport | None:
    return _dual(ctx, "dual_unet", background=True) if ctx.cfg.bcm.enabled else None


@register_role(METHOD, "dual_unet_plain")
def _dual_unet_plain(ctx: ExportContext) -> RoleExport | None:
    return None if ctx.cfg.bcm.enabled else _dual(ctx, "dual_unet_plain", background=False)


@register_role(METHOD, "vae_decoder")
def _vae_decoder(ctx: ExportContext) -> RoleExport:
    return dataclasses.replace(vae_decoder_role(ctx), batch_multiplier=2,
                               notes="decodes the whole and part latents of every pair in one call; kept fp32 in "
                                     "the fp16 variant")


def dualanodiff_bundle_parts(cfg: Any, model: nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
    """`write_bundle` keyword arguments for a DualAnoDiff run: the three prompt contexts and the method
    settings (defect type, prompts, BCM)."""
    prompts = {"whole": cfg.prompts.whole_prompt, "part": cfg.prompts.part_prompt, "empty": ""}
    with torch.no_grad():
        contexts = {name: model.prompt_encoder([p]) for name, p in prompts.items()}
    settings = {"defect_type": extra.get("defect_type"), "prompts": prompts, "bcm": cfg.bcm.enabled,
                "base_checkpoint": extra.get("base_checkpoint")}
    return {"contexts": contexts, "method_settings": settings}
