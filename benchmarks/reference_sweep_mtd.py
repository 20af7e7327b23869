"""A small sweep of the bank reference's settings on a category -> results/reference_sweep_mtd.{md,json}

    nice python benchmarks/reference_sweep_mtd.py --data ../shared/data/mtd --threads 1
    nice python benchmarks/reference_sweep_mtd.py --data ../shared/data/mtd --image-score runs/diad_mtd_edge

What can raise the bank reference's pixel AUROC (the issue's target: 0.95): the extractor's input size
(`scoring.feature_size`), the feature layers used (subsets of `features.strides`), the blur
(`scoring.blur_sigma`, px of the 128-px model image) and the coreset size (`scoring.bank.size`). The bank is
built from the training normals only, as `edgeinspect bank` does (scoring.bank's candidates, projection,
seed); greedy k-centre picks are nested (the first k picks of a larger coreset are the k-coreset, same seed),
so one coreset per feature size serves every size. Per-level distance maps of the test frames are computed
once per (feature size, bank size) and combined per setting, with the same functions the pipelines use
(runtime.scoring's blur and image scores); the row the edge presets ship is measured through the pipelines
by benchmarks/reference_mtd.py. Nothing is fitted on the test split: it only reports.

The second form sweeps the bank reference's image score (`scoring.bank.image_strides`, `image_blur_sigma`)
at a trained run's bank and bank view (its config's scoring.bank: feature size, neighbourhood): the levels
whose distances it pools and their blur, for both methods' poolings. The setting is chosen on the
even-indexed test images (by the mean of the two methods' image AUROC) and reported on the odd-indexed ones
and the whole split; it adds the `image_score` section of the report and JSON, keeping the rows above.
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
    ap.add_argument("--image-score", type=Path, metavar="RUN",
                    help="sweep the image score's levels and blur at this run's bank (see above)")
    ap.add_argument("--image-blurs", type=float, nargs="+", default=[2.5, 4.0, 8.0, 12.0, 16.0, 24.0])
    ap.add_argument("--max-chosen-blur", type=float, default=8.0,
                    help="choose among blurs up to this (model px; default: one stride-16 cell of a 256-px view): "
                         "a wider blur nears the map's mean, which averages a small defect away on a larger frame")
    args = ap.parse_args()
    if args.image_score is not None:
        torch.set_num_threads(args.threads)
        path = args.results / f"{args.name}.json"
        doc = json.loads(path.read_text())
        doc["image_score"] = image_score_sweep(args.image_score, args.data, args.image_blurs, args.max_chosen_blur)
        write(doc, args.results, args.name)
        return 0
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


def image_score_sweep(run: Path, data: Path, blurs: list[float], max_blur: float) -> dict:
    """The bank reference's image score by (levels, blur) at `run`'s bank and bank view, both methods'
    poolings; chosen on the even-indexed test images, reported on the odd ones and all."""
    from edgeinspect.runtime.bank import bank_distance_maps
    from edgeinspect.runtime.run_detector import run_pipeline

    cfg, pipe, _ = run_pipeline(run, {"scoring": {"reference": "bank"}})  # the run's bank, its view
    bank = pipe.bank
    assert bank is not None and pipe.frame_size is not None
    glad = build_config("glad", "edge")
    view = pipe.frame_size
    strides = list(cfg.features.strides)
    split = MVTecFolder(data, "test", view, mask_size=MODEL_SIZE)
    test, masks, labels = split.load_all()
    y, gt = labels.numpy(), masks.numpy()
    types = np.array([s.defect_type for s in split.samples])
    levels: list[list[torch.Tensor]] = [[] for _ in strides]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(test), 4):  # per level, the distances the pipeline's bank search gives
            feats = pipe.bank_features(uint8_to_model(test[s:s + 4]))
            for i, d in enumerate(bank_distance_maps(pipe.nets, feats, bank, (MODEL_SIZE,) * 2,
                                                     cfg.scoring.bank.chunk_mb)):
                levels[i].append(d)
    maps = [torch.cat(m) for m in levels]
    print(f"maps of {len(y)} frames in {time.perf_counter() - t0:.0f} s", flush=True)
    pixel = round(auroc(gt.ravel() > 0, gaussian_blur(sum(maps), cfg.scoring.blur_sigma).numpy().ravel()), 4)
    even = np.arange(len(y)) % 2 == 0
    rows = []
    layer_sets = [tuple(range(i, len(strides))) for i in range(len(strides))]  # all, the coarser ones, the coarsest
    for layers, sigma in itertools.product(layer_sets, blurs):
        m = gaussian_blur(sum(maps[i] for i in layers), sigma)
        row: dict = {"image_strides": [strides[i] for i in layers], "image_blur_sigma": sigma}
        for method, pooled in (("diad", pooled_max_score(m, cfg.scoring.pool_size, cfg.scoring.pool_iterations)),
                               ("glad", topk_mean_score(m, glad.inference.top_k))):
            sc = pooled.double().numpy()
            row[method] = {"even": round(auroc(y[even], sc[even]), 4), "odd": round(auroc(y[~even], sc[~even]), 4),
                           "all": round(auroc(y, sc), 4),
                           "by_type": {t: round(auroc(y[(types == t) | (types == "good")],
                                                      sc[(types == t) | (types == "good")]), 4)
                                       for t in sorted(set(types) - {"good"})}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    chosen = max((r for r in rows if r["image_blur_sigma"] <= max_blur), key=lambda r: r["diad"]["even"] + r["glad"]["even"])
    return {"command": "nice python benchmarks/reference_sweep_mtd.py " + " ".join(sys.argv[1:]),
            "run": str(run), "view_px": view, "neighbourhood": cfg.scoring.bank.neighbourhood,
            "bank_vectors_per_level": int(bank.vectors[0].shape[0]), "pixel_auroc": pixel,
            "test_images": len(y), "rows": rows, "max_chosen_blur": max_blur,
            "chosen": {"image_strides": chosen["image_strides"], "image_blur_sigma": chosen["image_blur_sigma"]}}


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
    sweep = doc.get("image_score")
    if sweep:
        lines += ["", "## The bank reference's image score: levels and blur (bank view rows)", "",
                  f"    {sweep['command']}", "",
                  f"At the bank of `{sweep['run']}` ({sweep['bank_vectors_per_level']} vectors per level), frames "
                  f"read at {sweep['view_px']} px, {sweep['neighbourhood']} x {sweep['neighbourhood']} neighbourhood; "
                  f"{sweep['test_images']} test images. The pixel map (every level, the preset's blur) is the "
                  f"same in every row: pixel AUROC {sweep['pixel_auroc']:.4f}. Image AUROC of DiAD's pooled max and "
                  "GLAD's top-k mean on the even-indexed images (where the setting is chosen), the odd-indexed "
                  "ones and all; chosen (best mean of both on the even half, among blurs up to "
                  f"{sweep['max_chosen_blur']} px: wider ones near the map's mean, which would average a small defect "
                  "away on a larger frame): "
                  f"strides {sweep['chosen']['image_strides']}, blur {sweep['chosen']['image_blur_sigma']}.", "",
                  "| image strides | blur | DiAD even / odd / all | GLAD even / odd / all | DiAD per type (all) | "
                  "GLAD per type (all) |", "|---|---|---|---|---|---|"]
        for r in sweep["rows"]:
            cells = [" / ".join(f"{r[m][k]:.4f}" for k in ("even", "odd", "all")) for m in ("diad", "glad")]
            types = [", ".join(f"{t} {v:.3f}" for t, v in r[m]["by_type"].items()) for m in ("diad", "glad")]
            lines.append(f"| {r['image_strides']} | {r['image_blur_sigma']} | {cells[0]} | {cells[1]} | {types[0]} | "
                         f"{types[1]} |")
    if doc.get("reading"):
        lines += ["", "## Reading (written by hand after the run)", "", doc["reading"]]
    write_text_atomic(results / f"{name}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
