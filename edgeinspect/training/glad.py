"""GLAD training: a domain base model, then anomaly-oriented fine-tuning (ATP) of the whole UNet.

Base model (autoencoder + UNet trained on the category's normals): either an existing DiAD run
(`train.init_from`: its `unet-final` checkpoint, i.e. after DiAD's stage 2, which trained the UNet
on the same normals by plain noise prediction) or, without `init_from`, DiAD's own autoencoder and
UNet stages run through `train_diad` (guidance stage at 0 steps) into `<run>/base`. Either way the
one Trainer runs every stage and no stage logic is duplicated.

ATP (stage "atp"): per sample, a normal latent z_n and (with probability 1 - clean_ratio) the latent
z_a of a synthetic anomaly made from the same image; t ~ U[0, T), alpha = t / T,
z_s = alpha z_a + (1 - alpha) z_n, x_t = sqrt(abar_t) z_s + sqrt(1 - abar_t) eps, and the target is
the noise whose implied clean latent is the *normal* one:
eps* = (x_t - sqrt(abar_t) z_n) / sqrt(1 - abar_t)  (= eps for clean samples: the ordinary loss).
The seed's formula and the authors' code carry a sign error here; `atp_target` is tested for
"clean estimate from eps* equals z_n".

At the end of ATP the ADP firing threshold is proposed from training normals (a high percentile of
each frame's largest ADP check score above min_step) and stored in the checkpoint's state.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeinspect.calibration.adp import adp_check_maxima, propose_threshold, propose_weight_bounds
from edgeinspect.config import AutoencoderStageConfig, GLADConfig, build_config, dump_config
from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.core.ddim import DDIM
from edgeinspect.core.runs import CheckpointError
from edgeinspect.data.anomalies import AnomalySynthesizer
from edgeinspect.data.batches import TrainingBatches, spread_indices
from edgeinspect.data.mvtec import MVTecFolder, uint8_to_model
from edgeinspect.models.glad import GLADModel
from edgeinspect.runtime.detector import for_calibration
from edgeinspect.runtime.run_detector import model_pipeline
from edgeinspect.training.base import base_checkpoint, encode_latents, run_config, train_from_base
from edgeinspect.training.diad import train_diad
from edgeinspect.training.loop import Stage, Trainer, prepare_run

# --------------------------------------------------------------------------- model


# --------------------------------------------------------------------------- ATP target


def atp_target(z_n: torch.Tensor, z_a: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
               alphas_cumprod: torch.Tensor, num_train_timesteps: int = 1000
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, eps*) of the anomaly-oriented training pair, for integer timesteps t (B,).

    alpha = t / T; z_s = alpha z_a + (1 - alpha) z_n; x_t = sqrt(abar) z_s + sqrt(1 - abar) eps;
    eps* = (x_t - sqrt(abar) z_n) / sqrt(1 - abar), i.e. the noise whose clean estimate is z_n."""
    shape = (-1,) + (1,) * (z_n.ndim - 1)
    abar = alphas_cumprod.to(z_n.device, torch.float64)[t.long()].view(shape)
    alpha = (t.double() / num_train_timesteps).view(shape)
    zn, za, e = z_n.double(), z_a.double(), eps.double()
    z_s = alpha * za + (1 - alpha) * zn
    x_t = abar.sqrt() * z_s + (1 - abar).sqrt() * e
    eps_star = (x_t - abar.sqrt() * zn) / (1 - abar).sqrt()
    return x_t.to(z_n.dtype), eps_star.to(z_n.dtype)


# --------------------------------------------------------------------------- base model


def _diad_base_config(cfg: GLADConfig):
    t = cfg.train
    data = {
        "model": dump_config(cfg.model),
        "scheduler": dump_config(cfg.scheduler),
        "features": {k: v for k, v in dump_config(cfg.features).items() if k not in ("model_kwargs", "vit_blocks")},
        "train": {"data_root": str(t.data_root), "prompt": t.prompt or "a photo of a normal object",
                  "batch_size": t.batch_size, "flips": t.flips, "seed": t.seed,
                  "checkpoint_every": t.checkpoint_every, "keep_checkpoints": t.keep_checkpoints,
                  "log_every": t.log_every, **t.model_dump(mode="json", include=set(AutoencoderStageConfig.model_fields)),
                  "unet_steps": t.unet_steps, "unet_lr": t.unet_lr,
                  "guidance_steps": 0, "weight_decay": t.weight_decay, "grad_clip": t.grad_clip,
                  "threads": t.threads, "device": t.device},
    }
    return build_config("diad", cfg.model.preset, data, source="GLAD base")


def _prepare_base(cfg: GLADConfig, run_dir: Path, resume: bool, progress: bool) -> Path:
    """The base checkpoint: train.init_from, or DiAD's stages 1-2 trained in <run>/base."""
    if cfg.train.init_from is not None:
        return base_checkpoint(cfg.train.init_from)
    if cfg.features.model_kwargs or cfg.features.vit_blocks:
        raise ValueError("features.model_kwargs/vit_blocks cannot be passed on to DiAD's base training (its "
                         "perceptual loss); train the base separately and set train.init_from")
    base_dir = run_dir / "base"
    train_diad(_diad_base_config(cfg), base_dir, resume=resume, progress=progress)
    return base_dir / "checkpoints" / "unet-final"


# --------------------------------------------------------------------------- training


