"""Example and probe inputs every method's export builders share: the sizes a config deploys at (and the
probe sizes that check dynamic axes), seeded random inputs, and the dynamic-axis names."""

from __future__ import annotations

import torch

IMAGE_AXES = {0: "batch", 2: "height", 3: "width"}
LATENT_AXES = {0: "batch", 2: "latent_height", 3: "latent_width"}
UNET_AXES = {"sample": LATENT_AXES, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
              "hint": LATENT_AXES}


class ExportSizes:
    def __init__(self, cfg):
        m = cfg.model
        self.image = m.image_size
        self.vae_factor = m.vae.downsample_factor
        self.unet_factor = 2 ** (len(m.unet.block_out_channels) - 1)
        self.latent = m.latent_size
        self.latent_channels = m.vae.latent_channels
        # generators (AdaBLDM, DualAnoDiff) have no scoring section and no features role
        scoring = getattr(cfg, "scoring", None)
        self.feature = (scoring.feature_size if scoring is not None else None) or m.image_size
        # the bank reference runs the extractor (and the bank search) on the frame at the bank's feature size
        # only, so that is the size its graphs deploy at (TensorRT pins it)
        if scoring is not None and scoring.reference == "bank" and scoring.bank.feature_size:
            self.feature = scoring.bank.feature_size
        # probe: one more multiple of the whole downsampling, so every level stays an integer size
        self.probe_image = self.image + self.vae_factor * self.unet_factor
        self.probe_latent = self.probe_image // self.vae_factor
        self.probe_feature = self.feature + 32


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=seeded_generator(seed)) * 2 - 1


def bank_distance_inputs(features: torch.nn.Module, feature_size: int, bank_size: int, batch: int, seed: int
                         ) -> dict[str, torch.Tensor]:
    """Example inputs of the `bank_distance` role: the extractor's features of random frames at `feature_size`
    and, per level, `bank_size` random unit vectors of its channel count."""
    with torch.no_grad():
        feats = list(features(random_images(batch, feature_size, seed)))
    inputs = {f"feature_{i}": f.contiguous() for i, f in enumerate(feats)}
    for i, f in enumerate(feats):
        v = torch.randn(bank_size, f.shape[1], generator=seeded_generator(seed + 1 + i))
        inputs[f"bank_{i}"] = torch.nn.functional.normalize(v, dim=1)
    return inputs
