"""Downstream value of generated defects: one small supervised segmenter per defect source.

The generators (AdaBLDM, DualAnoDiff) are judged the way their papers judge them: train the same
segmentation model on normal images plus (i) cut-paste defects made from the real seed defects or
(ii) generated defects, and measure it on the real defects no generator has seen.

    # the cut-paste baseline, in the generation-folder layout
    python benchmarks/downstream.py cutpaste --data ../shared/data/mtd --split configs/mtd_fewshot_split.json \
        --seeds adabldm --per-type 200 --size 128 --out runs/cutpaste_mtd_adabldm
    # one segmenter per defect folder, same seed and steps; results merged into --out
    python benchmarks/downstream.py train --data ../shared/data/mtd --split configs/mtd_fewshot_split.json \
        --defects runs/cutpaste_mtd_adabldm --name cutpaste --defects runs/adabldm_mtd --name adabldm \
        --out benchmarks/results/downstream_mtd.json

Defect folders: images/<id>.png, masks/<id>.png (0/255) and index.json
{"settings": {...}, "items": {"<id>": {"image": ..., "mask": ..., ...}}} (edgeinspect.generation.writer).
Normals: train/good. Evaluation: test/good and the split's `evaluation` defects (selected by type and
name, so MVTec-AD's repeated file names cannot leak seeds in), with their ground-truth masks.

The segmenter: EfficientNet-Lite0 encoder (shipped ImageNet weights, strides 4/8/16) fine-tuned with
a small learning rate with its BatchNorm statistics frozen (batches are small and half of them are
defect-free), a light FPN decoder to one logit per pixel, focal + dice loss, AdamW, flips, batches
of half normals and half defect images. Pixel AUROC / AP over every evaluation pixel; image AUROC
from the maximum of the lightly blurred probability map; pixel AP per defect type over that type's
images and all normals.

Cost (128 px, batch 16, fine-tuned encoder, measured on this project's 2-core CPU while other jobs
ran): about 0.45 s per step with one torch thread, so the default 1500 steps take about 12 minutes;
a frozen encoder (--encoder-lr 0) costs about 0.23 CPU-s per step but segments worse. Two threads on
a busy 2-core machine were four times slower (2 s per step: the threads wait on each other), hence
--threads 1 by default.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.data.cutpaste import cut_paste
from edgeinspect.data.fewshot import FewShotSplit
from edgeinspect.data.mvtec import MVTecFolder, resize_image, resize_mask, read_image
from edgeinspect.data.trimap import MaskDoesNotFit, estimate_foreground
from edgeinspect.evaluation.metrics import auroc, average_precision, evaluate
from edgeinspect.generation.writer import GenerationError, GenerationWriter, load_index
from edgeinspect.models.features import build_feature_extractor

CUTPASTE_MAX_REDRAWS = 20  # fresh (normal, seed) draws before a source is declared unusable


# --------------------------------------------------------------------------- data


@dataclass
class DefectImages:
    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # bool (N, H, W)
    ids: list[str]
    settings: dict


def load_generated(folder: str | Path, size: int) -> DefectImages:
    """Every indexed item of a generation folder, resized to `size` (masks nearest-neighbour).

    PNGs that the index does not list (a job killed mid-item) are ignored; an index entry whose
    file is missing or unreadable is an error."""
    folder = Path(folder)
    index = load_index(folder)
    items = index.get("items", {})
    if not items:
        raise GenerationError(f"{folder}/index.json lists no items")
    ids = sorted(items, key=lambda k: (len(k), k))
    images = np.zeros((len(ids), size, size, 3), np.uint8)
    masks = np.zeros((len(ids), size, size), bool)
    for i, key in enumerate(ids):
        images[i] = resize_image(read_image(folder / items[key]["image"]), size)
        raw = cv2.imread(str(folder / items[key]["mask"]), cv2.IMREAD_GRAYSCALE)
        if raw is None:
            raise GenerationError(f"{folder}: cannot read mask {items[key]['mask']} of item {key}")
        masks[i] = resize_mask(raw > 127, size)
    return DefectImages(images, masks, ids, index.get("settings", {}))


def load_generated_folders(folders: list[str | Path], size: int) -> DefectImages:
    """Several generation folders as one training set (e.g. one DualAnoDiff run per defect type)."""
    parts = [load_generated(f, size) for f in folders]
    if len(parts) == 1:
        return parts[0]
    return DefectImages(np.concatenate([p.images for p in parts]), np.concatenate([p.masks for p in parts]),
                        [f"{Path(f).name}/{i}" for f, p in zip(folders, parts) for i in p.ids],
                        {str(f): p.settings for f, p in zip(folders, parts)})


def load_normals(root: str | Path, size: int) -> tuple[np.ndarray, list[str]]:
    """train/good as uint8 (N, size, size, 3) and the file names."""
    data = MVTecFolder(root, "train", size)
    return np.stack([data.load(i)[0] for i in range(len(data))]), [s.path.name for s in data.samples]


@dataclass
class EvaluationSet:
    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # bool (N, H, W)
    types: list[str]  # "good" for normals
    names: list[str]


def load_evaluation(root: str | Path, split: FewShotSplit, size: int) -> EvaluationSet:
    """test/good plus the split's evaluation defects, chosen by (type, name)."""
    data = MVTecFolder(root, "test", size)
    keep = [i for i, s in enumerate(data.samples)
            if s.defect_type == "good" or s.path.name in split.evaluation.get(s.defect_type, ())]
    found = {(data.samples[i].defect_type, data.samples[i].path.name) for i in keep}
    missing = [(t, n) for t, names in split.evaluation.items() for n in names if (t, n) not in found]
    if missing:
        raise FileNotFoundError(f"{len(missing)} evaluation images of the split are not in {root}/test, "
                                f"e.g. {missing[:3]}: wrong --data for this split?")
    loaded = [data.load(i) for i in keep]
    return EvaluationSet(np.stack([im for im, _ in loaded]), np.stack([m for _, m in loaded]),
                         [data.samples[i].defect_type for i in keep], [data.samples[i].path.name for i in keep])


