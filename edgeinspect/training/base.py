"""The base every method after DiAD starts from: a checkpoint with a trained autoencoder, UNet and
prompt encoder under the fixed names `vae.`, `unet.`, `prompt_encoder.` (a DiAD run's `unet-final`,
i.e. after its autoencoder and UNet stages), and the latents of a training set under that autoencoder."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
import torch.nn.functional as F
from torch import nn

from edgeinspect.models.diad import LatentDiffusionModel
from edgeinspect.core.runs import CheckpointError, latest_checkpoint, load_state, stage_checkpoint
from edgeinspect.data.batches import TrainingBatches
from edgeinspect.training.loop import Trainer

BASE_PREFIXES = ("vae.", "unet.", "prompt_encoder.")


def base_checkpoint(init_from: Path) -> Path:
    """A checkpoint folder as given; for a run folder its `unet-final` (DiAD after stage 2)."""
    return stage_checkpoint(init_from, "unet", "train.init_from")


def defect_weighted_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: float
                        ) -> torch.Tensor:
    """Noise MSE with each latent position weighted 1 + `weight` * (the defect's share of its cell).

    `mask` (B, 1, H, W) in [0, 1] at image resolution is area-averaged to the latent grid. Each
    sample's weighted sum is divided by its total weight, so the loss keeps the scale of a plain MSE
    (a sample without defect pixels gets exactly its plain MSE); `weight` 0 is `F.mse_loss`. A defect
    covers a few percent of a frame, so in the plain loss the background texture outweighs it; the
    weight makes the defect region count as much as the model is meant to learn it (an extension of
    the papers' plain noise loss, for small models trained briefly)."""
    if weight == 0:
        return F.mse_loss(pred, target)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != pred.shape[0]:
        raise ValueError(f"mask must be (B, 1, H, W) for a batch of {pred.shape[0]}, got {tuple(mask.shape)}")
    cell = F.adaptive_avg_pool2d(mask.to(pred.device, pred.dtype), pred.shape[-2:])
    w = (1 + weight * cell).expand_as(pred)
    per_sample = (w * (pred - target) ** 2).flatten(1).sum(1) / w.flatten(1).sum(1)
    return per_sample.mean()


def run_config(ckpt: Path) -> dict:
    f = ckpt.parent.parent / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def load_base_weights(model: LatentDiffusionModel, ckpt: Path) -> dict:
    """vae/unet/prompt_encoder weights and the latent scaling factor from a base checkpoint."""
    weights = {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if k.startswith(BASE_PREFIXES)}
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(BASE_PREFIXES)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{ckpt} does not match the model's autoencoder/UNet/prompt encoder: missing "
                              f"{missing[:8]}, unexpected {result.unexpected_keys[:8]}")
    extra = load_state(ckpt).extra
    sf = extra.get("scaling_factor")
    if sf is None:
        warnings.warn(f"{ckpt} has no scaling_factor (autoencoder not trained?); keeping {model.scaling_factor}",
                      stacklevel=2)
    else:
        model.set_scaling_factor(sf)
    return extra


def encode_latents(vae: nn.Module, images_u8: torch.Tensor, flips: bool, scaling_factor: float,
                   batch: int = 16) -> torch.Tensor:
    """Scaled posterior means of every (flip code, image): (4 or 1, N, C, h, w)."""
    vae.eval()
    device = next(vae.parameters()).device
    out: list[list[torch.Tensor]] = [[] for _ in range(4 if flips else 1)]
    with torch.no_grad():
        for code, x in TrainingBatches.every_image(images_u8, flips, batch):
            out[code].append(vae.encode(x.to(device)).latent_dist.mean * scaling_factor)
    return torch.stack([torch.cat(lat) for lat in out])


def train_from_base(trainer: Trainer, model: LatentDiffusionModel, base: Path | None, resume: bool) -> Path:
    """Run `trainer` on `model`: resumed from the run's latest checkpoint (with its latent scaling
    factor) when asked and there is one, else started from the base checkpoint's weights (none: the
    model's own, e.g. SD weights). Returns the final checkpoint folder."""
    if resume and trainer.resume():
        sf = trainer.state.extra.get("scaling_factor")
        if sf is not None:
            model.set_scaling_factor(sf)
    elif base is not None:
        load_base_weights(model, base)
    trainer.run()
    found = latest_checkpoint(trainer.run_dir)
    assert found is not None
    return found