def train_glad(cfg: GLADConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) GLAD in `run_dir`; returns the final checkpoint folder."""
    run_dir = Path(run_dir)
    t = cfg.train
    device = prepare_run(cfg, run_dir, resume)

    base = _prepare_base(cfg, run_dir, resume, progress)
    base_cfg = run_config(base)
    if base_cfg and base_cfg.get("model") != dump_config(cfg.model):
        raise CheckpointError(f"the base model {base} was trained with a different model config than this one "
                              "(train.init_from must be a run of the same preset/model settings)")
    base_prompt = base_cfg.get("train", {}).get("prompt")
    if t.prompt is None:
        cfg = cfg.model_copy(update={"train": t.model_copy(update={"prompt": base_prompt or
                                                                   "a photo of a normal object"})})
        t = cfg.train
    elif base_prompt is not None and base_prompt != t.prompt:
        warnings.warn(f"train.prompt {t.prompt!r} differs from the base model's {base_prompt!r}", stacklevel=2)
    if t.category is None:
        cfg = cfg.model_copy(update={"train": t.model_copy(update={"category": cfg.category})})
        t = cfg.train
    write_json_atomic(run_dir / "config.json", dump_config(cfg))  # with the prompt/category resolved

    torch.manual_seed(t.seed)
    data = MVTecFolder(t.data_root, "train", cfg.model.image_size)
    images_u8, _, _ = data.load_all()
    pool = images_u8.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3) sources for "another image"
    synth = AnomalySynthesizer(t.anomalies, pool)
    batches = TrainingBatches(images_u8, t.batch_size, t.flips, t.seed)
    model = GLADModel(cfg).to(device)
    schedule = DDIM(cfg.scheduler)
    abar = schedule.alphas_cumprod
    T = cfg.scheduler.num_train_timesteps
    cache: dict[str, torch.Tensor] = {}

    def latents_for(idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        if "latents" not in cache:
            cache["latents"] = encode_latents(model.vae, images_u8, t.flips, model.scaling_factor)
        return cache["latents"][flip.to(device), idx.to(device)]

    def atp_setup(_fresh: bool) -> None:
        model.requires_grad_(False)
        model.unet.requires_grad_(True)
        with torch.no_grad():
            cache["context"] = model.context(t.prompt or "")

    def atp_loss(_step: int) -> torch.Tensor:
        idx, flip = batches.draw()
        z_n = latents_for(idx, flip)
        # numpy generator for the synthesis, seeded from the checkpointed torch generator: resumable
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=batches.gen)))
        flipped = TrainingBatches.apply_flip(images_u8[idx], flip).permute(0, 2, 3, 1).numpy()
        anomalous, imgs = [], []
        for k in range(len(idx)):
            s = synth(flipped[k], rng, index=int(idx[k]))
            if not s.clean:
                anomalous.append(k)
                imgs.append(s.image)
        z_a = z_n.clone()
        if anomalous:
            x_a = uint8_to_model(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2))
            model.vae.eval()
            with torch.no_grad():
                z_a[anomalous] = model.vae.encode(x_a.to(device)).latent_dist.mean * model.scaling_factor
        tt = torch.randint(0, T, (len(idx),), generator=batches.gen).to(device)
        eps = torch.randn(z_n.shape, generator=batches.gen).to(device)
        x_t, eps_star = atp_target(z_n, z_a, eps, tt, abar, T)
        ctx = cache["context"].expand(len(idx), *cache["context"].shape[1:])
        pred = model.unet(x_t, tt, encoder_hidden_states=ctx).sample
        return F.mse_loss(pred, eps_star)

    def atp_finish() -> dict:
        n = cfg.calibration.images
        if n <= 0:
            return {}
        sel = spread_indices(len(images_u8), n)
        pipe = model_pipeline(for_calibration(cfg), model, device=device, threshold=None, category=cfg.category)
        maxima, fire_maps = adp_check_maxima(pipe, uint8_to_model(images_u8[sel]), cfg.inference.batch_size)
        model.train()
        cal = cfg.calibration
        out: dict = {}
        try:
            out["adp_threshold"] = propose_threshold(maxima, cal.percentile, cal.margin)
        except ValueError as e:
            warnings.warn(f"ADP threshold not calibrated: {e}", stacklevel=2)
        try:
            out["adp_weight_bounds"] = list(propose_weight_bounds(fire_maps, cal.weight_percentile, cal.weight_margin))
        except ValueError as e:
            warnings.warn(f"SAFF weight bounds not calibrated: {e}", stacklevel=2)
        if out:
            out["adp_calibration"] = {
                "category": cfg.category, "adp_space": pipe.inference.adp_space, "images": len(sel),
                "percentile": cal.percentile, "margin": cal.margin,
                "weight_percentile": cal.weight_percentile, "weight_margin": cal.weight_margin,
                "max_scores": [float(v) for v in maxima]}
        return out

    stages = [Stage("atp", t.atp_steps, t.atp_lr, lambda: model.unet.parameters(), atp_loss, atp_setup, atp_finish)]
    trainer = Trainer(run_dir, model, stages, checkpoint_every=t.checkpoint_every, keep=t.keep_checkpoints,
                      log_every=t.log_every, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                      state_extra=lambda: {"scaling_factor": model.scaling_factor, "base_checkpoint": str(base)},
                      progress=progress, generators={"batches": batches.gen})
    return train_from_base(trainer, model, base, resume)
