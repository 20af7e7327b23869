"""AdaBLDM training: domain pretraining of the UNet, then one trimap control branch per defect type.

Base: a checkpoint with a trained autoencoder + UNet + prompt encoder (`train.init_from`, e.g. a
DiAD run's `unet-final`), or, with the sd15 preset, Stable Diffusion's weights from the local
folder. A small model cannot start from nothing here: its autoencoder has to be trained first,
which is DiAD's stage 1 (`edgeinspect train diad`), so without either the command says so.

Stage "domain": UNet + prompt encoder on all normals ("a {object}") and the real seed defects
("a {object} with a {defect}"), seeds given a fixed share of each batch, 10% empty prompts (the
unconditional model for classifier-free guidance).

Stage "control-<type>", one per defect type: the control branch is re-copied from the
domain-trained UNet (ControlNet's initialisation) and trains alone, base frozen, on cut-paste
composites: a seed defect of that type with a random affine, pasted into the foreground of a random
normal image; the trimap of the pasted mask is its condition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeinspect.config import AdaBLDMConfig, dump_config
from edgeinspect.data.cutpaste import cut_paste
from edgeinspect.data.mvtec import MVTecFolder, uint8_to_model
from edgeinspect.data.trimap import MaskDoesNotFit, estimate_foreground, make_trimap
from edgeinspect.models.adabldm import AdaBLDMModel
from edgeinspect.models.features import build_feature_extractor
from edgeinspect.core.ddim import DDIM
from edgeinspect.core.runs import load_run_config, CheckpointError, load_model_weights
from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.data.batches import TrainingBatches
from edgeinspect.training.base import (
    base_checkpoint,
    defect_weighted_mse,
    encode_latents,
    run_config,
    train_from_base,
)
from edgeinspect.training.loop import Stage, Trainer, prepare_run

# A control composite on normal image i draws another seed when one does not fit i's foreground.
CONTROL_SEED_REDRAWS = 20


@dataclass
class SeedDefects:
    """The real defects of one type, at the model size."""

    names: list[str]
    images: torch.Tensor  # uint8 (k, 3, H, W)
    masks: torch.Tensor  # bool (k, H, W)


def seed_names(cfg: AdaBLDMConfig) -> dict[str, list[str]]:
    """Seed file names per defect type: train.seeds, else the split file's `adabldm_seeds`."""
    t = cfg.train
    if t.seeds:
        names = dict(t.seeds)
    elif t.split_file is not None:
        path = Path(t.split_file)
        if not path.is_file():
            raise FileNotFoundError(f"train.split_file {path} does not exist")
        names = json.loads(path.read_text()).get("adabldm_seeds") or {}
        if not names:
            raise ValueError(f"{path} has no 'adabldm_seeds' entry")
    else:
        raise ValueError("AdaBLDM needs real seed defects: set train.seeds {type: [file names]} or "
                         "train.split_file (a few-shot split with 'adabldm_seeds')")
    if t.defect_types is not None:
        unknown = sorted(set(t.defect_types) - set(names))
        if unknown:
            raise ValueError(f"train.defect_types {unknown} have no seeds (seeds exist for {sorted(names)})")
        names = {k: names[k] for k in t.defect_types}
    empty = [k for k, v in names.items() if not v]
    if empty:
        raise ValueError(f"no seed images for defect type(s) {empty}")
    return names


def load_seeds(root: Path, names: dict[str, list[str]], size: int) -> dict[str, SeedDefects]:
    out = {}
    for dtype, files in names.items():
        folder = MVTecFolder(root, "test", size, defect_types=[dtype], include=set(files))
        images, masks, _ = folder.load_all()
        empty = [s.path.name for s, m in zip(folder.samples, masks) if not m.any()]
        if empty:
            raise ValueError(f"seed image(s) {empty} of {dtype!r} have an empty ground-truth mask")
        out[dtype] = SeedDefects([s.path.name for s in folder.samples], images, masks)
    return out


def foregrounds(cfg: AdaBLDMConfig, images_u8: torch.Tensor) -> np.ndarray:
    """Foreground (N, H, W) of each image by the configured method."""
    f = cfg.foreground
    n, _, h, w = images_u8.shape
    if f.method == "whole":
        return np.ones((n, h, w), bool)
    extractor = build_feature_extractor("efficientnet_lite0", "default", (8,)) if f.method == "features" else None
    hwc = images_u8.permute(0, 2, 3, 1).numpy()
    return np.stack([estimate_foreground(im, f.method, extractor, f.min_fraction) for im in hwc])


