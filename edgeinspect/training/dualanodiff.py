"""DualAnoDiff training: LoRA branches, SAIM, BCM and the prompt encoder on a few anomaly pairs.

Data: the few-shot anomaly images of one defect type (test/<type> with ground_truth/<type> masks
of an MVTec-layout folder), named by `train.images` or by a split file's `fewshot[<type>]`, resized
to the model size. Per image the whole target is I and the part target I * M (0 outside the
defect in [-1, 1]); both get the same random flip, so the pair stays aligned. BCM background of a
pair (`train.background`): "inpainted", the pair's own image with its (dilated) defect region
inpainted away, flipped with the pair -- the whole target is then exactly its background plus the
defect, which is what BCM has to learn to carry over; or "normals", a random normal of train/good
(up to `max_backgrounds`, spread evenly) with its own flip. All latents are the frozen
autoencoder's posterior means, encoded once.

Step: per pair one timestep t shared by whole, part and background, independent noise for each;
both prompts are replaced by the empty prompt together for a fraction of pairs (so classifier-free
guidance has a learnt unconditional prediction); loss = MSE(whole noise) + MSE(part noise), each
optionally weighted up on the defect's latent cells (`train.defect_loss_weight`; 0 = the paper).

Base: `train.init_from` (a DiAD run's unet-final, or a checkpoint folder) provides the autoencoder,
UNet and prompt encoder; the UNet and autoencoder stay frozen. Checkpoints hold only the trainable
weights (LoRA, SAIM, BCM, prompt encoder; `TrainableWeights`) plus, in their state, the base
checkpoint's path and its latent scaling factor; `load_dualanodiff` rebuilds the model from both.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from edgeinspect.config import DualAnoDiffConfig, dump_config
from edgeinspect.data.mvtec import DatasetError, MVTecFolder
from edgeinspect.data.trimap import dilate_mask
from edgeinspect.models.dualanodiff import DualAnoDiffModel, TrainableWeights
from edgeinspect.core.ddim import DDIM
from edgeinspect.core.runs import load_run_config, CheckpointError, latest_checkpoint, load_model_weights
from edgeinspect.data.batches import TrainingBatches
from edgeinspect.training.base import base_checkpoint, defect_weighted_mse, load_base_weights, run_config
from edgeinspect.data.batches import spread_indices
from edgeinspect.training.loop import Stage, Trainer, prepare_run

# Config sections that define the trained network: a loaded run cannot change them.
_FIXED_SECTIONS = {"method", "model", "lora", "saim", "bcm", "prompts"}


# --------------------------------------------------------------------------- data


def fewshot_names(cfg: DualAnoDiffConfig) -> list[str]:
    """The few-shot image names of train.defect_type: train.images, or the split file's list."""
    t = cfg.train
    if t.images is not None:
        names = list(t.images)
    elif t.split_file is not None:
        split = json.loads(Path(t.split_file).read_text())
        lists = split.get("fewshot", {})
        if t.defect_type not in lists:
            raise DatasetError(f"{t.split_file} has no fewshot list for {t.defect_type!r} (it has {sorted(lists)})")
        names = list(lists[t.defect_type])
    else:
        raise ValueError("give the few-shot images: train.images (names) or train.split_file")
    if not names:
        raise DatasetError(f"the few-shot list for {t.defect_type!r} is empty")
    return names


