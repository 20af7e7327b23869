"""GLAD's adaptive step (ADP) checked on a category: does it fire, and if not, is it the threshold proposal,
the check or the data? -> results/adp_mtd.{md,json,png}

    nice python benchmarks/adp_mtd.py --model runs/glad_mtd_edge --data ../shared/data/mtd --threads 1

Per ADP check space (`--spaces`: features, the paper's decoded feature check; latent, the check on the two
clean latents):

* the firing threshold proposed from training normals exactly as training and `edgeinspect glad-threshold`
  propose it (`calibration.percentile` of each frame's largest check score above min_step, x
  `calibration.margin`; `--calibration-images` spread over train/good);
* every test frame's ADP check score at every step with firing switched off (one draw, noise seed
  inference.seed). Checks before a fire do not change the trajectory, so the step at which a frame fires
  under any threshold is the first checked step whose score exceeds it (or the first step below min_step):
  one pass gives the firing-step histogram of the proposed threshold and of any other;
* the firing-step histogram for normals and each defect type under the proposed threshold; how well the
  check separates defective from normal frames (AUROC of each frame's largest check score, per type, and
  per step); the share of each type above the threshold; where the proposal sits against the test normals.

No defect is used to choose anything: the threshold comes from training normals only.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeinspect.calibration.adp import adp_check_maxima, propose_threshold
from edgeinspect.core.atomic import write_json_atomic, write_text_atomic
from edgeinspect.data.batches import spread_indices
from edgeinspect.data.mvtec import MVTecFolder, uint8_to_model
from edgeinspect.evaluation.machine import cpu_name
from edgeinspect.evaluation.metrics import auroc
from edgeinspect.runtime.run_detector import run_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
NEVER = -1


def check_scores(pipe: Any, frames: torch.Tensor, batch: int) -> np.ndarray:
    """(N, steps) ADP check score of every frame at every step, firing by threshold switched off (NaN where a
    step is not checked: the first, those skipped by check_every, those after the forced fire)."""
    saved = pipe.threshold
    pipe.threshold = float("inf")
    try:
        rows = [pipe.adp_record(uint8_to_model(frames[s:s + batch]))["adp_scores"] for s in range(0, len(frames), batch)]
    finally:
        pipe.threshold = saved
    return torch.cat(rows).double().numpy()


def fire_steps(scores: np.ndarray, timesteps: list[int], min_step: int, threshold: float) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """(fire timestep per frame, fired by the threshold) of a threshold applied to recorded check scores."""
    forced = next((i for i, t in enumerate(timesteps) if t < min_step), None)
    out = np.full(len(scores), NEVER, int)
    by_thr = np.zeros(len(scores), bool)
    for n, row in enumerate(scores):
        for i, t in enumerate(timesteps):
            if t < min_step:
                break
            if np.isfinite(row[i]) and row[i] > threshold:
                out[n], by_thr[n] = t, True
                break
        if out[n] == NEVER and forced is not None:
            out[n] = timesteps[forced]
    return out, by_thr


def space_rows(pipe: Any, space: str, cal: dict[str, float], train: torch.Tensor, test: torch.Tensor,
               types: np.ndarray, labels: np.ndarray, batch: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    maxima, _ = adp_check_maxima(pipe, uint8_to_model(train), batch)
    threshold = propose_threshold(maxima, cal["percentile"], cal["margin"])
    scores = check_scores(pipe, test, batch)
    seconds = time.perf_counter() - t0
    ts = list(pipe.timesteps)
    inf = pipe.inference
    checked = [i for i, t in enumerate(ts) if t >= inf.min_step]
    peak = np.nan_to_num(scores[:, checked], nan=-np.inf).max(axis=1) if checked else np.full(len(scores), np.nan)
    steps, by_thr = fire_steps(scores, ts, inf.min_step, threshold)
    hist = {}
    for name in ["good", *sorted(set(types) - {"good"})]:
        sel = types == name
        values, counts = np.unique(steps[sel], return_counts=True)
        hist[name] = {"n": int(sel.sum()), "fire_step_counts": {str(int(v)): int(c) for v, c in zip(values, counts)},
                      "fired_by_threshold": round(float(by_thr[sel].mean()), 4),
                      "above_threshold": round(float((peak[sel] > threshold).mean()), 4),
                      "max_score_median": round(float(np.median(peak[sel])), 5),
                      "max_score_p90": round(float(np.percentile(peak[sel], 90)), 5)}
    per_type_auroc = {t: round(auroc(labels[(types == t) | (types == "good")], peak[(types == t) | (types == "good")]), 4)
                      for t in sorted(set(types) - {"good"})}
    per_step_auroc = {str(ts[i]): round(auroc(labels, scores[:, i]), 4) for i in checked if np.isfinite(scores[:, i]).all()}
    normals = peak[labels == 0]
    return {
        "space": space, "threshold": threshold, "calibration": {**cal, "images": len(train),
                                                                "train_max_median": float(np.median(maxima)),
                                                                "train_max_p99": float(np.percentile(maxima, 99))},
        "test_normal_max": {"median": float(np.median(normals)), "p99": float(np.percentile(normals, 99)),
                            "max": float(normals.max())},
        "threshold_percentile_of_test_normals": round(float((normals < threshold).mean() * 100), 2),
        "check_auroc": round(auroc(labels, peak), 4), "check_auroc_by_type": per_type_auroc,
        "check_auroc_by_step": per_step_auroc, "fire_histogram": hist, "timesteps": ts,
        "min_step": inf.min_step, "seconds": round(seconds, 1),
        "scores": scores.round(6).tolist(), "labels": labels.tolist(), "types": types.tolist(),
    }


def figure(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = list(res["spaces"].values())
    fig, axes = plt.subplots(1, len(spaces), figsize=(6 * len(spaces), 4), squeeze=False)
    for ax, r in zip(axes[0], spaces):
        scores = np.array(r["scores"], float)
        types = np.array(r["types"])
        checked = [i for i, t in enumerate(r["timesteps"]) if t >= r["min_step"]]
        peak = np.nan_to_num(scores[:, checked], nan=-np.inf).max(axis=1)
        names = ["good", *sorted(set(types) - {"good"})]
        ax.boxplot([peak[types == n] for n in names], tick_labels=names, showfliers=True)
        ax.axhline(r["threshold"], color="r", ls="--", label=f"proposed threshold {r['threshold']:.4g}")
        ax.set_title(f"{r['space']} check: each frame's largest score (AUROC {r['check_auroc']:.3f})")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# GLAD's adaptive step (ADP) on {res['category']}", "", "Command:", "", f"    {res['command']}", "",
             f"Machine: {res['machine']}. Model `{res['model']}`; {res['test_images']} test images "
             f"(every {res['every']}th), one draw (noise seed {res['seed']}); thresholds proposed from "
             f"{res['calibration_images']} training normals. {res['note'] or ''}", "",
             "| check space | proposed threshold | test normals below it | check AUROC (largest score) | "
             "per type | fired by threshold: normal | " + " | ".join(res["defect_types"]) + " |",
             "|---|---:|---:|---:|---|---:|" + "---:|" * len(res["defect_types"])]
    for r in res["spaces"].values():
        h = r["fire_histogram"]
        lines.append(f"| {r['space']} | {r['threshold']:.5g} | {r['threshold_percentile_of_test_normals']:.1f} % | "
                     f"{r['check_auroc']:.4f} | " + ", ".join(f"{t} {v:.3f}" for t, v in r["check_auroc_by_type"].items())
                     + f" | {h['good']['fired_by_threshold']:.3f} | "
                     + " | ".join(f"{h[t]['fired_by_threshold']:.3f}" for t in res["defect_types"]) + " |")
    for r in res["spaces"].values():
        ts = [str(t) for t in r["timesteps"]]
        lines += ["", f"## Firing steps, {r['space']} check (frames per fire timestep; min_step {r['min_step']}; "
                      f"{r['seconds']:.0f} s)", "", "| frames | " + " | ".join(ts) + " | never |",
                  "|---|" + "---:|" * (len(ts) + 1)]
        for name, v in r["fire_histogram"].items():
            c = v["fire_step_counts"]
            lines.append(f"| {name} ({v['n']}) | " + " | ".join(str(c.get(t, 0)) for t in ts) + f" | {c.get('-1', 0)} |")
        lines += ["", "Largest check score per frame (median / p90): " + "; ".join(
            f"{n} {v['max_score_median']:.4g} / {v['max_score_p90']:.4g}" for n, v in r["fire_histogram"].items()),
            "", "Check AUROC per step (defective vs normal, the step's score): " + ", ".join(
                f"t={t} {a:.3f}" for t, a in r["check_auroc_by_step"].items())]
    lines += ["", "![largest check score per frame](adp_mtd.png)", ""]
    if res.get("findings"):
        lines += ["## Findings", "", res["findings"], ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="GLAD run folder")
    ap.add_argument("--data", type=Path, required=True, help="dataset root (MVTec layout)")
    ap.add_argument("--spaces", nargs="+", default=["features", "latent"], choices=["features", "latent"])
    ap.add_argument("--every", type=int, default=1, help="every k-th test image (default 1: all)")
    ap.add_argument("--calibration-images", type=int, default=None,
                    help="training normals to propose the thresholds from (default: calibration.images)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--note", help="a paragraph for the report")
    ap.add_argument("--findings", help="the findings paragraph for the report")
    args = ap.parse_args(argv)
    from edgeinspect.config import merge_config, parse_overrides

    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/adp_mtd.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                 else sys.argv[1:]))
    spaces: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for space in args.spaces:
        over = merge_config(parse_overrides(args.set), {"inference": {"adp_space": space}})
        cfg, pipe, _ = run_pipeline(args.model, over, calibrating=True)
        if cfg.method != "glad":
            raise SystemExit(f"{args.model} is a {cfg.method} run, not GLAD")
        size = cfg.model.image_size
        if not meta:
            n_cal = args.calibration_images or cfg.calibration.images
            train_u8, _, _ = MVTecFolder(args.data, "train", size).load_all()
            train = train_u8[spread_indices(len(train_u8), n_cal)]
            split = MVTecFolder(args.data, "test", size)
            idx = list(range(0, len(split), args.every))
            test = torch.stack([torch.from_numpy(split.load(i)[0]).permute(2, 0, 1) for i in idx])
            types = np.array([split.samples[i].defect_type for i in idx])
            labels = np.array([split.samples[i].label for i in idx])
            meta = {"category": cfg.category or args.data.name, "seed": cfg.inference.seed,
                    "calibration_images": len(train), "test_images": len(idx)}
        print(f"[{space}] proposing the threshold from {len(train)} training normals, then "
              f"{len(test)} test frames", flush=True)
        cal = {"percentile": cfg.calibration.percentile, "margin": cfg.calibration.margin}
        spaces[space] = space_rows(pipe, space, cal, train, test, types, labels, cfg.inference.batch_size)
        r = spaces[space]
        print(f"[{space}] threshold {r['threshold']:.5g}; check AUROC {r['check_auroc']:.4f}; fired by threshold: "
              + ", ".join(f"{k} {v['fired_by_threshold']:.3f}" for k, v in r["fire_histogram"].items()), flush=True)
    res = {"command": command, "model": str(args.model), "data": str(args.data), "every": args.every,
           "machine": f"{cpu_name()}, {torch.get_num_threads()} torch threads, {platform.platform()}",
           "note": args.note, "findings": args.findings, **meta,
           "defect_types": sorted(set(types) - {"good"}), "spaces": spaces}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.results / "adp_mtd.json", res)
    figure(res, args.results / "adp_mtd.png")
    write_text_atomic(args.results / "adp_mtd.md", markdown(res))
    print(f"wrote {args.results / 'adp_mtd.md'}")
    return res


if __name__ == "__main__":
    main()
