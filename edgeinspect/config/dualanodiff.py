"""DualAnoDiff's config: LoRA branches, SAIM, BCM, prompts, training and dual sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edgeinspect.config.adabldm import PasteMode
from edgeinspect.config.base import Strict, TrainLoopConfig



class LoRABranchConfig(Strict):
    """The two LoRA adapters ("whole", "part") on the frozen UNet's attention projections (and,
    when named, Linear or Conv2d layers elsewhere, e.g. the resnets' conv1/conv2 and conv_out)."""

    rank: int = Field(32, ge=1)
    alpha: float = Field(32.0, gt=0)  # LoRA scaling = alpha / rank
    # Module name suffixes (peft `target_modules`): by default every attention layer's q/k/v/out
    # projections, as in the paper.
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    dropout: float = Field(0.0, ge=0, lt=1)


class SAIMConfig(Strict):
    """Self-attention interaction between the branches, after the listed attention layers of every
    transformer block ("self": attn1, "cross": attn2; empty: no interaction)."""

    after: list[Literal["self", "cross"]] = ["self", "cross"]
    heads: int = Field(4, ge=1)  # must divide the channel count of every attention level


class BCMConfig(Strict):
    """Background compensation: a background latent's self-attention inputs feed the whole-image
    branch's keys/values through an MLP and a gate that starts at 0."""

    enabled: bool = True
    mlp_ratio: float = Field(1.0, gt=0)  # MLP hidden width = ratio x channels
    # "plain": MLP(h_bg) as a freshly initialised MLP (the paper's wording). With the gate at 0 that
    # MLP gets no gradient and the gate's gradient points along random features, so both barely move
    # (measured on MTD: |a| < 0.07 after 600 steps). "residual": h_bg + MLP(h_bg) with the MLP's last
    # layer zero-initialised, so from the first step the gate learns whether attending to the
    # background's own features helps (an extension; same weight names, a different function).
    mlp: Literal["plain", "residual"] = "plain"


class PromptPairConfig(Strict):
    """The nested prompts: whole image "a {object} with {defect}", anomaly part "{defect}". Rare
    words ("vfx", "sks", as DreamBooth suggests) carry little prior, so they fit fast."""

    object_word: str = "vfx"
    defect_word: str = "sks"
    whole: str = "a {object} with {defect}"
    part: str = "{defect}"

    @property
    def whole_prompt(self) -> str:
        return self.whole.format(object=self.object_word, defect=self.defect_word)

    @property
    def part_prompt(self) -> str:
        return self.part.format(object=self.object_word, defect=self.defect_word)


class DualAnoDiffTrainConfig(TrainLoopConfig):
    # Base model with vae./unet./prompt_encoder. weights: a DiAD run (its unet-final checkpoint) or
    # a checkpoint folder. Required: the UNet is frozen here, so it must already know the domain.
    init_from: Path | None = None
    defect_type: str | None = None
    # The few-shot anomaly images of test/<defect_type> (names, with or without suffix): an explicit
    # list, or a split file whose `fewshot[<defect_type>]` lists them.
    images: list[str] | None = None
    split_file: Path | None = None
    # The BCM background of a training pair: "inpainted" (default) = the pair's own image with its
    # defect region removed (the dilated mask filled by inpainting), so the whole image is its
    # background plus the defect and BCM learns to carry the background over, which sampling relies
    # on (a normal image as background -> that image with a defect on it); "normals" = a random
    # normal of train/good (up to `max_backgrounds`, spread evenly), unrelated to the pair.
    background: Literal["inpainted", "normals"] = "inpainted"
    inpaint_dilation: int = Field(5, ge=0)  # px the mask grows by before inpainting (defect halo)
    max_backgrounds: int = Field(64, ge=1)
    # Both prompts dropped together for this fraction of pairs, so the unconditional prediction that
    # classifier-free guidance needs is learnt (a small base never saw the empty prompt).
    empty_prompt_prob: float = Field(0.1, ge=0, le=1)
    steps: int = Field(3000, ge=0)
    lr: float = 2e-5
    batch_size: int = Field(4, ge=1)
    # Both branches' noise loss weighted 1 + w on the defect's latent cells (0: the paper's plain
    # sum of MSEs): the defect is a few percent of the whole image, so unweighted the whole branch
    # learns mostly the tile. `training.base.defect_weighted_mse`.
    defect_loss_weight: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _one_image_source(self) -> "DualAnoDiffTrainConfig":
        if self.images is not None and self.split_file is not None:
            raise ValueError("give train.images or train.split_file, not both")
        return self


class PartMaskConfig(Strict):
    """The mask segmented from the generated anomaly part (the paper's U2-Net is not available
    offline): |part - reference| (max over channels, images in [-1, 1]) above `threshold`,
    morphological opening then closing (elliptic kernels, sizes in pixels; <= 1: off), and
    components smaller than `min_area` pixels dropped. Sizes are at the model image size.

    reference "empty": the empty value 0 the part branch is trained towards; "median": the part
    image's own per-channel median, i.e. its empty level as generated (a briefly trained part
    branch draws the empty background a few grey levels off 0 and with faint texture, which a
    fixed reference turns into whole-image masks; the defect is a small fraction of the image, so
    the median is the background)."""

    reference: Literal["empty", "median"] = "empty"
    threshold: float = Field(0.2, gt=0, lt=2)
    open_kernel: int = Field(3, ge=0)
    close_kernel: int = Field(5, ge=0)
    min_area: int = Field(16, ge=0)


class DualAnoDiffSamplingConfig(Strict):
    steps: int = Field(50, ge=1, le=1000)  # DDIM steps over the whole schedule
    guidance_scale: float = Field(2.5, ge=1.0)  # 1: no classifier-free guidance (half the compute)
    # 1: both branches start from pure noise (the paper). Below 1 (an extension, img2img-style): the
    # whole branch starts from its background image noised to the level of the schedule's last
    # round(strength x steps) steps and the part branch from the empty part image noised the same
    # way, so the whole image keeps the background's layout and texture and the defect is drawn into
    # it. Needs the background images (BCM's; normals also when the model has no BCM).
    strength: float = Field(1.0, gt=0, le=1)
    seed: int = 0  # output i of a type uses generation.writer.item_seed(seed, type, i)
    batch_size: int = Field(8, ge=1)
    # BCM backgrounds: "normal" = a whole normal image of train/good, drawn per output from its seed
    # (right for textures such as MTD tiles, where the whole image is background).
    background: Literal["normal"] = "normal"
    mask: PartMaskConfig = PartMaskConfig()
    # Keep the background (an extension, blended-diffusion style): after every step the whole branch's
    # latent is replaced, outside the part's current mask (segmented from the decoded clean estimate of
    # the part branch, as the final mask is, max-pooled to the latent grid and dilated by
    # `keep_background_dilation` latent px), by the background image's latent noised to the next
    # timestep. The whole image then equals the background (through the autoencoder) except where the
    # part branch draws its defect, so image and mask align by construction of the region, and the whole
    # branch only draws the defect's content. Costs one decoder call per step. Needs background images.
    keep_background: bool = False
    keep_background_dilation: int = Field(1, ge=0)
    # Paste onto the background image (an extension, as AdaBLDM's sampling.paste_feather): weight 1 on
    # the final mask, falling to 0 over `paste_feather` px outside it; beyond that the whole image is
    # the real background, not its autoencoder reconstruction. Needs background images. `paste_mode`:
    # PasteMode.
    paste_feather: int | None = Field(None, ge=1)
    paste_mode: PasteMode = "image"
