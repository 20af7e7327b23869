"""`edgeinspect generate dualanodiff`: anomaly image + mask pairs from a trained DualAnoDiff run.

Output i is made from seed `item_seed(sampling.seed, defect type, i)` (generation/writer.py)
alone: its noises and, with BCM, sampling.strength < 1 or sampling.keep_background, its background (a normal image of
<data>/train/good drawn with that seed; the whole normal image is the background, which is right
for textures such as MTD tiles). Outputs are generated in fixed batches
[k * batch_size, (k + 1) * batch_size), and a batch is always computed whole, even when some of its
items were written before a kill, so a resumed job computes every image with exactly the same
batch as the first attempt did and writes only the missing ones (GenerationWriter: atomic PNGs,
index updated after each pair, no duplicates or gaps).

`run_dual_job` is that job on any networks: `generate_dualanodiff` gives it a trained run's torch
networks, generation/dualanodiff_bundle.py a bundle's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from edgeinspect.config import DualAnoDiffConfig, dump_config
from edgeinspect.data.mvtec import MVTecFolder, image_to_tensor, read_image, resize_image, tensor_to_image
from edgeinspect.core.ddim import DDIM
from edgeinspect.runtime.dual import DualSampler, PromptContexts
from edgeinspect.generation.writer import SEEDING, GenerationWriter, item_seed
from edgeinspect.core.networks import Networks, torch_networks
from edgeinspect.core.runs import resolve_checkpoint
from edgeinspect.training.dualanodiff import load_dualanodiff


def background_index(seed: int, count: int) -> int:
    """The normal image used as output `seed`'s BCM background."""
    return int(np.random.default_rng(seed).integers(count))


def generate_dualanodiff(model: Path, out_dir: Path, n: int, data_root: Path | None = None,
                         overrides: dict | None = None, progress: bool = True) -> Path:
    """Generate (or complete) `n` pairs into `out_dir` from a trained run; returns `out_dir`."""
    cfg, net, extra = load_dualanodiff(model, overrides)
    device = torch.device(cfg.runtime.device)
    with torch.inference_mode():
        enc = net.prompt_encoder
        contexts = PromptContexts(enc([cfg.prompts.whole_prompt]), enc([cfg.prompts.part_prompt]), enc([""]))
    return run_dual_job(cfg, torch_networks(net.role_modules(), device), contexts,
                        {"model": str(resolve_checkpoint(model).resolve())}, extra.get("defect_type"), out_dir, n,
                        data_root, progress)


def run_dual_job(cfg: DualAnoDiffConfig, networks: Networks, contexts: PromptContexts, source: dict,
                 defect_type: str | None, out_dir: Path, n: int, data_root: Path | None = None,
                 progress: bool = True) -> Path:
    """Generate (or complete) `n` pairs into `out_dir` on `networks` (a run's torch networks or a bundle's);
    `source` names the model in the job's settings. Returns `out_dir`."""
    s = cfg.sampling
    size = cfg.model.image_size
    latent_shape = (cfg.model.vae.latent_channels, cfg.model.latent_size, cfg.model.latent_size)
    sampler = DualSampler(networks, DDIM(cfg.scheduler), contexts, s, latent_shape, background=cfg.bcm.enabled)
    normals = None
    if sampler.needs_images:
        data_root = data_root or cfg.train.data_root
        if data_root is None:
            raise ValueError("background images (BCM's, the start when sampling.strength < 1, those "
                             "sampling.keep_background keeps or sampling.paste_feather pastes onto) are normal "
                             "images: pass the data folder (its train/good is used)")
        normals = MVTecFolder(data_root, "train", size, defect_types=["good"]).samples
    settings = {
        "method": "dualanodiff",
        **source,
        "defect_type": defect_type,
        "seeding": SEEDING,
        "prompts": {"whole": cfg.prompts.whole_prompt, "part": cfg.prompts.part_prompt},
        "sampling": dump_config(s),
        "image_size": size,
        "backgrounds": str(Path(data_root).resolve() / "train" / "good") if normals is not None else None,
    }
    writer = GenerationWriter(out_dir, settings, n)
    pending = set(writer.pending())
    if not pending:
        return Path(out_dir)

    with writer.progress("dualanodiff", enabled=progress) as bar:
        for start in range(0, n, s.batch_size):
            batch = list(range(start, min(start + s.batch_size, n)))
            if not pending.intersection(batch):
                continue
            seeds = [item_seed(s.seed, defect_type, i) for i in batch]
            backgrounds, sources = None, [None] * len(batch)
            if normals is not None:
                picks = [normals[background_index(seed, len(normals))].path for seed in seeds]
                backgrounds = torch.stack([image_to_tensor(resize_image(read_image(p), size)) for p in picks])
                sources = [p.name for p in picks]
            t0 = time.perf_counter()
            out = sampler.sample(seeds, backgrounds)
            sampling_s = (time.perf_counter() - t0) / len(batch)
            for k, i in enumerate(batch):
                if i not in pending:
                    continue
                record = {"seed": seeds[k], "background": sources[k], "defect_type": defect_type,
                          "sampling_s": sampling_s}
                writer.write(i, tensor_to_image(out.whole[k]), out.masks[k], record,
                             extras={"part": tensor_to_image(out.part[k])})
                bar.update(1)
    return Path(out_dir)