def defect_prompt(cfg: AdaBLDMConfig, defect_type: str) -> str:
    t = cfg.train
    return t.defect_prompt.format(object=t.object_name, defect=defect_type.replace("_", " "))


def _base(cfg: AdaBLDMConfig) -> Path | None:
    if cfg.train.init_from is not None:
        base = base_checkpoint(cfg.train.init_from)
        base_cfg = run_config(base)
        if base_cfg and base_cfg.get("model") != dump_config(cfg.model):
            raise CheckpointError(f"the base model {base} was trained with a different model config "
                                  "(train.init_from must be a run of the same preset/model settings)")
        return base
    if cfg.model.preset == "sd15":
        return None  # the autoencoder, UNet and CLIP come from the local SD folder
    raise ValueError(
        "train.init_from is not set: AdaBLDM needs a trained autoencoder + UNet as its base. Train one "
        "with `edgeinspect train diad` (its unet-final checkpoint is the base) or use the sd15 preset")


def train_adabldm(cfg: AdaBLDMConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) AdaBLDM in `run_dir`; returns the final checkpoint folder."""
    run_dir = Path(run_dir)
    t = cfg.train
    device = prepare_run(cfg, run_dir, resume)
    names = seed_names(cfg)
    base = _base(cfg)

    torch.manual_seed(t.seed)
    size = cfg.model.image_size
    normals_u8, _, _ = MVTecFolder(t.data_root, "train", size).load_all()
    seeds = load_seeds(Path(t.data_root), names, size)
    types = list(seeds)
    fg = foregrounds(cfg, normals_u8)
    write_json_atomic(run_dir / "seeds.json", {k: v.names for k, v in seeds.items()})

    model = AdaBLDMModel(cfg, types).to(device)
    schedule = DDIM(cfg.scheduler)
    batches = TrainingBatches(normals_u8, t.batch_size, t.flips, t.seed)
    gen = batches.gen
    normal_prompt = t.normal_prompt.format(object=t.object_name)
    cache: dict[str, torch.Tensor] = {}

    def set_trainable(*modules: torch.nn.Module) -> None:
        model.requires_grad_(False)
        for m in modules:
            m.requires_grad_(True)

    def maybe_empty(prompts: list[str]) -> list[str]:
        drop = torch.rand(len(prompts), generator=gen) < t.empty_prompt_ratio
        return ["" if d else p for p, d in zip(prompts, drop.tolist())]

    def noisy(z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tt = torch.randint(0, cfg.scheduler.num_train_timesteps, (z0.shape[0],), generator=gen).to(device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        return schedule.add_noise(z0, eps, tt), tt, eps

    def encode(images_u8: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            model.vae.eval()
            return model.vae.encode(uint8_to_model(images_u8).to(device)).latent_dist.mean * model.scaling_factor

    # ---- stage "domain"
    def domain_setup(_fresh: bool) -> None:
        set_trainable(model.unet, model.prompt_encoder)
        if "normals" not in cache:
            cache["normals"] = encode_latents(model.vae, normals_u8, t.flips, model.scaling_factor)

    def domain_loss(_step: int) -> torch.Tensor:
        """A batch of seed defects (their share) then normals, each with its prompt."""
        n_seed = int(round(t.batch_size * t.seed_fraction))
        idx, flip = batches.draw()
        latents, prompts, seed_imgs = [], [], []
        for _ in range(n_seed):
            dtype = types[int(torch.randint(len(types), (1,), generator=gen))]
            k = int(torch.randint(len(seeds[dtype].names), (1,), generator=gen))
            seed_imgs.append(seeds[dtype].images[k])
            prompts.append(defect_prompt(cfg, dtype))
        if seed_imgs:
            latents.append(encode(TrainingBatches.apply_flip(torch.stack(seed_imgs), flip[:n_seed])))
        latents.append(cache["normals"][flip[n_seed:].to(device), idx[n_seed:].to(device)])
        prompts += [normal_prompt] * (t.batch_size - n_seed)
        zt, tt, eps = noisy(torch.cat(latents))
        ctx = model.prompt_encoder(maybe_empty(prompts))
        return F.mse_loss(model.unet(zt, tt, encoder_hidden_states=ctx).sample, eps)

    # ---- stages "control-<type>"
    def control_stage(dtype: str) -> Stage:
        seed = seeds[dtype]
        prompt = defect_prompt(cfg, dtype)
        holder: dict[str, torch.nn.Module] = {}
        place = cfg.sampling.placement

        def setup(fresh: bool) -> None:
            if fresh:
                model.reset_control_from_unet(dtype)
            set_trainable(model.control(dtype))
            holder["unet"] = model.controlled_unet(dtype)

        def loss(_step: int) -> torch.Tensor:
            idx, flip = batches.draw()
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
            composites, trimaps, defects = [], [], []
            for i in idx.tolist():
                failures = []
                for _ in range(CONTROL_SEED_REDRAWS):  # another seed when one does not fit normal i
                    k = int(rng.integers(len(seed.names)))
                    try:
                        cp = cut_paste(normals_u8[i].permute(1, 2, 0).numpy(),
                                       seed.images[k].permute(1, 2, 0).numpy(), seed.masks[k].numpy(), fg[i], rng,
                                       **place.model_dump())
                        break
                    except MaskDoesNotFit as e:
                        failures.append(f"{seed.names[k]}: {e}")
                else:
                    raise MaskDoesNotFit(f"no {dtype} seed fits normal image {i} in {CONTROL_SEED_REDRAWS} draws "
                                         f"(check the foreground settings); last: {failures[-1]}")
                composites.append(torch.from_numpy(cp.image).permute(2, 0, 1))
                trimaps.append(torch.from_numpy(make_trimap(cp.mask, fg[i]))[None])
                defects.append(torch.from_numpy(cp.mask.astype(np.float32))[None])
            x = TrainingBatches.apply_flip(torch.stack(composites), flip)
            trimap = TrainingBatches.apply_flip(torch.stack(trimaps), flip)
            zt, tt, eps = noisy(encode(x))
            with torch.no_grad():
                ctx = model.prompt_encoder(maybe_empty([prompt] * len(idx)))
            hint = model.control(dtype).encode_hint(trimap.to(device))
            defect = TrainingBatches.apply_flip(torch.stack(defects), flip)
            return defect_weighted_mse(holder["unet"](zt, tt, ctx, hint), eps, defect, t.defect_loss_weight)

        return Stage(f"control-{dtype}", t.control_steps, t.control_lr,
                     lambda: model.control(dtype).parameters(), loss, setup)

    stages = [Stage("domain", t.domain_steps, t.domain_lr,
                    lambda: (p for m in (model.unet, model.prompt_encoder) for p in m.parameters()),
                    domain_loss, domain_setup)]
    stages += [control_stage(d) for d in types]
    trainer = Trainer(run_dir, model, stages, checkpoint_every=t.checkpoint_every, keep=t.keep_checkpoints,
                      log_every=t.log_every, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                      state_extra=lambda: {"scaling_factor": model.scaling_factor, "defect_types": types,
                                           "base_checkpoint": str(base) if base else None},
                      progress=progress, generators={"batches": gen})
    return train_from_base(trainer, model, base, resume)


def load_adabldm(path: str | Path, overrides: dict | None = None) -> tuple[AdaBLDMConfig, AdaBLDMModel, dict]:
    """Config, model and checkpoint state extras from an AdaBLDM checkpoint or run folder.
    `overrides` may change sampling/foreground/runtime settings, never the model."""
    ckpt, cfg, extra = load_run_config(path, "adabldm", overrides, frozenset({"control"}))
    types = extra.get("defect_types")
    if not types:
        raise CheckpointError(f"{ckpt} records no defect types (not an AdaBLDM checkpoint?)")
    model = AdaBLDMModel(cfg, types)
    load_model_weights(model, ckpt)
    if extra.get("scaling_factor") is not None:
        model.set_scaling_factor(extra["scaling_factor"])
    return cfg, model.eval(), extra


def run_seed_names(ckpt: Path) -> dict[str, list[str]]:
    """The seed defects a run trained on, per type (its seeds.json)."""
    f = ckpt.parent.parent / "seeds.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing: the run does not record its seed defects")
    return json.loads(f.read_text())