def load_seeds(root: str | Path, split: FewShotSplit, which: str, size: int
               ) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """Per defect type, the real seed defects as (name, image, mask) at `size`."""
    wanted = split.seeds(which)
    data = MVTecFolder(root, "test", size, defect_types=sorted(wanted))
    seeds: dict[str, list] = {t: [] for t in wanted}
    for i, s in enumerate(data.samples):
        if s.path.name in wanted[s.defect_type]:
            image, mask = data.load(i)
            if not mask.any():
                raise ValueError(f"seed {s.path} has an empty mask at {size} px; it cannot be cut out")
            seeds[s.defect_type].append((s.path.name, image, mask))
    short = {t: len(wanted[t]) - len(v) for t, v in seeds.items() if len(v) != len(wanted[t])}
    if short:
        raise FileNotFoundError(f"seed images of the split missing from {root}/test: {short}")
    return seeds


# --------------------------------------------------------------------------- cut-paste baseline


def autoencoder_roundtrip(checkpoint: str | Path, size: int):
    """image (uint8 HWC) -> the same image encoded and decoded by the autoencoder of an AdaBLDM checkpoint
    or of a DiAD run or checkpoint (the base autoencoder alone: configs/autoencoder_mtd_edge.yaml)."""
    from edgeinspect.core.runs import run_method
    from edgeinspect.data.mvtec import tensor_to_image, uint8_to_model
    from edgeinspect.runtime.torch_backend import load_diad
    from edgeinspect.training.adabldm import load_adabldm

    method = run_method(checkpoint)
    if method not in ("adabldm", "diad"):
        raise ValueError(f"--roundtrip takes an AdaBLDM or DiAD run or checkpoint, not a {method} one")
    cfg, model = load_adabldm(checkpoint)[:2] if method == "adabldm" else load_diad(checkpoint)
    if cfg.model.image_size != size:
        raise ValueError(f"--roundtrip {checkpoint} works at {cfg.model.image_size} px, not --size {size}")

    @torch.no_grad()
    def roundtrip(image: np.ndarray) -> np.ndarray:
        x = uint8_to_model(torch.from_numpy(image).permute(2, 0, 1)[None])
        return tensor_to_image(model.vae.decode(model.vae.encode(x).latent_dist.mean).sample[0])

    return roundtrip


