"""DiAD training: autoencoder fine-tuning, UNet domain pretraining, then SG + UNet decoder half.

Stage 1 (autoencoder): the anchored autoencoder (models/autoencoder.py; or a plain KL one) on
random crops (it is fully convolutional, so crops cost a fraction of whole images and teach the
same thing), with an L2 (or L1) pixel loss, optionally a perceptual term from the frozen feature
extractor (LPIPS weights are not available offline) and, for KL autoencoders, the KL term; warm-up
then cosine learning rate. Afterwards the latents are centred (anchored) and scaled to unit
variance. `train.init_autoencoder_from` takes a trained one instead and skips the stage.

Stage 2 (unet): ordinary noise-prediction training of the whole UNet on the domain's normal latents.
The paper starts from Stable Diffusion weights instead; the sd15 preset sets this stage to 0 steps.

Stage 3 (guidance): the SG network is re-copied from the trained UNet encoder (as ControlNet
initialises its copy), then SG + UNet decoder half (up blocks, output norm and conv) train on the
noise loss with the input image as the hint; UNet encoder, middle, time embedding, autoencoder and
prompt encoder are frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edgeinspect.config import DiADConfig
from edgeinspect.data.batches import TrainingBatches
from edgeinspect.data.mvtec import MVTecFolder
from edgeinspect.models.diad import DiADModel
from edgeinspect.models.features import build_features
from edgeinspect.core.ddim import DDIM
from edgeinspect.core.runs import CheckpointError, latest_checkpoint, load_state, stage_checkpoint
from edgeinspect.training.loop import Stage, Trainer, prepare_run
from edgeinspect.training.base import encode_latents


def perceptual_distance(features, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of channel-normalised features (the LPIPS form without learnt weights)."""
    loss = a.new_zeros(())
    for fa, fb in zip(features(a), features(b)):
        loss = loss + (F.normalize(fa, dim=1) - F.normalize(fb, dim=1)).pow(2).sum(1).mean()
    return loss


def load_autoencoder(model: DiADModel, path: str | Path) -> Path:
    """The trained autoencoder (weights, latent shift, scaling factor) of a run or checkpoint."""
    ckpt = stage_checkpoint(path, "autoencoder", "train.init_autoencoder_from")
    weights = {k[len("vae."):]: v for k, v in load_file(str(ckpt / "model.safetensors")).items()
               if k.startswith("vae.")}
    try:
        model.vae.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}'s autoencoder does not match model.vae in this config: {e}") from e
    sf = load_state(ckpt).extra.get("scaling_factor")
    if sf is None:
        raise CheckpointError(f"{ckpt} has no scaling_factor: its autoencoder stage has not finished")
    model.set_scaling_factor(sf)
    return ckpt


