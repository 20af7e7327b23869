"""`edgeinspect generate adabldm`: defective images with exact masks from normal images.

Item i of a job is a pure function of (settings, i): items are grouped by type, n_per_type each, and
item j of a type has the seed item_seed(sampling.seed, type, j) (generation/writer.py), which picks
the normal image, the real seed mask, its placement and the noises; a type generated alone gets the
same items as in a job with all types. So a killed job rerun into the same folder continues where it
stopped and regenerates nothing twice (generation/writer.py keeps the index).

Per batch: Algorithm 1 (runtime/blended.py) on the networks of the chosen backend, then per sample
Algorithm 2 (runtime/adaptation.py) in PyTorch on a fresh copy of the decoder. `run_blended_job` is
that job whatever its source: `generate_adabldm` feeds it a trained run's torch networks,
generation/adabldm_bundle.py a bundle's networks, decoder weights, contexts and seed masks.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeinspect.config import AdaBLDMConfig, dump_config
from edgeinspect.data.mvtec import MVTecFolder, tensor_to_image, uint8_to_model
from edgeinspect.data.trimap import MaskDoesNotFit, make_trimap, place_mask
from edgeinspect.core.roles import ROLE_SIGNATURES
from edgeinspect.runtime.adaptation import LatentDecoder, adapt_decoder
from edgeinspect.runtime.blended import BlendedSampler, paste
from edgeinspect.core.ddim import DDIM
from edgeinspect.generation.writer import SEEDING, GenerationWriter, item_seed
from edgeinspect.core.networks import Networks, torch_networks
from edgeinspect.training.adabldm import defect_prompt, foregrounds, load_adabldm, load_seeds, run_seed_names
from edgeinspect.core.runs import resolve_checkpoint

# A placement that cannot fit on one normal image is retried on others; this many failures in a
# row for one item mean the seeds do not fit this data at all.
MAX_PLACEMENT_ATTEMPTS = 20


@dataclass
class PlannedItem:
    index: int
    seed: int
    defect_type: str
    normal: int  # index into the normal images
    seed_defect: int  # index into the type's seed defects
    mask: np.ndarray  # bool (H, W), wholly inside the foreground
    placement: dict
    placement_failures: list[str]


def plan_item(i: int, base_seed: int, types: list[str], n_per_type: int, n_normals: int, seed_masks: dict,
              fg: np.ndarray, placement) -> PlannedItem:
    """Draw item i's normal image, seed defect and placement from its own generator."""
    dtype = types[i // n_per_type]
    seed = item_seed(base_seed, dtype, i % n_per_type)
    rng = np.random.default_rng(seed)
    failures = []
    for _ in range(MAX_PLACEMENT_ATTEMPTS):
        normal = int(rng.integers(n_normals))
        k = int(rng.integers(len(seed_masks[dtype])))
        try:
            placed = place_mask(seed_masks[dtype][k], fg[normal], rng, **placement.model_dump())
        except MaskDoesNotFit as e:
            failures.append(f"normal {normal}, seed {k}: {e}")
            continue
        return PlannedItem(i, seed, dtype, normal, k, placed.mask, placed.to_json(), failures)
    raise MaskDoesNotFit(f"item {i} ({dtype}): no seed mask fits any of {MAX_PLACEMENT_ATTEMPTS} normal images "
                         f"drawn; last: {failures[-1]}")


@dataclass
class BlendedJob:
    """What an AdaBLDM generation job runs with, whether from a trained run (torch) or a bundle (its
    backend): the loop's networks per defect type, the original decoder that each sample's adaptation
    copies, the prompt contexts and the seed masks; `source` names the model in the job's settings."""

    cfg: AdaBLDMConfig
    types: list[str]
    networks: Callable[[str], Networks]  # defect type -> vae_encoder, trimap_encoder, unet, vae_decoder
    decoder: LatentDecoder
    prompts: dict[str, str]  # defect type -> its prompt
    contexts: dict[str, torch.Tensor]  # defect type -> its prompt's embedding (1, L, D)
    empty_context: torch.Tensor  # (1, L, D)
    seed_masks: dict[str, np.ndarray]  # defect type -> bool (k, H, W) at the model size
    seed_names: dict[str, list[str]]  # defect type -> the k seed images' names
    source: dict


def generate_adabldm(model: str | Path, out_dir: str | Path, n_per_type: int, data_root: str | Path | None = None,
                     defect_types: list[str] | None = None, overrides: dict | None = None,
                     progress: bool = True, keep_before: bool = True) -> Path:
    """Generate n_per_type defects of each type into out_dir (resumable) from a trained run; returns out_dir."""
    ckpt = resolve_checkpoint(model)
    cfg, net, _ = load_adabldm(ckpt, overrides)
    device = torch.device(cfg.runtime.device)
    if cfg.runtime.backend != "torch":
        raise ValueError("a trained run generates with the torch backend; export it to a bundle and use "
                         "--bundle for onnxruntime/TensorRT")
    root = Path(data_root or cfg.train.data_root)
    types = defect_types or list(net.defect_types)
    unknown = sorted(set(types) - set(net.defect_types))
    if unknown:
        raise ValueError(f"no control branch for {unknown}; this model has {net.defect_types}")
    seed_names = run_seed_names(ckpt)
    seeds = load_seeds(root, {k: seed_names[k] for k in types}, cfg.model.image_size)
    net.to(device)
    prompts = {t: defect_prompt(cfg, t) for t in types}
    with torch.inference_mode():
        contexts = {t: net.prompt_encoder([p]) for t, p in prompts.items()}
        empty = net.prompt_encoder([""])
    job = BlendedJob(
        cfg, types, lambda t: torch_networks(net.role_modules(t), device, ROLE_SIGNATURES),
        LatentDecoder.from_vae(net.vae).to(device), prompts, contexts, empty,
        {k: v.masks.numpy() for k, v in seeds.items()}, {k: v.names for k, v in seeds.items()},
        {"checkpoint": str(ckpt)})
    return run_blended_job(job, out_dir, n_per_type, root, progress, keep_before)


def run_blended_job(job: BlendedJob, out_dir: str | Path, n_per_type: int, data_root: Path, progress: bool = True,
                    keep_before: bool = True) -> Path:
    """Plan, sample (Algorithm 1 on the job's networks), adapt (Algorithm 2 in PyTorch) and write every
    pending item of the job; returns out_dir."""
    cfg, types = job.cfg, job.types
    s = cfg.sampling
    normals = MVTecFolder(data_root, "train", cfg.model.image_size)
    normals_u8, _, _ = normals.load_all()
    fg = foregrounds(cfg, normals_u8)
    settings = {"method": "adabldm", **job.source, "data_root": str(data_root), "defect_types": types,
                "n_per_type": n_per_type, "seeding": SEEDING, "sampling": dump_config(s),
                "foreground": dump_config(cfg.foreground)}
    writer = GenerationWriter(out_dir, settings, total=n_per_type * len(types))
    schedule = DDIM(cfg.scheduler)

    pending = writer.pending()
    with writer.progress("adabldm", progress) as bar:
        for dtype in types:
            todo = [i for i in pending if types[i // n_per_type] == dtype]
            if not todo:
                continue
            sampler = BlendedSampler(job.networks(dtype), schedule, s, cfg.model.vae.downsample_factor)
            prompt = job.prompts[dtype]
            for start in range(0, len(todo), s.batch_size):
                plans = [plan_item(i, s.seed, types, n_per_type, len(normals_u8), job.seed_masks, fg, s.placement)
                         for i in todo[start:start + s.batch_size]]
                for p in plans:
                    if p.placement_failures:
                        warnings.warn(f"item {p.index}: seed mask did not fit {len(p.placement_failures)} normal "
                                      f"image(s) before one did: {p.placement_failures[0]}", stacklevel=2)
                b = len(plans)
                x_ok = uint8_to_model(normals_u8[[p.normal for p in plans]])
                mask = torch.from_numpy(np.stack([p.mask for p in plans]))[:, None].float()
                trimaps = np.stack([make_trimap(p.mask, fg[p.normal]) for p in plans])
                trimap = torch.from_numpy(trimaps)[:, None]
                t0 = time.perf_counter()
                res = sampler.sample(x_ok, mask, trimap, job.contexts[dtype].expand(b, -1, -1),
                                     [p.seed for p in plans], uncond_context=job.empty_context.expand(b, -1, -1))
                sampling_s = (time.perf_counter() - t0) / b
                for k, p in enumerate(plans):
                    t1 = time.perf_counter()
                    ad = adapt_decoder(job.decoder, res.latents[k], x_ok[k], mask[k], s.adapt_steps, s.adapt_lr,
                                       s.lambda_con, s.adapt_scope) if s.adapt_steps else None
                    adapt_s = time.perf_counter() - t1
                    record = {"seed": p.seed, "defect_type": dtype, "prompt": prompt,
                              "source_image": normals.samples[p.normal].path.name,
                              "seed_defect": job.seed_names[dtype][p.seed_defect], "placement": p.placement,
                              "placement_failures": p.placement_failures, "sampling_s": sampling_s,
                              "adaptation_s": adapt_s}
                    if ad is not None:
                        record["adaptation_loss"] = {"outside_first": ad.loss_outside[:1], "outside_last":
                                                     ad.loss_outside[-1:], "inside_last": ad.loss_inside[-1:]}
                    extras = {"trimap": np.round(trimaps[k] * 255).astype(np.uint8)}
                    if keep_before:
                        extras["before_adaptation"] = tensor_to_image(res.images[k])
                    image = ad.image if ad is not None else res.images[k].cpu()
                    if s.paste_feather is not None:
                        source = res.source_images[k].cpu() if res.source_images is not None else None
                        image = paste(image, source, x_ok[k], mask[k], s.paste_feather, s.paste_mode)
                    writer.write(p.index, tensor_to_image(image), p.mask, record, extras)
                    bar.update(1, sampling_s=sampling_s, adapt_s=adapt_s)
    return Path(out_dir)