def build_cutpaste(root: str | Path, split: FewShotSplit, seeds: Literal["adabldm", "fewshot"], per_type: int,
                   size: int, out: str | Path, foreground: Literal["whole", "otsu", "features"] = "whole",
                   seed: int = 0, feather: float = 0.0, progress: bool = True,
                   roundtrip: str | Path | None = None, edge_band: int = 0, edge_turns: str = "half") -> Path:
    """Write `per_type` cut-paste composites per defect type into a generation folder (resumable).

    Item i is a pure function of (seed, i): its normal, its seed defect, the foreground and the
    placement all come from a generator seeded with [seed, i]. With `roundtrip` (an AdaBLDM checkpoint)
    each composite is passed through that model's autoencoder: perfect defects at the fidelity of the
    generator's images, a reference for what its latent diffusion can give the segmenter (not a strict
    bound: guidance may draw a defect with more contrast than its round trip keeps)."""
    settings = {"source": "cutpaste", "data": str(root), "split_seed": split.seed, "seeds": seeds,
                "per_type": per_type, "size": size, "foreground": foreground, "seed": seed, "feather": feather,
                "roundtrip": str(roundtrip) if roundtrip else None, "edge_band": edge_band,
                "edge_turns": edge_turns}
    through_ae = autoencoder_roundtrip(roundtrip, size) if roundtrip else None
    types = split.defect_types
    writer = GenerationWriter(out, settings, total=per_type * len(types))
    normals, normal_names = load_normals(root, size)
    seed_sets = load_seeds(root, split, seeds, size)
    extractor = build_feature_extractor("efficientnet_lite0", "default", (8,)) if foreground == "features" else None
    foregrounds: dict[int, np.ndarray] = {}
    with writer.progress("cut-paste", progress) as bar:
        for i in writer.pending():
            t = types[i // per_type]
            rng = np.random.default_rng([seed, i])
            for redraw in range(CUTPASTE_MAX_REDRAWS):
                n = int(rng.integers(len(normals)))
                name, seed_image, seed_mask = seed_sets[t][int(rng.integers(len(seed_sets[t])))]
                if n not in foregrounds:
                    foregrounds[n] = estimate_foreground(normals[n], foreground, extractor)
                try:
                    cp = cut_paste(normals[n], seed_image, seed_mask, foregrounds[n], rng, feather=feather,
                                   edge_band=edge_band, edge_turns=edge_turns)
                    break
                except MaskDoesNotFit:
                    continue
            else:
                raise MaskDoesNotFit(f"item {i} ({t}): no seed fitted the foreground of {CUTPASTE_MAX_REDRAWS} "
                                     f"normal images (foreground {foreground!r}); try --foreground whole")
            image = through_ae(cp.image) if through_ae else cp.image
            writer.write(i, image, cp.mask, {"defect_type": t, "seed_file": name,
                                                "normal_file": normal_names[n],
                                                "placement": cp.placement.to_json(), "redraws": redraw})
            bar.update()
    return Path(out)


# --------------------------------------------------------------------------- the segmenter


class SegmenterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(128, ge=32)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(16, ge=2)
    defect_fraction: float = Field(0.5, gt=0, lt=1)  # share of each batch drawn from the defect images
    encoder_weights: str | None = "default"  # None: random init (tests only)
    encoder_lr: float = Field(1e-4, ge=0)  # 0 freezes the encoder
    decoder_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    decoder_channels: int = Field(64, ge=4)
    focal_gamma: float = Field(2.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    score_blur_sigma: float = Field(2.0, ge=0)  # image score: max of the map blurred with this sigma
    seed: int = 0


class Segmenter(nn.Module):
    """EfficientNet-Lite0 strides 4/8/16 -> FPN top-down path -> one logit per input pixel."""

    def __init__(self, s: SegmenterSettings):
        super().__init__()
        self.encoder = build_feature_extractor("efficientnet_lite0", s.encoder_weights, (4, 8, 16),
                                               allow_random=s.encoder_weights is None, frozen=s.encoder_lr == 0)
        c = s.decoder_channels
        self.lateral = nn.ModuleList(nn.Conv2d(ch, c, 1) for ch in self.encoder.channels)
        self.smooth = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                    nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(c, 1, 1)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        self.encoder.model.eval()  # ImageNet BatchNorm statistics stay: batches are small and skewed
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            y = lat(f) + F.interpolate(y, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return F.interpolate(self.head(self.smooth(y)), size=x.shape[-2:], mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, dice_weight: float) -> torch.Tensor:
    """Focal loss per pixel plus a soft Dice over the whole batch (one pooled foreground, so a batch
    of normals' empty masks still gives a defined Dice)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_true = p * target + (1 - p) * (1 - target)
    focal = ((1 - p_true) ** gamma * bce).mean()
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return focal + dice_weight * dice


def _to_batch(images: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    y = torch.from_numpy(np.ascontiguousarray(masks)).float().unsqueeze(1)
    return x, y


def train_segmenter(normals: np.ndarray, defects: DefectImages, settings: SegmenterSettings,
                    progress: bool = True) -> tuple[Segmenter, dict]:
    """Train from scratch (decoder) / ImageNet (encoder); returns the model and {train_seconds, steps,
    final_loss, seconds_per_step}. Same settings and data give the same model."""
    s = settings
    size = s.image_size
    for name, arr in (("normals", normals), ("defect images", defects.images)):
        if arr.ndim != 4 or arr.shape[1:] != (size, size, 3) or arr.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8 (N, {size}, {size}, 3), got {arr.dtype} {arr.shape}")
    if len(normals) == 0 or len(defects.images) == 0:
        raise ValueError("training needs at least one normal and one defect image")
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    model = Segmenter(s)
    decoder = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    groups = [{"params": decoder, "lr": s.decoder_lr}]
    if s.encoder_lr > 0:
        groups.append({"params": list(model.encoder.parameters()), "lr": s.encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    n_def = max(1, round(s.batch_size * s.defect_fraction))
    n_norm = s.batch_size - n_def
    empty = np.zeros((n_norm, size, size), bool)
    model.train()
    start = time.perf_counter()
    loss_value = float("nan")
    for _ in tqdm(range(s.steps), desc="segmenter", disable=not progress, unit="step"):
        ni = rng.integers(len(normals), size=n_norm)
        di = rng.integers(len(defects.images), size=n_def)
        images = np.concatenate([normals[ni], defects.images[di]])
        masks = np.concatenate([empty, defects.masks[di]])
        flips = rng.random((s.batch_size, 2)) < 0.5
        for k in range(s.batch_size):
            if flips[k, 0]:
                images[k], masks[k] = images[k, :, ::-1], masks[k, :, ::-1]
            if flips[k, 1]:
                images[k], masks[k] = images[k, ::-1], masks[k, ::-1]
        x, y = _to_batch(images, masks)
        loss = segmentation_loss(model(x), y, s.focal_gamma, s.dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
    seconds = time.perf_counter() - start
    model.eval()
    return model, {"train_seconds": seconds, "steps": s.steps, "seconds_per_step": seconds / s.steps,
                   "final_loss": loss_value}


@torch.no_grad()
def predict_maps(model: Segmenter, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Defect probability per pixel, float32 (N, H, W)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x, _ = _to_batch(images[i:i + batch_size], np.zeros(images[i:i + batch_size].shape[:3], bool))
        out.append(torch.sigmoid(model(x))[:, 0].numpy())
    return np.concatenate(out).astype(np.float32)


def image_scores(maps: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return maps.reshape(len(maps), -1).max(axis=1)
    return np.array([cv2.GaussianBlur(m, (0, 0), sigma).max() for m in maps])


def evaluate_segmenter(model: Segmenter, evaluation: EvaluationSet, settings: SegmenterSettings) -> dict:
    """Pixel AUROC / AP (and PRO) over all evaluation pixels, image AUROC / AP from the blurred map's
    maximum, and per defect type pixel AP and image AUROC against all normals."""
    maps = predict_maps(model, evaluation.images)
    scores = image_scores(maps, settings.score_blur_sigma)
    types = np.array(evaluation.types)
    labels = (types != "good").astype(int)
    res = evaluate(labels, scores, evaluation.masks, maps)
    per_type = {}
    for t in sorted(set(evaluation.types) - {"good"}):
        sel = (types == t) | (types == "good")
        per_type[t] = {"pixel_ap": average_precision(evaluation.masks[sel].ravel(), maps[sel].ravel()),
                       "image_auroc": auroc(labels[sel], scores[sel]), "n_images": int((types == t).sum())}
    return {**res, "per_type": per_type, "n_normal_images": int((labels == 0).sum()),
            "n_defect_images_evaluated": int(labels.sum())}


# --------------------------------------------------------------------------- command line


def _settings_from(args) -> SegmenterSettings:
    overrides = {"steps": args.steps, "image_size": args.size, "seed": args.seed}
    if args.encoder_lr is not None:
        overrides["encoder_lr"] = args.encoder_lr
    return SegmenterSettings(**overrides)


def run_train(args) -> dict:
    names = args.name or [Path(d.split(",")[0]).name for d in args.defects]
    if len(names) != len(args.defects):
        raise SystemExit(f"give one --name per --defects folder ({len(args.defects)} folders, {len(names)} names)")
    settings = _settings_from(args)
    torch.set_num_threads(args.threads)
    split = FewShotSplit.load(args.split)
    normals, _ = load_normals(args.data, settings.image_size)
    evaluation = load_evaluation(args.data, split, settings.image_size)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name, folder in zip(names, args.defects):
        defects = load_generated_folders(folder.split(","), settings.image_size)
        model, stats = train_segmenter(normals, defects, settings, progress=not args.quiet)
        metrics = evaluate_segmenter(model, evaluation, settings)
        results[name] = {**metrics, **stats, "n_defect_images": len(defects.ids),
                         "n_empty_defect_masks": int((~defects.masks.any(axis=(1, 2))).sum()),
                         "n_normal_train_images": len(normals), "defects": str(folder),
                         "defect_settings": defects.settings, "settings": settings.model_dump(),
                         "threads": args.threads, "command": shlex.join(sys.argv)}
        write_json_atomic(args.out, results)
        print(f"{name}: pixel AP {metrics['pixel_ap']:.3f}  pixel AUROC {metrics['pixel_auroc']:.3f}  "
              f"image AUROC {metrics['image_auroc']:.3f}  ({stats['train_seconds']:.0f} s, "
              f"{stats['seconds_per_step']:.3f} s/step)")
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    c = sub.add_parser("cutpaste", help="build the cut-paste baseline defect folder")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--split", type=Path, required=True)
    c.add_argument("--seeds", choices=("adabldm", "fewshot"), default="adabldm")
    c.add_argument("--per-type", type=int, default=200)
    c.add_argument("--size", type=int, default=128)
    c.add_argument("--foreground", choices=("whole", "otsu", "features"), default="whole",
                   help="where defects may go; 'whole' for textures and MTD tiles")
    c.add_argument("--feather", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--edge-band", type=int, default=0,
                   help="keep seeds reaching within this many px of their frame on the foreground's edge "
                        "(edge defects; as AdaBLDM's sampling.placement.edge_band)")
    c.add_argument("--edge-turns", choices=("half", "quarter"), default="half",
                   help="an edge seed's turns: 0/180 degrees (and mirrors) or any multiple of 90")
    c.add_argument("--roundtrip", type=Path, help="pass each composite through this AdaBLDM checkpoint's (or DiAD run's) autoencoder")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--quiet", action="store_true")
    t = sub.add_parser("train", help="train and evaluate one segmenter per defect folder")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--split", type=Path, required=True)
    t.add_argument("--defects", action="append", required=True,
                   help="generation folder, or several joined by commas (trained on together)")
    t.add_argument("--name", action="append", help="result name per --defects (default: the folder name)")
    t.add_argument("--steps", type=int, default=SegmenterSettings().steps)
    t.add_argument("--size", type=int, default=SegmenterSettings().image_size)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--encoder-lr", type=float, help="0 freezes the encoder")
    t.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 unless the cores are idle (see the module notes)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.verb == "cutpaste":
        out = build_cutpaste(args.data, FewShotSplit.load(args.split), args.seeds, args.per_type, args.size,
                             args.out, args.foreground, args.seed, args.feather, progress=not args.quiet,
                             roundtrip=args.roundtrip, edge_band=args.edge_band,
                             edge_turns=args.edge_turns)
        print(f"wrote {out}")
    else:
        run_train(args)


if __name__ == "__main__":
    main()
