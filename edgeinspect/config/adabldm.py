"""AdaBLDM's config: foreground, placement, trimap control, training and blended sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edgeinspect.config.base import GuidanceConfig, Strict, TrainLoopConfig



class ForegroundConfig(Strict):
    """Where a defect may be placed: "whole" image (textures), "otsu", or "features" (k-means of
    pretrained features with the border-is-background prior, for objects)."""

    method: Literal["whole", "otsu", "features"] = "whole"
    min_fraction: float = Field(0.05, ge=0, le=1)


class PlacementConfig(Strict):
    """Random affine of a real seed mask before it is fitted into the foreground (the fields are
    `data.trimap.place_mask`'s keyword arguments)."""

    rotation: tuple[float, float] = (0.0, 360.0)
    scale: tuple[float, float] = (0.85, 1.15)
    tries: int = Field(50, ge=1)
    # Masks too large for the foreground are shrunk, down to this factor, before giving up.
    min_shrink: float = Field(0.25, gt=0, le=1)
    # > 0: a seed mask reaching within this many px of its picture's frame is an edge defect (MTD's
    # chipped tile edges): mirrored and turned, and kept on the target foreground's edge
    # (`data.trimap.place_mask`). 0: every seed is placed anywhere (the paper).
    edge_band: int = Field(0, ge=0)
    # An edge seed's turns: "half" = 0/180 degrees (with the mirror: it stays on an edge parallel to
    # its own and a texture's grain keeps its direction); "quarter" = any multiple of 90 (objects
    # without a preferred direction).
    edge_turns: Literal["half", "quarter"] = "half"


class TrimapControlConfig(GuidanceConfig):
    """The trimap encoder: hint stack + ControlNet copy injecting into every decoder skip and the
    middle block (no SFF: that is DiAD's)."""

    injection: Literal["mid", "full"] = "full"
    sff: bool = False


class AdaBLDMTrainConfig(TrainLoopConfig):
    # The object name in the prompts "a {object} with a {defect}" (normals: "a {object}").
    object_name: str = "object"
    defect_prompt: str = "a {object} with a {defect}"
    normal_prompt: str = "a {object}"
    empty_prompt_ratio: float = Field(0.1, ge=0, le=1)
    # Real seed defects: a few-shot split file (its `adabldm_seeds`) or explicit {type: [names]}.
    split_file: Path | None = None
    seeds: dict[str, list[str]] = {}
    defect_types: list[str] | None = None  # null: every type with seeds
    # Base model with vae./unet./prompt_encoder. weights (a DiAD run: its unet-final checkpoint).
    # null: the autoencoder and UNet train from scratch here first (DiAD's stages 1-2).
    init_from: Path | None = None
    # (a) domain pretraining of UNet + prompt encoder on all normals and seeds with their prompts;
    # seeds are a few dozen against hundreds of normals, so they get a fixed share of each batch.
    domain_steps: int = Field(1000, ge=0)
    domain_lr: float = 1e-4
    seed_fraction: float = Field(0.25, ge=0, le=1)
    # (b) per defect type: the trimap control branch alone on cut-paste composites (paper: 1e-5
    # from SD weights; a small from-scratch model needs a larger one in CPU-hours).
    control_steps: int = Field(1000, ge=0)
    control_lr: float = 1e-5
    # Control loss weighted 1 + w on the pasted defect's latent cells (0: the paper's plain noise
    # loss): the defect covers a few percent of a composite, so unweighted the control learns mostly
    # to reproduce the tile. `training.base.defect_weighted_mse`.
    defect_loss_weight: float = Field(0.0, ge=0)


# What `sampling.paste_feather` pastes into the real source/background image S with the feathered mask
# weight w: "image" = the generated image G itself, w G + (1 - w) S (inside the mask the defect has
# the autoencoder's smooth texture, which a downstream model then learns as "defect"); "residual" =
# the change the diffusion made, S + w (G - R), R = the decoder's reconstruction of S's latent: the
# defect keeps S's fine texture (edgeinspect.runtime.blended.paste_residual).
PasteMode = Literal["image", "residual"]


class AdaBLDMSamplingConfig(Strict):
    # Algorithm 1 on one DDIM schedule of free + latent + pixel steps (the authors' code: 26/20/5).
    free_steps: int = Field(26, ge=0)
    latent_steps: int = Field(20, ge=0)
    pixel_steps: int = Field(5, ge=0)
    # The latent blend uses the mask dilated by this many latent pixels after downsampling, so the
    # latent region the model may change covers the whole defect.
    mask_dilation: int = Field(1, ge=0)
    guidance_scale: float = Field(1.0, ge=1.0)  # >1: classifier-free guidance with the empty prompt
    # What the unguided row of classifier-free guidance sees as trimap: "same" (the defect trimap, as
    # ControlNet pipelines do: guidance amplifies the prompt only) or "no_defect" (the trimap with its
    # defect region made plain foreground: guidance then also amplifies what the control draws into
    # the defect region; an extension).
    uncond_trimap: Literal["same", "no_defect"] = "same"
    # Paste the generated defect back into the exact source image (an extension): weight 1 on the
    # mask, falling to 0 over `paste_feather` px outside it, so every pixel farther away is the real
    # normal image, not its autoencoder reconstruction (a small autoencoder blurs the whole frame).
    # None: off (the paper). `paste_mode`: PasteMode. On MTD neither mode raised the downstream pixel AP
    # (benchmarks/results/adabldm_mtd.md).
    paste_feather: int | None = Field(None, ge=1)
    paste_mode: PasteMode = "image"
    # Algorithm 2: online decoder adaptation (PyTorch, fresh decoder copy per sample).
    adapt_steps: int = Field(200, ge=0)
    adapt_lr: float = 1e-4
    lambda_con: float = 100.0
    # "decoder": the whole decoder adapts (the paper); "last_up_block": only its full-resolution
    # tail, its input computed once (several times cheaper per step on a CPU).
    adapt_scope: Literal["decoder", "last_up_block"] = "decoder"
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    placement: PlacementConfig = PlacementConfig()

    @property
    def total_steps(self) -> int:
        return self.free_steps + self.latent_steps + self.pixel_steps

    @model_validator(mode="after")
    def _residual_replaces_adaptation(self):
        if self.paste_feather is not None and self.paste_mode == "residual" and self.adapt_steps:
            raise ValueError("paste_mode 'residual' takes the defect's change from the original decoder and the "
                             "real source image everywhere else, which is what decoder adaptation approximates: "
                             "set adapt_steps: 0 with it")
        return self
