"""The AdaBLDM networks as export roles, one defect type per bundle: the loop's four (vae_encoder,
trimap_encoder, unet with the type's trimap control branch fused in, vae_decoder) and the control
branch on its own (`control`), plus what a generation job needs besides graphs.

One type per bundle: every role keeps the name and signature that the loop (runtime/blended.py)
calls, so the bundle loads and verifies like any other and TensorRT profiles need nothing new. A run
with several types is exported once per type (`edgeinspect export --model RUN --defect-type TYPE`);
the autoencoder is then in each bundle, which is cheap next to the UNet.

Besides the graphs a bundle carries (`adabldm_bundle_parts`):
  contexts         "defect" (the type's prompt: the loop's condition) and "empty" (the unconditional
                   rows of classifier-free guidance); the control branch's own empty-prompt context
                   is a constant inside the unet and control graphs
  payload          "decoder": the LatentDecoder weights (post_quant_conv + decoder) that Algorithm 2
                   adapts per sample in PyTorch; "seed_masks": the type's real seed masks at the model
                   size (uint8 0/1, (k, H, W)), which the placement transforms
  method_settings  defect type, prompts, seed-defect names (in the order of the masks) and the
                   autoencoder's diffusers config and scaling factor (to rebuild the decoder without
                   the training machine's files, e.g. the sd15 folder)
so a workstation needs the bundle and a folder of normal images only.

Dynamic axes as DiAD's: batch everywhere; height/width in multiples of the VAE factor (VAE, trimap
encoder) and latent multiples of 2**(UNet levels - 1) (unet, control). Under classifier-free guidance
(the exported sampling.guidance_scale > 1) the unet sees twice the samples per call: its batch
multiplier, which the TensorRT profiles follow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeinspect.core.roles import residual_outputs
from edgeinspect.export.examples import IMAGE_AXES, LATENT_AXES, UNET_AXES, ExportSizes, random_images, seeded_generator
from edgeinspect.export.onnx import ExportError
from edgeinspect.export.roles import ExportContext, RoleExport, register_role
from edgeinspect.models.diad import VAEDecoderNet, VAEEncoderNet
from edgeinspect.runtime.adaptation import LatentDecoder
from edgeinspect.training.adabldm import defect_prompt, load_seeds, run_seed_names

METHOD = "adabldm"


class TrimapControlResiduals(nn.Module):
    """The trimap control branch alone: (sample, timestep, hint) -> down_0..down_k, mid, with the
    empty-prompt context it always sees as a constant (as ControlledUNet gives it)."""

    def __init__(self, control: nn.Module, empty_context: torch.Tensor):
        super().__init__()
        self.control = control
        self.register_buffer("empty_context", empty_context.detach().clone(), persistent=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, hint: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx = self.empty_context.expand(sample.shape[0], *self.empty_context.shape[1:])
        down, mid = self.control(sample, timestep, ctx, hint)
        return (*down, mid)


def _defect_type(ctx: ExportContext) -> str:
    if "defect_type" not in ctx.extra:
        raise ExportError("the AdaBLDM export needs the defect type (role option 'defect_type')")
    return ctx.extra["defect_type"]


def _trimaps(batch: int, size: int, seed: int) -> torch.Tensor:
    """Trimaps as the loop feeds them: background 0, foreground 0.5, defect 1."""
    return torch.randint(0, 3, (batch, 1, size, size), generator=seeded_generator(seed)).float() / 2


def _rows(ctx: ExportContext, batch: int, unconditional: int) -> torch.Tensor:
    """Prompt rows as classifier-free guidance batches them: `unconditional` empty rows, then defect rows."""
    missing = {"defect", "empty"} - set(ctx.contexts)
    if missing:
        raise ExportError(f"the AdaBLDM export needs the prompt contexts {sorted(missing)}")
    rows = [ctx.contexts["empty"]] * unconditional + [ctx.contexts["defect"]] * (batch - unconditional)
    return torch.cat(rows).float().contiguous()


def _step_inputs(ctx: ExportContext, batch: int, latent: int, image: int, timesteps: list[float], seed: int
                 ) -> dict[str, torch.Tensor]:
    s = ExportSizes(ctx.cfg)
    trimap_encoder = ctx.model.role_modules(_defect_type(ctx))["trimap_encoder"].eval()
    with torch.no_grad():
        hint = trimap_encoder(_trimaps(batch, image, seed)).contiguous()
    return {
        "sample": torch.randn(batch, s.latent_channels, latent, latent, generator=seeded_generator(seed + 1)),
        "timestep": torch.tensor(timesteps, dtype=torch.float32),
        "encoder_hidden_states": _rows(ctx, batch, unconditional=batch // 3),
        "hint": hint,
    }


@register_role(METHOD, "vae_encoder")
def _vae_encoder(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    return RoleExport("vae_encoder", VAEEncoderNet(ctx.model.vae), {"image": random_images(2, s.image, 31)},
                      {"image": random_images(3, s.probe_image, 32)}, ("latent",), {"image": IMAGE_AXES},
                      fp16=False, notes="scaled posterior mean of the normal image (and of each pixel-stage "
                                        "blend); kept fp32 in the fp16 variant")


@register_role(METHOD, "trimap_encoder")
def _trimap_encoder(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    module = ctx.model.role_modules(_defect_type(ctx))["trimap_encoder"]
    return RoleExport("trimap_encoder", module, {"trimap": _trimaps(2, s.image, 33)},
                      {"trimap": _trimaps(3, s.probe_image, 34)}, ("hint",), {"trimap": IMAGE_AXES},
                      notes="trimap (B,1,H,W) in {0, 0.5, 1} -> hint at latent resolution; once per sample")


@register_role(METHOD, "unet")
def _unet(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    module = ctx.model.role_modules(_defect_type(ctx))["unet"]
    return RoleExport(
        "unet", module,
        _step_inputs(ctx, 2, s.latent, s.image, [999.0, 499.0], 35),
        _step_inputs(ctx, 3, s.probe_latent, s.probe_image, [999.0, 99.0, 0.0], 37),
        ("noise_pred",), UNET_AXES, batch_multiplier=2 if ctx.cfg.sampling.guidance_scale > 1 else 1,
        notes="UNet with the trimap control branch fused in (its empty-prompt context a constant): one call "
              "per step, 2 x the samples under classifier-free guidance",
    )


@register_role(METHOD, "vae_decoder")
def _vae_decoder(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    return RoleExport(
        "vae_decoder", VAEDecoderNet(ctx.model.vae),
        {"latent": torch.randn(2, s.latent_channels, s.latent, s.latent, generator=seeded_generator(39))},
        {"latent": torch.randn(3, s.latent_channels, s.probe_latent, s.probe_latent, generator=seeded_generator(40))},
        ("image",), {"latent": LATENT_AXES}, fp16=False,
        notes="the loop's decodes (pixel stage, result before adaptation); the adaptation itself runs on the "
              "payload decoder in PyTorch; kept fp32 in the fp16 variant",
    )


@register_role(METHOD, "control")
def _control(ctx: ExportContext) -> RoleExport:
    s = ExportSizes(ctx.cfg)
    control = ctx.model.control(_defect_type(ctx))
    module = TrimapControlResiduals(control, ctx.model.empty_context())
    outputs = residual_outputs(len(control.slots))

    def inputs(*args) -> dict[str, torch.Tensor]:
        step = _step_inputs(ctx, *args)
        return {k: step[k] for k in ("sample", "timestep", "hint")}

    return RoleExport(
        "control", module,
        inputs(2, s.latent, s.image, [999.0, 499.0], 41), inputs(3, s.probe_latent, s.probe_image, [999.0, 99.0, 0.0], 43),
        outputs, {k: UNET_AXES[k] for k in ("sample", "timestep", "hint")}, pipeline=False,
        notes="the trimap control branch alone (its residuals, as diffusers' UNet takes them); the loop uses "
              "the fused unet",
    )


def adabldm_bundle_parts(cfg: Any, model: nn.Module, checkpoint: Path, defect_type: str | None,
                         data_root: str | Path | None) -> dict[str, Any]:
    """`write_bundle` keyword arguments for one defect type of an AdaBLDM run: contexts, payload
    (decoder weights, seed masks), method settings and the role option naming the type."""
    types = list(model.defect_types)
    if defect_type is None:
        if len(types) > 1:
            raise ExportError(f"this AdaBLDM run has defect types {types}: a bundle holds one, export each with "
                              "--defect-type TYPE")
        defect_type = types[0]
    if defect_type not in types:
        raise ExportError(f"this AdaBLDM run has no control branch for {defect_type!r} (it has {types})")
    root = data_root or cfg.train.data_root
    if root is None or not Path(root).is_dir():
        raise ExportError(f"the seed masks are read from the run's data folder ({root}); pass the folder with --data")
    seeds = load_seeds(Path(root), {defect_type: run_seed_names(checkpoint)[defect_type]},
                       cfg.model.image_size)[defect_type]
    prompt = defect_prompt(cfg, defect_type)
    with torch.no_grad():
        contexts = {"defect": model.prompt_encoder([prompt]), "empty": model.prompt_encoder([""])}
    # the diffusers config through JSON, as the manifest stores it (tuples -> lists)
    vae_config = json.loads(json.dumps(dict(model.vae.config)))
    settings = {
        "defect_type": defect_type,
        "prompts": {"defect": prompt, "empty": ""},
        "seed_defects": list(seeds.names),
        "decoder": {"vae_config": vae_config, "scaling_factor": model.scaling_factor},
    }
    payload = {"decoder": LatentDecoder.from_vae(model.vae).state_dict(),
               "seed_masks": {"masks": seeds.masks.to(torch.uint8)}}
    return {"contexts": contexts, "payload": payload, "method_settings": settings,
            "role_options": {"defect_type": defect_type}}
