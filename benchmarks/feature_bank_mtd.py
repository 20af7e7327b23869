"""Where GLAD's image score comes from: its scoring against other references -> results/.

    python benchmarks/feature_bank_mtd.py --data ../shared/data/mtd --sizes 128 --roundtrip runs/glad_mtd_edge

GLAD scores a frame by comparing its extractor features with those of its own reconstruction
(per layer, min over positions of 1 - cos; upsample, sum, blur, mean of the top-K pixels). This
benchmark keeps that scoring and swaps the reconstruction for two references:
- `--sizes`: a bank of feature vectors from the category's training normals (a random `--bank`
  positions per layer, seeded), frames resized to each size; blur sigma and K scale from GLAD's edge
  settings (3.0 px and K = 100 at 128 px). No diffusion model: whether the extractor can carry the
  decision when the reference is real normal content;
- `--roundtrip RUN`: the frame's own round trip through a GLAD run's autoencoder, scored with that
  run's settings. No diffusion either: what the autoencoder alone puts into every frame's score.
Writes results/feature_bank_mtd.{md,json,png}: per row the image/pixel metrics (edgeinspect.evaluation.metrics.evaluate),
per-type image AUROC, the median scores of normal and defective frames and the time taken; the figure
shows each reference's map on the first test image of each type.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgeinspect.core.atomic import write_text_atomic
from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.data.mvtec import MVTecFolder, uint8_to_model
from edgeinspect.data.visualize import grid, heatmap_overlay, label, write_png
from edgeinspect.evaluation.machine import cpu_name
from edgeinspect.evaluation.metrics import auroc, evaluate
from edgeinspect.models.features import FeatureExtractor, build_feature_extractor
from edgeinspect.runtime.glad import min_cosine_distance_maps
from edgeinspect.runtime.scoring import gaussian_blur, topk_mean_score

RESULTS = Path(__file__).resolve().parent / "results"
EDGE_SIZE, EDGE_SIGMA, EDGE_TOP_K = 128, 3.0, 100


@torch.no_grad()
def features(extractor: FeatureExtractor, images_u8: torch.Tensor, batch: int = 32) -> list[torch.Tensor]:
    """Extractor maps of uint8 frames (N, 3, H, W), one (N, C, h, w) tensor per layer."""
    out: list[list[torch.Tensor]] = []
    for s in range(0, len(images_u8), batch):
        out.append(list(extractor(uint8_to_model(images_u8[s:s + batch]))))
    return [torch.cat(level) for level in zip(*out, strict=True)]


def sample_bank(feats: list[torch.Tensor], per_layer: int, seed: int) -> list[torch.Tensor]:
    """Per layer, `per_layer` feature vectors drawn without replacement from all positions of all
    images (all of them if fewer), as a (1, C, 1, M) map that min_cosine_distance_maps accepts."""
    g = torch.Generator().manual_seed(seed)
    bank = []
    for f in feats:
        flat = f.permute(1, 0, 2, 3).flatten(1)  # (C, N*h*w)
        m = flat.shape[1]
        idx = torch.randperm(m, generator=g)[:per_layer] if per_layer < m else torch.arange(m)
        bank.append(flat[:, idx].contiguous().view(flat.shape[0], 1, 1, -1).transpose(0, 1))
    return bank


@torch.no_grad()
def bank_maps(test_feats: list[torch.Tensor], bank: list[torch.Tensor], size: int, chunk_mb: float = 256.0
              ) -> torch.Tensor:
    """GLAD's map with the bank as the reference: per layer min over the bank of (1 - cos), bilinear
    to `size`, summed over layers. (N, size, size)."""
    return torch.cat([min_cosine_distance_maps([f[i:i + 1] for f in test_feats], bank, (size, size), chunk_mb)
                      for i in range(test_feats[0].shape[0])])


def metrics_row(test_set: MVTecFolder, labels: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor,
                scores: torch.Tensor) -> dict:
    """edgeinspect.evaluation.metrics.evaluate's metrics plus the image AUROC of each defect type against the normals."""
    metrics = evaluate(labels.numpy(), scores.numpy(), masks.numpy(), maps.numpy())
    types = np.array([s.defect_type for s in test_set.samples])
    y, s = labels.numpy(), scores.numpy()
    per_type = {t: auroc(y[(types == t) | (types == "good")], s[(types == t) | (types == "good")])
                for t in sorted(set(types) - {"good"})}
    return {"test_images": len(y), **{k: round(v, 4) for k, v in metrics.items()},
            "image_auroc_by_type": {t: round(v, 4) for t, v in per_type.items()},
            "normal_score_median": round(float(np.median(s[y == 0])), 4),
            "defect_score_median": round(float(np.median(s[y == 1])), 4)}


