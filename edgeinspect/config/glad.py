"""GLAD's config: ATP training with synthetic anomalies, ADP/SAFF inference per category, scoring and the
ADP calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgeinspect.config.base import (
    AutoencoderStageConfig,
    BankConfig,
    FeatureConfig,
    Decoder,
    Encoder,
    Reference,
    Strict,
    TrainLoopConfig,
    read_reference,
)



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


class GLADTrainConfig(TrainLoopConfig, AutoencoderStageConfig):
    # Name of the category (key of inference.categories); default: the data folder's name.
    category: str | None = None
    # null: the base run's prompt (so the prompt encoder the UNet was trained with stays valid).
    prompt: str | None = None
    # The domain base model (trained autoencoder + UNet): a DiAD run folder (its `unet-final`
    # checkpoint, i.e. after DiAD's stage 2) or a checkpoint folder. null: DiAD's autoencoder and
    # UNet stages run first, in <run>/base, with the step counts below.
    init_from: Path | None = None
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
    # Where the ADP check compares the two clean estimates: "features" (the paper: decode both, extractor
    # features, min over positions of 1 - cos, blurred) or "latent" (no decode, no extractor: the RMS over
    # channels of their latent difference at each latent position, upsampled bilinearly to the image). The
    # latent check costs no network call; its threshold must be calibrated in the same space (the
    # calibrated threshold records the space it was proposed in, and a mismatch is not used).
    adp_space: Literal["features", "latent"] = "features"
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
    # (benchmarks/results/glad_mtd_gpu_draws2.md).
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
    # What the frame is compared with (config/base.py REFERENCES): its final reconstruction (the paper);
    # the reconstruction against the frame's own autoencoder round trip (vae_roundtrip: a small
    # autoencoder's blur on both sides, one extra decode per frame; the ADP checks compare two decoded
    # estimates either way; on MTD's CPU-trained f = 8 model: images no better on held-out data, pixels
    # worse, benchmarks/results/glad_mtd_roundtrip.md; on the GPU-trained f = 4 model: image AUROC
    # +0.015-0.025, pixel -0.01, glad_mtd_gpu_sweep.md); the normal-feature bank alone (bank: no
    # diffusion, no ADP); or both (hybrid).
    reference: Reference = "reconstruction"
    # How frames are encoded to the input latent z0, which the denoising starts from and the ADP checks' input-
    # derived estimates are made of (config/base.py Encoder).
    encoder: Encoder = "full"
    # How latents are decoded, in the ADP checks and for the final map (config/base.py Decoder).
    decoder: Decoder = "full"
    bank: BankConfig = BankConfig()
    # Feature size for the ADP checks (null: feature_size); smaller makes each check cheaper.
    adp_feature_size: int | None = Field(None, ge=32)
    # Gaussian blur of the maps, in pixels of the model image (the paper's ~6 is at 256 px).
    blur_sigma: float = Field(6.0, ge=0)
    # Memory budget for one chunk of the (HW x HW) cosine-similarity matrix.
    similarity_chunk_mb: float = Field(64.0, gt=0)

    _reference = field_validator("reference", mode="before")(read_reference)


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