def load_fewshot(data_root: Path, defect_type: str, names: list[str], size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images (N, 3, H, W), bool masks (N, H, W) and file names of the named anomaly images."""
    folder = MVTecFolder(data_root, "test", size, defect_types=[defect_type])
    by_name = {}
    for i, s in enumerate(folder.samples):
        by_name[s.path.name] = i
        by_name.setdefault(s.path.stem, i)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DatasetError(f"{data_root}/test/{defect_type} has no image(s) {missing[:5]}")
    picked = list(dict.fromkeys(by_name[n] for n in names))  # a name given twice counts once
    imgs, masks = zip(*(folder.load(i) for i in picked))
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.stack(masks)), [folder.samples[i].path.name for i in picked]


def load_backgrounds(data_root: Path, size: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """Up to `count` normals of train/good, spread evenly: uint8 (M, 3, H, W) and their names."""
    folder = MVTecFolder(data_root, "train", size, defect_types=["good"])
    picked = spread_indices(len(folder), count)
    images = torch.from_numpy(np.stack([folder.load(i)[0] for i in picked])).permute(0, 3, 1, 2).contiguous()
    return images, [folder.samples[i].path.name for i in picked]


def remove_defects(images_u8: torch.Tensor, masks: torch.Tensor, dilation: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) images with each mask's region (grown by `dilation` px) filled by Telea
    inpainting from its surroundings: the defect-free background of each anomaly image."""
    out = []
    for img, m in zip(images_u8, masks):
        hole = dilate_mask(m.numpy() > 0, dilation).astype(np.uint8)
        rgb = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
        out.append(torch.from_numpy(cv2.inpaint(rgb, hole, 3, cv2.INPAINT_TELEA)).permute(2, 0, 1))
    return torch.stack(out)


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div(127.5).sub(1.0)


def part_targets(images_u8: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """I * M in [-1, 1]: the anomaly part on the empty value 0."""
    return to_model_range(images_u8) * masks[:, None].float()


@torch.no_grad()
def encode_variants(vae: nn.Module, images: torch.Tensor, flips: bool, scaling_factor: float,
                    batch: int = 16) -> torch.Tensor:
    """Scaled posterior means of every (flip code, image) of float images in [-1, 1]:
    (4 or 1, N, C, h, w), flip codes as `TrainingBatches.apply_flip`."""
    vae.eval()
    device = next(vae.parameters()).device
    out = []
    for code in range(4 if flips else 1):
        lat = []
        for s in range(0, len(images), batch):
            chunk = images[s:s + batch]
            x = TrainingBatches.apply_flip(chunk, torch.full((len(chunk),), code))
            lat.append(vae.encode(x.to(device)).latent_dist.mean * scaling_factor)
        out.append(torch.cat(lat))
    return torch.stack(out)


# --------------------------------------------------------------------------- model


def build_dualanodiff(cfg: DualAnoDiffConfig, base: Path) -> tuple[DualAnoDiffModel, dict]:
    """The model with the base checkpoint's autoencoder, UNet, prompt encoder and scaling factor."""
    base_extra: dict = {}
    model = DualAnoDiffModel(cfg, load_base=lambda m: base_extra.update(load_base_weights(m, base)))
    return model, base_extra


def _resolve_base(cfg: DualAnoDiffConfig) -> Path:
    if cfg.train.init_from is None:
        raise ValueError("train.init_from is not set: DualAnoDiff adapts a frozen base model; point it at a "
                         "DiAD run (its unet-final checkpoint is used) or a checkpoint folder")
    base = base_checkpoint(cfg.train.init_from).resolve()
    base_cfg = run_config(base)
    if base_cfg and base_cfg.get("model") != dump_config(cfg.model):
        raise CheckpointError(f"the base model {base} was trained with a different model config than this one "
                              "(train.init_from must be a run of the same preset/model settings)")
    return base


# --------------------------------------------------------------------------- training


def train_dualanodiff(cfg: DualAnoDiffConfig, run_dir: str | Path, resume: bool = False,
                      progress: bool = True) -> Path:
    """Train (or resume) DualAnoDiff for one defect type in `run_dir`; returns the final checkpoint."""
    run_dir = Path(run_dir)
    t = cfg.train
    if t.defect_type is None:
        raise ValueError("train.defect_type is not set: DualAnoDiff trains one model per defect type")
    names = fewshot_names(cfg)
    base = _resolve_base(cfg)
    device = prepare_run(cfg, run_dir, resume)

    torch.manual_seed(t.seed)
    images_u8, masks, names = load_fewshot(t.data_root, t.defect_type, names, cfg.model.image_size)
    model, _ = build_dualanodiff(cfg, base)
    model.to(device)
    sf = model.scaling_factor
    whole_lat = encode_variants(model.vae, to_model_range(images_u8), t.flips, sf)
    part_lat = encode_variants(model.vae, part_targets(images_u8, masks), t.flips, sf)
    bg_names: list[str] = []
    own_background = t.background == "inpainted"
    if cfg.bcm.enabled:
        if own_background:
            bg_u8, bg_names = remove_defects(images_u8, masks, t.inpaint_dilation), ["inpainted"]
        else:
            bg_u8, bg_names = load_backgrounds(t.data_root, cfg.model.image_size, t.max_backgrounds)
        bg_lat = encode_variants(model.vae, to_model_range(bg_u8), t.flips, sf)

    masks_f = masks[:, None].float()
    batches = TrainingBatches(images_u8, t.batch_size, t.flips, t.seed)
    gen = batches.gen
    schedule = DDIM(cfg.scheduler)
    T = cfg.scheduler.num_train_timesteps
    prompts = cfg.prompts

    def noisy(z0: torch.Tensor, tt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.randn(z0.shape, generator=gen).to(device)
        return schedule.add_noise(z0, eps, tt), eps

    def loss(_step: int) -> torch.Tensor:
        idx, flip = batches.draw()
        n = len(idx)
        tt = torch.randint(0, T, (n,), generator=gen).to(device)
        zw, eps_w = noisy(whole_lat[flip.to(device), idx.to(device)], tt)
        zp, eps_p = noisy(part_lat[flip.to(device), idx.to(device)], tt)
        background = None
        if cfg.bcm.enabled:
            if own_background:
                b_idx, b_flip = idx, flip
            else:
                b_idx = torch.randint(len(bg_lat[0]), (n,), generator=gen)
                b_flip = torch.randint(len(bg_lat), (n,), generator=gen)
            background, _ = noisy(bg_lat[b_flip.to(device), b_idx.to(device)], tt)
        drop = (torch.rand(n, generator=gen) < t.empty_prompt_prob).tolist()
        ctx_w = model.prompt_encoder(["" if d else prompts.whole_prompt for d in drop])
        ctx_p = model.prompt_encoder(["" if d else prompts.part_prompt for d in drop])
        pred_w, pred_p = model.dual_forward(zw, zp, tt, ctx_w, ctx_p, background)
        m = TrainingBatches.apply_flip(masks_f[idx], flip)
        w = t.defect_loss_weight
        return defect_weighted_mse(pred_w, eps_w, m, w) + defect_weighted_mse(pred_p, eps_p, m, w)

    def trainable():
        return (p for p in model.parameters() if p.requires_grad)

    extra = {"base_checkpoint": str(base), "defect_type": t.defect_type, "fewshot_images": names,
             "backgrounds": bg_names}
    trainer = Trainer(run_dir, TrainableWeights(model), [Stage("dual", t.steps, t.lr, trainable, loss)],
                      checkpoint_every=t.checkpoint_every, keep=t.keep_checkpoints, log_every=t.log_every,
                      weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                      state_extra=lambda: {"scaling_factor": model.scaling_factor, **extra},
                      progress=progress, generators={"batches": gen})
    if resume and trainer.resume():
        saved = trainer.state.extra.get("base_checkpoint")
        if saved is not None and saved != str(base):
            raise CheckpointError(f"{run_dir} was trained on the base {saved}, not {base}")
    trainer.run()
    found = latest_checkpoint(run_dir)
    assert found is not None
    return found


def load_dualanodiff(path: str | Path, overrides: dict | None = None
                     ) -> tuple[DualAnoDiffConfig, DualAnoDiffModel, dict]:
    """Config, model (base weights + trained weights) and checkpoint state extras from a DualAnoDiff
    checkpoint or run folder. `overrides` may change sampling/runtime settings, not the network."""
    ckpt, cfg, extra = load_run_config(path, "dualanodiff", overrides, frozenset(_FIXED_SECTIONS))
    if "base_checkpoint" not in extra:
        raise CheckpointError(f"{ckpt} names no base checkpoint: not a DualAnoDiff training checkpoint")
    base = Path(extra["base_checkpoint"])
    if not (base / "model.safetensors").is_file():
        raise CheckpointError(f"{ckpt} needs its base checkpoint {base}, which is missing (DualAnoDiff checkpoints "
                              "hold only the trained weights; the frozen base is read from there)")
    model, _ = build_dualanodiff(cfg, base)
    load_model_weights(TrainableWeights(model), ckpt)
    if extra.get("scaling_factor") is not None:
        model.set_scaling_factor(extra["scaling_factor"])
    return cfg, model.eval(), extra
