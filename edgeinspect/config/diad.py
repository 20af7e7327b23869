"""DiAD's config: training stages, inference (DDIM reconstruction) and scoring."""

from __future__ import annotations

from pydantic import Field, field_validator

from edgeinspect.config.base import (AutoencoderStageConfig, BankConfig, Decoder, Encoder, Reference, Strict,
                                     TrainLoopConfig, read_reference)



class DiADTrainConfig(TrainLoopConfig, AutoencoderStageConfig):
    prompt: str = "a photo of a normal object"
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
    # What the frame is compared with (config/base.py REFERENCES): its reconstruction (the paper, whose SD
    # autoencoder is near-lossless); the reconstruction against the frame's own autoencoder round trip
    # (vae_roundtrip: a small from-scratch autoencoder's blur appears on both sides and cancels, one extra
    # decode per frame); the normal-feature bank alone (bank); or both (hybrid).
    reference: Reference = "reconstruction"
    # How frames are encoded to the start latent (config/base.py Encoder): the full encoder, or the anchored
    # autoencoder's resize part alone (no learnt residual; cheaper).
    encoder: Encoder = "full"
    # How latents are decoded for scoring (config/base.py Decoder): the full decoder, or the anchored
    # autoencoder's resize part alone (no learnt residual; much cheaper).
    decoder: Decoder = "full"
    bank: BankConfig = BankConfig()
    # In pixels of the model image (the paper's 5 is at 256 px).
    blur_sigma: float = Field(5.0, ge=0)
    pool_size: int = Field(8, ge=1)
    pool_iterations: int = Field(8, ge=0)

    _reference = field_validator("reference", mode="before")(read_reference)
