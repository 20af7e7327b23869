"""A small sweep of the bank reference's settings on a category -> results/reference_sweep_mtd.{md,json}

    nice python benchmarks/reference_sweep_mtd.py --data ../shared/data/mtd --threads 1

What can raise the bank reference's pixel AUROC (the issue's target: 0.95): the extractor's input size
(`scoring.feature_size`), the feature layers used (subsets of `features.strides`), the blur
(`scoring.blur_sigma`, px of the 128-px model image) and the coreset size (`scoring.bank.size`). The bank is
built from the training normals only, as `edgeinspect bank` does (scoring.bank's candidates, projection,
seed); greedy k-centre picks are nested (the first k picks of a larger coreset are the k-coreset, same seed),
so one coreset per feature size serves every size. Per-level distance maps of the test frames are computed
once per (feature size, bank size) and combined per setting, with the same functions the pipelines use
(runtime.scoring's blur and image scores); the row the edge presets ship is measured through the pipelines
by benchmarks/reference_mtd.py. Nothing is fitted on the test split: it only reports.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeinspect.calibration.bank import candidate_vectors, greedy_coreset, training_normals
from edgeinspect.config import build_config
from edgeinspect.core.atomic import write_json_atomic, write_text_atomic
from edgeinspect.data.mvtec import MVTecFolder, uint8_to_model
from edgeinspect.evaluation.machine import cpu_name
from edgeinspect.evaluation.metrics import auroc
from edgeinspect.models.features import build_features
from edgeinspect.runtime.scoring import gaussian_blur, pooled_max_score, topk_mean_score

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_SIZE = 128


def level_maps(features, test_u8: torch.Tensor, bank: list[torch.Tensor], prefixes: list[int], feature_size: int,
               batch: int = 2) -> dict[int, list[torch.Tensor]]:
    """Per bank prefix size: per level, each test position's cosine distance to its nearest vector among the
    bank's first `prefix` rows, bilinearly upsampled to the model size: {prefix: [(N, 128, 128)] per level}."""
    out: dict[int, list[list[torch.Tensor]]] = {p: [[] for _ in bank] for p in prefixes}
    with torch.inference_mode():
        for s in range(0, len(test_u8), batch):
            x = F.interpolate(uint8_to_model(test_u8[s:s + batch]), size=(feature_size,) * 2, mode="bilinear",
                              align_corners=False)
            for level, (f, v) in enumerate(zip(features(x), bank, strict=True)):
                b, _, h, w = f.shape
                unit = F.normalize(f.float(), dim=1, eps=1e-6).flatten(2).transpose(1, 2)  # (b, hw, C)
                sim = unit @ v.T  # (b, hw, M)
                for p in prefixes:
                    d = (1 - sim[..., :p].amax(dim=2)).clamp(min=0).reshape(b, 1, h, w)
                    out[p][level].append(F.interpolate(d, size=(MODEL_SIZE,) * 2, mode="bilinear",
                                                       align_corners=False)[:, 0])
    return {p: [torch.cat(m) for m in levels] for p, levels in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--feature-sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--bank-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--blurs", type=float, nargs="+", default=[2.5, 3.0, 4.0, 6.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--name", default="reference_sweep_mtd")
    ap.add_argument("--rows-from", type=Path,
                    help="write the report from the rows a run printed (a run stopped before its end; the rows it "
                         "did not reach are missing, and the report says it came from a printed log)")
    args = ap.parse_args()
    if args.rows_from is not None:
        rows = [json.loads(line) for line in args.rows_from.read_text().splitlines() if line.startswith("{")]
        write({"command": f"(rows printed by a stopped run, {args.rows_from.name}) nice python "
                          "benchmarks/reference_sweep_mtd.py --data ../shared/data/mtd --blurs 2.5 4 6 --threads 1",
               "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                           "load_average": os.getloadavg()[0]}, "rows": rows}, args.results, args.name)
        return 0
    torch.set_num_threads(args.threads)
    diad, glad = build_config("diad", "edge"), build_config("glad", "edge")
    bank_cfg = diad.scoring.bank
    features = build_features(diad)
    strides = list(diad.features.strides)
    layer_sets = [c for r in range(1, len(strides) + 1) for c in itertools.combinations(range(len(strides)), r)]
    paths = training_normals(args.data)
    split = MVTecFolder(args.data, "test", MODEL_SIZE)
    test, masks, labels = split.load_all()
    y, gt = labels.numpy(), masks.numpy()
    types = np.array([s.defect_type for s in split.samples])
    rows = []
    for fs in args.feature_sizes:
        t0 = time.perf_counter()

        def features_of(frames: torch.Tensor, fs: int = fs) -> list[torch.Tensor]:
            return list(features(F.interpolate(frames, size=(fs,) * 2, mode="bilinear", align_corners=False)))

        cand = candidate_vectors(features_of, paths, MODEL_SIZE, bank_cfg, 8)
        top = max(args.bank_sizes)
        bank = [c[greedy_coreset(c, min(top, len(c)), bank_cfg.projection, bank_cfg.seed + i)] for i, c in enumerate(cand)]
        build_s = time.perf_counter() - t0
        maps = level_maps(features, test, bank, [min(p, len(bank[0])) for p in args.bank_sizes], fs)
        print(f"feature size {fs}: bank built in {build_s:.0f} s, maps in {time.perf_counter() - t0 - build_s:.0f} s",
              flush=True)
        for size, per_level in maps.items():
            for layers, sigma in itertools.product(layer_sets, args.blurs):
                m = gaussian_blur(sum(per_level[i] for i in layers), sigma)
                pixel = round(auroc(gt.ravel() > 0, m.numpy().ravel()), 4)  # the same map for both methods
                for method, cfg in (("diad", diad), ("glad", glad)):
                    s = (pooled_max_score(m, cfg.scoring.pool_size, cfg.scoring.pool_iterations) if method == "diad"
                         else topk_mean_score(m, cfg.inference.top_k)).double().numpy()
                    per_type = {t: round(auroc(y[(types == t) | (types == "good")], s[(types == t) | (types == "good")]), 4)
                                for t in sorted(set(types) - {"good"})}
                    rows.append({"method": method, "feature_size": fs, "bank_size": size,
                                 "strides": [strides[i] for i in layers], "blur_sigma": sigma,
                                 "image_auroc": round(auroc(y, s), 4), "pixel_auroc": pixel,
                                 "image_auroc_by_type": per_type})
                    print(json.dumps(rows[-1]), flush=True)
    command = "nice python benchmarks/reference_sweep_mtd.py " + " ".join(sys.argv[1:])
    doc = {"command": command, "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                                           "torch": torch.__version__, "load_average": os.getloadavg()[0]},
           "train_images": len(paths), "test_images": len(y), "rows": rows}
    write(doc, args.results, args.name)
    return 0


def write(doc: dict, results: Path, name: str) -> None:
    """The JSON twin and the markdown report of a sweep."""
    rows, command = doc["rows"], doc["command"]
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / f"{name}.json", doc)
    best = sorted(rows, key=lambda r: -r["pixel_auroc"])
    lines = ["# Bank reference: a small settings sweep on MTD", "", __doc__.split("\n\n", 2)[2].strip(), "",
             "## Command", "", f"    {command}", "", "## Machine", "",
             f"{doc['machine']['cpu']}, {doc['machine']['threads']} torch thread(s), no GPU, shared with training "
             f"runs (load average {doc['machine']['load_average']:.1f}).", "",
             f"## The 15 best settings by pixel AUROC (of {len(rows)}; all in the JSON twin)", "",
             "| method | feature px | bank/level | strides | blur | image AUROC | pixel AUROC |",
             "|---|---|---|---|---|---|---|"]
    for r in best[:15]:
        lines.append(f"| {r['method']} | {r['feature_size']} | {r['bank_size']} | {r['strides']} | {r['blur_sigma']} | "
                     f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} |")
    every = max(len(r["strides"]) for r in rows)
    lines += ["", "## Every layer (the presets' strides), by feature size, bank size and blur", "",
              "| method | feature px | bank/level | blur | image AUROC | pixel AUROC |", "|---|---|---|---|---|---|"]
    for r in rows:
        if len(r["strides"]) == every:
            lines.append(f"| {r['method']} | {r['feature_size']} | {r['bank_size']} | {r['blur_sigma']} | "
                         f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} |")
    write_text_atomic(results / f"{name}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