def train_diad(cfg: DiADConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) a DiAD model in `run_dir`; returns the final checkpoint folder."""
    run_dir = Path(run_dir)
    t = cfg.train
    device = prepare_run(cfg, run_dir, resume)

    torch.manual_seed(t.seed)
    data = MVTecFolder(t.data_root, "train", cfg.model.image_size)
    images_u8, _, _ = data.load_all()
    batches = TrainingBatches(images_u8, t.batch_size, t.flips, t.seed)
    model = DiADModel(cfg).to(device)
    features = build_features(cfg).to(device)
    schedule = DDIM(cfg.scheduler)
    crop = t.autoencoder_crop or max(32, cfg.model.image_size // 2)
    if t.init_autoencoder_from is not None:
        load_autoencoder(model, t.init_autoencoder_from)
    cache: dict[str, torch.Tensor] = {}

    def set_trainable(*modules: torch.nn.Module) -> None:
        model.requires_grad_(False)
        for m in modules:
            m.requires_grad_(True)

    # ---- stage 1: autoencoder
    def ae_setup(fresh: bool) -> None:
        if fresh and hasattr(model.vae, "fit_anchor"):  # the block PCA anchor, from every training image
            model.vae.fit_anchor(x for _, x in TrainingBatches.every_image(images_u8, t.flips, 64))
        set_trainable(model.vae)

    variational = cfg.model.vae.kind == "kl"

    def ae_loss(_step: int) -> torch.Tensor:
        idx, flip = batches.draw()
        x = batches.images_for(idx, flip)
        if crop < x.shape[-1]:
            g = batches.gen
            i0 = int(torch.randint(x.shape[-2] - crop + 1, (1,), generator=g))
            j0 = int(torch.randint(x.shape[-1] - crop + 1, (1,), generator=g))
            x = x[..., i0:i0 + crop, j0:j0 + crop]
        x = x.to(device)
        post = model.vae.encode(x).latent_dist
        rec = model.vae.decode(post.sample() if variational else post.mean).sample
        diff = rec - x
        loss = diff.pow(2).mean() if t.autoencoder_loss == "l2" else diff.abs().mean()
        if variational:
            loss = loss + t.kl_weight * post.kl().mean() / x[0].numel()
        if t.perceptual_weight > 0:
            loss = loss + t.perceptual_weight * perceptual_distance(features, rec, x)
        return loss

    def encode_all() -> torch.Tensor:
        """Posterior means of every (flip code, image): (4 or 1, N, C, h, w), unscaled."""

        return encode_latents(model.vae, images_u8, t.flips, 1.0)

    def ae_finish() -> dict:
        if t.init_autoencoder_from is None:  # a taken autoencoder keeps its own statistics
            cache["latents"] = model.fit_latent_statistics(encode_all())
        return {"scaling_factor": model.scaling_factor}

    def latents_for(idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        if "latents" not in cache:
            cache["latents"] = encode_all() * model.scaling_factor
        return cache["latents"][flip.to(device), idx.to(device)]

    def noisy(z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tt = torch.randint(0, cfg.scheduler.num_train_timesteps, (z0.shape[0],), generator=batches.gen)
        eps = torch.randn(z0.shape, generator=batches.gen).to(device)
        tt = tt.to(device)
        return schedule.add_noise(z0, eps, tt), tt, eps

    # ---- stage 2: UNet domain pretraining
    def unet_setup(_fresh: bool) -> None:
        set_trainable(model.unet, model.prompt_encoder)

    def unet_loss(_step: int) -> torch.Tensor:
        idx, flip = batches.draw()
        zt, tt, eps = noisy(latents_for(idx, flip))
        ctx = model.context(t.prompt, len(idx))
        pred = model.unet(zt, tt, encoder_hidden_states=ctx).sample
        return F.mse_loss(pred, eps)

    # ---- stage 3: SG network + UNet decoder half
    unet_decoder = [model.unet.up_blocks, model.unet.conv_norm_out, model.unet.conv_out]

    def guidance_setup(fresh: bool) -> None:
        if fresh:
            model.reset_guidance_from_unet()
        set_trainable(model.guidance, *unet_decoder)

    guided = model.role_modules()["unet"]

    def guidance_loss(_step: int) -> torch.Tensor:
        idx, flip = batches.draw()
        zt, tt, eps = noisy(latents_for(idx, flip))
        x0 = batches.images_for(idx, flip).to(device)
        with torch.no_grad():
            ctx = model.context(t.prompt, len(idx))
        pred = guided(zt, tt, ctx, model.guidance.encode_hint(x0))
        return F.mse_loss(pred, eps)

    def params_of(*modules):
        return lambda: (p for m in modules for p in m.parameters())

    ae_steps = 0 if t.init_autoencoder_from is not None else t.autoencoder_steps
    stages = [
        Stage("autoencoder", ae_steps, t.autoencoder_lr, params_of(model.vae), ae_loss, ae_setup,
              ae_finish, warmup=t.autoencoder_warmup, schedule=t.autoencoder_schedule),
        Stage("unet", t.unet_steps, t.unet_lr, params_of(model.unet, model.prompt_encoder), unet_loss, unet_setup),
        Stage("guidance", t.guidance_steps, t.guidance_lr, params_of(model.guidance, *unet_decoder),
              guidance_loss, guidance_setup),
    ]
    trainer = Trainer(run_dir, model, stages, checkpoint_every=t.checkpoint_every, keep=t.keep_checkpoints,
                      log_every=t.log_every, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                      state_extra=lambda: {"scaling_factor": model.scaling_factor}, progress=progress,
                      generators={"batches": batches.gen})
    if resume and trainer.resume():
        sf = trainer.state.extra.get("scaling_factor")
        if sf is not None:
            model.set_scaling_factor(sf)
    trainer.run()
    found = latest_checkpoint(run_dir)
    assert found is not None
    return found