def run_size(data: Path, size: int, extractor: FeatureExtractor, per_layer: int, seed: int
             ) -> tuple[dict, torch.Tensor]:
    """The bank row and its maps (N, size, size)."""
    t0 = time.perf_counter()
    train, _, _ = MVTecFolder(data, "train", size).load_all()
    test_set = MVTecFolder(data, "test", size)
    test, masks, labels = test_set.load_all()
    bank = sample_bank(features(extractor, train), per_layer, seed)
    sigma = EDGE_SIGMA * size / EDGE_SIZE
    k = round(EDGE_TOP_K * (size / EDGE_SIZE) ** 2)
    maps = gaussian_blur(bank_maps(features(extractor, test), bank, size), sigma)
    return {"reference": "bank of training-normal features", "size": size, "blur_sigma": sigma, "top_k": k,
            "bank": [int(b.shape[-1]) for b in bank], "train_images": len(train),
            **metrics_row(test_set, labels, masks, maps, topk_mean_score(maps, k)),
            "seconds": round(time.perf_counter() - t0, 1)}, maps


@torch.no_grad()
def roundtrip_row(data: Path, run: Path, batch: int = 16) -> tuple[dict, torch.Tensor]:
    """GLAD's final scoring exactly as the run `run` does it (its extractor, feature size, blur, K), with
    the reconstruction replaced by the frame's own round trip through the run's autoencoder: what the
    autoencoder alone puts into every frame's score. The row and its maps (N, H, W)."""
    from edgeinspect.runtime.run_detector import run_pipeline
    from edgeinspect.core.timing import StageTimer

    t0 = time.perf_counter()
    cfg, pipe, _ = run_pipeline(run, None)
    test_set = MVTecFolder(data, "test", cfg.model.image_size)
    test, masks, labels = test_set.load_all()
    timer = StageTimer(pipe.nets.device)
    maps = []
    for s in range(0, len(test), batch):
        x = uint8_to_model(test[s:s + batch]).to(pipe.nets.device)
        rt = pipe.nets["vae_decoder"](latent=pipe.nets["vae_encoder"](image=x)["latent"])["image"].clamp(-1, 1)
        maps.append(pipe.anomaly_maps(x, rt, timer).float().cpu())
    maps = torch.cat(maps)
    return {"reference": f"the frame's round trip through {run}'s autoencoder", "size": cfg.model.image_size,
            "blur_sigma": cfg.scoring.blur_sigma, "top_k": pipe.inference.top_k, "bank": None,
            **metrics_row(test_set, labels, masks, maps, topk_mean_score(maps, pipe.inference.top_k)),
            "seconds": round(time.perf_counter() - t0, 1)}, maps


def figure(data: Path, rows: list[dict], maps: list[torch.Tensor], out_png: Path, size: int = 128) -> None:
    """For the first test image of each type: the frame, then each row's map over it, every column on
    its own scale (its maps' 1st to 99.9th percentile over the whole split), ground truth outlined."""
    test_set = MVTecFolder(data, "test", size)
    first: dict[str, int] = {}
    for i, smp in enumerate(test_set.samples):
        first.setdefault(smp.defect_type, i)
    scales = [(float(np.percentile(m.numpy(), 1)), float(np.percentile(m.numpy(), 99.9))) for m in maps]
    names = ["bank" if r["bank"] else "own round trip" for r in rows]
    tiles = []
    for t, i in first.items():
        img, mask = test_set.load(i)
        line = [label(img, t)]
        for name, m, (lo, hi) in zip(names, maps, scales, strict=True):
            line.append(label(heatmap_overlay(img, m[i].numpy(), lo, hi, mask), name))
        tiles.append(line)
    write_png(out_png, grid(tiles))


def machine() -> dict:
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform()}


def report(rows: list[dict], mach: dict, args: argparse.Namespace, command: str) -> str:
    lines = [
        f"# GLAD's scoring features against a bank of training normals ({args.data.name})", "",
        "What GLAD's scoring (EfficientNet-Lite0 strides 4/8/16, per layer min-over-positions 1 - cos, "
        "blur, top-K mean) gives when the reference is not a reconstruction but feature vectors of the "
        f"category's training normals ({args.bank} random positions per layer, seed {args.seed}). No "
        "diffusion model is involved. It is a reference point, not a bound: it shows whether the extractor "
        "at this frame size can carry the decision when the reference is real normal content, so that a "
        "reconstruction-based score that falls far short of it is held back by its reconstructions.", "",
        "## Command", "", f"    {command}", "",
        "## Machine", "",
        f"{mach['cpu']}, {mach['threads']} torch threads, no GPU, torch {mach['torch']}, {mach['platform']}.", "",
        "## Results (whole test split)", "",
        "| reference | frame px | blur sigma | K | image AUROC | pixel AUROC | pixel AP | PRO | "
        + " | ".join(f"image AUROC {t}" for t in rows[0]["image_auroc_by_type"])
        + " | median score normal / defective | s |",
        "|---" * (10 + len(rows[0]["image_auroc_by_type"])) + "|",
    ]
    for r in rows:
        lines.append(f"| {r['reference']} | {r['size']} | {r['blur_sigma']:.1f} | {r['top_k']} | "
                     f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['pixel_ap']:.4f} | {r['pro']:.4f} | "
                     + " | ".join(f"{v:.4f}" for v in r["image_auroc_by_type"].values())
                     + f" | {r['normal_score_median']:.3f} / {r['defect_score_median']:.3f} | {r['seconds']:.0f} |")
    lines += ["", f"![maps]({args.name}.png)", "",
              "Rows: the first test image of each type; columns: the frame, then each reference's map over it "
              "(each column on its own scale: its maps' 1st to 99.9th percentile over the split; white outline: "
              "ground truth).", "", "Bank sizes per layer (vectors): "
              + "; ".join(f"{r['size']} px: {r['bank']}" for r in rows if r["bank"]) + ".", ""]
    if any(r["bank"] is None for r in rows):
        lines += ["The round-trip rows score each frame against its own autoencoder round trip with the run's "
                  "own GLAD scoring settings (`--roundtrip`): no diffusion, so their scores are what the "
                  "autoencoder alone puts into every frame's score.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="*", default=[128])
    ap.add_argument("--bank", type=int, default=200_000, help="feature vectors per layer in the bank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--roundtrip", type=Path, nargs="*", default=[],
                    help="GLAD runs: add a row scoring each frame against its round trip through the run's "
                         "autoencoder, with the run's scoring settings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--name", default="feature_bank_mtd")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the markdown report from the JSON of an earlier run (same --name)")
    args = ap.parse_args()
    if args.report_only:
        stored = json.loads((args.results / f"{args.name}.json").read_text())
        write_text_atomic(args.results / f"{args.name}.md",
                          report(stored["results"], stored["machine"], args, stored["command"]))
        return 0
    torch.set_num_threads(args.threads)
    extractor = build_feature_extractor()
    rows, maps = [], []
    for row, m in [*(run_size(args.data, size, extractor, args.bank, args.seed) for size in args.sizes),
                   *(roundtrip_row(args.data, run) for run in args.roundtrip)]:
        rows.append(row)
        maps.append(m)
        print(json.dumps(row), flush=True)
    if not rows:
        ap.error("nothing to measure: give --sizes and/or --roundtrip")
    command = "python benchmarks/feature_bank_mtd.py " + " ".join(sys.argv[1:])
    args.results.mkdir(parents=True, exist_ok=True)
    mach = machine()
    write_json_atomic(args.results / f"{args.name}.json", {"command": command, "machine": mach, "results": rows})
    figure(args.data, rows, maps, args.results / f"{args.name}.png")
    write_text_atomic(args.results / f"{args.name}.md", report(rows, mach, args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
