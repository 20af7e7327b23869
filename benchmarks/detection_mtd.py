"""A detector (DiAD or GLAD) on a real MVTec-layout dataset: metrics, latency by stage, memory,
figure -> results/.

    python benchmarks/detection_mtd.py --model runs/diad_mtd_edge --data ../shared/data/mtd
    python benchmarks/detection_mtd.py --model runs/glad_mtd_edge --data ../shared/data/mtd

writes benchmarks/results/<method>_mtd.{md,json,png}. The JSON holds the numbers under the keys
image_auroc, image_ap, image_f1max, pixel_auroc, pixel_ap, pixel_f1max, pro, ms_per_frame,
peak_rss_mb, train_minutes (plus per-stage latency and settings); GLAD's adds the ADP firing
statistics, each noise draw's own image AUROC (`draw_image_auroc`) and a side-by-side with DiAD's file
when that exists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from edgeinspect.config import parse_overrides
from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.core.runs import load_state, resolve_checkpoint, run_method, stage_checkpoint
from edgeinspect.data.mvtec import MVTecFolder, image_to_tensor, name_keys, tensor_to_image
from edgeinspect.data.visualize import grid, heatmap_overlay, label, write_png
from edgeinspect.evaluation.commands import evaluate_detector
from edgeinspect.evaluation.evaluate import read_name_list
from edgeinspect.evaluation.machine import cpu_name, gpu_name
from edgeinspect.evaluation.metrics import evaluate as compute_metrics
from edgeinspect.runtime.run_detector import run_pipeline
from edgeinspect.runtime.diad import STAGES as DIAD_STAGES
from edgeinspect.runtime.glad import STAGES as GLAD_STAGES

RESULTS = Path(__file__).resolve().parent / "results"




def figure(model_path: Path, data_root: Path, res: dict, out_png: Path, per_type: int = 2,
           overrides: dict | None = None) -> None:
    cfg, pipe, _ = run_pipeline(model_path, overrides)
    data = MVTecFolder(data_root, "test", cfg.model.image_size)
    scores = {r["image"] + r["type"]: r["score"] for r in res["per_image"]}
    by_type: dict[str, list[int]] = {}
    for i, s in enumerate(data.samples):
        by_type.setdefault(s.defect_type, []).append(i)
    chosen = []
    for t, idx in sorted(by_type.items()):
        idx = sorted(idx, key=lambda i: -scores[data.samples[i].path.name + t])
        chosen += [idx[0], idx[len(idx) // 2]][:per_type]
    loaded = [data.load(i) for i in chosen]
    x = torch.stack([image_to_tensor(im) for im, _ in loaded])
    r = pipe(x)
    maps = np.load(Path(res["_maps_file"]))["maps"].astype(np.float32)
    labels = np.array([s.label for s in data.samples])
    vmin, vmax = float(np.percentile(maps[labels == 0], 1)), float(np.percentile(maps, 99.9))
    rows = []
    for k, i in enumerate(chosen):
        im, mask = loaded[k]
        s = data.samples[i]
        tag = f"{s.defect_type} {float(r.scores[k]):.3f}"
        gt = np.repeat((mask * 255).astype(np.uint8)[:, :, None], 3, axis=2)
        rows.append([label(im, tag), label(tensor_to_image(r.reconstructions[k]), "reconstruction"),
                     label(heatmap_overlay(im, r.maps[k].numpy(), vmin, vmax, mask), "anomaly map"),
                     label(gt, "ground truth")])
    write_png(out_png, grid(rows))


def machine_line(device: str) -> str:
    """The evaluation machine: the CPU with its torch threads, and the GPU when the run used one."""
    line = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    if str(device).startswith("cuda"):
        return f"{line}, evaluated on {gpu_name()} (CUDA {torch.version.cuda})"
    return f"{line}, no GPU"


def heldout_metrics(res: dict, data_root: Path, selection: Path, maps_file: Path) -> tuple[dict, int]:
    """Metrics over the test images NOT named in `selection` (file name, type/name or path), from the
    evaluation's stored maps; (metrics, number of images the settings were chosen on)."""
    chosen = read_name_list(selection)
    data = MVTecFolder(data_root, "test", res["settings"]["image_size"])
    keep = np.array([chosen.isdisjoint(name_keys(s.defect_type, s.path)) for s in data.samples])
    n_chosen = int((~keep).sum())
    if n_chosen == 0:
        raise SystemExit(f"--selection {selection}: none of its names is a test image of {data_root}")
    stored = np.load(maps_file)
    if len(stored["maps"]) != len(data.samples):
        raise SystemExit("--selection cannot be combined with --exclude (the stored maps cover other images)")
    masks = np.stack([data.load(i)[1] for i in np.flatnonzero(keep)])
    m = compute_metrics(stored["labels"][keep], stored["scores"][keep], masks, stored["maps"][keep])
    out = {k: round(float(v), 4) for k, v in m.items()}
    out["n_images"] = int(keep.sum())
    out["n_defective"] = int(stored["labels"][keep].sum())
    return out, n_chosen


def selection_section(held_out: dict, n_chosen: int, selection: Path) -> str:
    return f"""
## Settings chosen on part of the test split

The `--set` settings above were chosen on {n_chosen} test images (listed in `{selection}`), so the
full-split numbers are optimistic. On the other {held_out['n_images']} test images ({held_out['n_defective']}
defective), which played no part in the choice:

| metric | held-out value |
|---|---|
""" + "\n".join(f"| {k} | {held_out[k]:.4f} |" for k in
                ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pro")) + "\n"


def stage_note(method: str, s: dict) -> str:
    if method == "diad":
        return (f'"encode" is the VAE encoder plus the SG hint stack (both once per frame); "denoise" is '
                f'{s["steps"]} x (UNet + SG fused); "features" runs the extractor on input and reconstruction together.')
    return ('"denoise" is the DDIM trajectory; the adp_* stages are the per-step checks until the frame fires '
            '(UNet on the re-noised input, decoding both clean estimates, features, min-over-positions map); '
            '"saff" the fusion and its re-noised UNet call; "features"/"scoring" the final map.')


def draws_note(s: dict) -> str:
    n = s.get("draws", 1)
    return "" if n == 1 else f" to {s['seed'] + n - 1}: {n} noise draws per frame, their maps averaged"


def draws_section(res: dict) -> str:
    per = res["draw_image_auroc"]
    if len(per) == 1:
        return ""
    s = res["settings"]
    rows = "\n".join(f"| {s['seed'] + k} | {v:.4f} |" for k, v in enumerate(per))
    return f"""
## Noise draws

Each frame is reconstructed {len(per)} times (ADP + SAFF with the noise of each seed) and scored on the mean of
the {len(per)} maps: image AUROC {res['metrics']['image_auroc']:.4f}. Each draw scored alone:

| seed | image AUROC |
|---|---|
{rows}
"""


def adp_section(res: dict, lat: dict) -> str:
    a = res["adp"]
    rows = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in a.items())
    return f"""
## Adaptive denoising (ADP)

ADP checks cost {lat.get('adp_checks_ms', 0.0):.1f} ms of the batch-1 frame. Firing statistics on the test split:

| | |
|---|---|
{rows}
"""


def side_by_side(vs: dict, diad_file: Path) -> str:
    rows = "\n".join(f"| {k} | {v['glad']} | {v['diad']} |" for k, v in vs.items())
    return f"""
## GLAD beside DiAD (same split, `{os.path.relpath(diad_file)}`)

| | GLAD | DiAD |
|---|---|---|
{rows}
"""


def base_train_minutes(run_cfg: dict) -> dict[str, float]:
    """Minutes of optimisation of the runs this one starts from (train.init_autoencoder_from: the shared base
    autoencoder; train.init_from: GLAD's base UNet run, and whatever that one started from): run -> minutes."""
    out: dict[str, float] = {}
    train = run_cfg.get("train", {})
    for key in ("init_from", "init_autoencoder_from"):
        src = train.get(key)
        if not src or not Path(src).exists():
            continue
        # GLAD starts from its base run's UNet stage (unet-final), not from what that run trained after it
        ckpt = stage_checkpoint(src, "unet", "train.init_from") if key == "init_from" else resolve_checkpoint(src)
        name = f"{src} (to its UNet stage)" if key == "init_from" else str(src)
        out[name] = round(load_state(ckpt).train_seconds / 60.0, 1)
        cfg_file = ckpt.parent.parent / "config.json"
        if cfg_file.is_file():
            out |= base_train_minutes(json.loads(cfg_file.read_text()))
    return out


def base_note(bases: dict[str, float]) -> str:
    if not bases:
        return ""
    return "\n- Runs it starts from: " + "; ".join(f"`{k}` {v:.1f} min" for k, v in bases.items()) + "."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for the report files")
    ap.add_argument("--name", help="result file stem (default: <method>_mtd)")
    ap.add_argument("--exclude", type=Path)
    ap.add_argument("--train-command", help="the command that trained the model (for the report)")
    ap.add_argument("--vs", type=Path, help="GLAD: the DiAD results JSON to compare with (default: "
                    "<results>/diad_mtd.json)")
    ap.add_argument("--train-machine", help="where the model was trained, when not this machine (for the report)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override an inference/scoring setting of the run, as `edgeinspect test --set`")
    ap.add_argument("--selection", type=Path,
                    help="text file of the test images the settings were chosen on: the report also gives the "
                         "metrics on the other test images, which played no part in the choice")
    args = ap.parse_args()
    overrides = parse_overrides(args.overrides)
    method = run_method(args.model)
    args.name = args.name or f"{method}_mtd"
    args.train_command = args.train_command or (
        f"edgeinspect train {method} --config configs/{method}_mtd_edge.yaml --run {args.model}"
        "   # rerun with --resume after any interruption")
    STAGES = GLAD_STAGES if method == "glad" else DIAD_STAGES  # noqa: N806

    raw_json = args.model / f"{args.name}_eval.json"
    res = evaluate_detector(args.model, args.data, out_json=raw_json, overrides=overrides, exclude_file=args.exclude,
                   progress=True, latency_repeats=20)
    res["_maps_file"] = str(raw_json.with_suffix(".maps.npz"))
    m = res["metrics"]
    lat = res["latency_batch1"]
    summary = {**{k: round(float(v), 4) for k, v in m.items()},
               "ms_per_frame": round(lat["ms_per_frame"], 1),
               "peak_rss_mb": round(res["peak_rss_mb"], 1),
               "train_minutes": round(res["train_minutes"], 1),
               "stage_ms": {k: round(v, 1) for k, v in lat["stage_ms"].items()},
               "batched_ms_per_frame": round(res["batched"]["ms_per_frame"], 1),
               "batch_size": res["batched"]["batch_size"],
               "n_images": res["n_images"], "n_defective": res["n_defective"], "method": method,
               "settings": res["settings"], "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                           "gpu": gpu_name() if str(res["settings"].get("device", "cpu")).startswith("cuda") else None,
                           "trained_on": args.train_machine}}
    run_cfg = json.loads((resolve_checkpoint(args.model).parent.parent / "config.json").read_text())
    summary["train_device"] = args.train_machine or f"{cpu_name()}, {run_cfg['train'].get('threads') or 'all'} thread(s)"
    summary["base_train_minutes"] = base_train_minutes(run_cfg)
    extra_md = ""
    if args.selection is not None:
        held_out, chosen_on = heldout_metrics(res, args.data, args.selection, raw_json.with_suffix(".maps.npz"))
        summary["held_out"] = held_out
        extra_md += selection_section(held_out, chosen_on, args.selection)
    if method == "glad":
        summary["adp"] = res["adp"]
        summary["adp_checks_ms"] = round(lat.get("adp_checks_ms", 0.0), 1)
        summary["draw_image_auroc"] = res["draw_image_auroc"]
        extra_md += draws_section(res) + adp_section(res, lat)
        diad_file = args.vs or args.results / "diad_mtd.json"
        if diad_file.is_file():
            diad = json.loads(diad_file.read_text())
            summary["vs_diad"] = {k: {"glad": summary[k], "diad": diad[k]} for k in
                                  ("image_auroc", "pixel_auroc", "pixel_ap", "pro", "ms_per_frame")}
            extra_md += side_by_side(summary["vs_diad"], diad_file)
    args.results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.results / f"{args.name}.json", summary)
    png = args.results / f"{args.name}.png"
    figure(args.model, args.data, res, png, overrides=overrides)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without git
        commit = os.environ.get("EDGEINSPECT_COMMIT", "unknown")
    s = res["settings"]
    stage_rows = "\n".join(f"| {st} | {lat['stage_ms'][st]:.1f} |" for st in STAGES)
    title = "DiAD" if method == "diad" else "GLAD"
    trained_stages = ("the stages this run trained: UNet and SG, plus the autoencoder unless it came from "
                      "train.init_autoencoder_from" if method == "diad" else
                      "the ATP stage, its first step's encoding of the training latents included; the base model's "
                      "stages not counted")
    train_root = run_cfg["train"]["data_root"]
    n_train = sum(1 for p in (Path(train_root) / "train" / "good").iterdir() if p.is_file())
    flags = f" --name {args.name}" if args.name != f"{method}_mtd" else ""
    flags += "".join(f" --set {o}" for o in args.overrides)
    flags += f" --selection {args.selection}" if args.selection else ""
    flags += f" --vs {args.vs}" if args.vs else ""
    md = f"""# {title} on {args.data.name} ({s['image_size']} px model, {run_cfg['model']['preset']} preset)

Real run on the test split of `{args.data}` ({res['n_images']} images, {res['n_defective']} defective:
{', '.join(t for t in res['defect_types'] if t != 'good')}), model trained on {n_train} training normals
({train_root}).
Code at commit `{commit}`.

## Commands

    {args.train_command}
    python benchmarks/detection_mtd.py --model {args.model} --data {args.data}{flags}

## Machine

{machine_line(res['settings'].get('device', 'cpu'))}, torch {torch.__version__}, {platform.platform()}.

## Detection and localisation

| metric | value |
|---|---|
| image AUROC | {m['image_auroc']:.4f} |
| image AP | {m['image_ap']:.4f} |
| image F1max | {m['image_f1max']:.4f} |
| pixel AUROC | {m['pixel_auroc']:.4f} |
| pixel AP | {m['pixel_ap']:.4f} |
| pixel F1max | {m['pixel_f1max']:.4f} |
| PRO (FPR <= 0.3) | {m['pro']:.4f} |

Pixel metrics are computed at the model's {s['image_size']}x{s['image_size']} resolution (masks resized
nearest-neighbour); features are taken at {s['feature_size'] or s['image_size']} px; scored against
`scoring.reference` **{s.get('reference', 'reconstruction')}** (reconstruction: the papers' scoring).

## Cost

- Training: {res['train_minutes']:.1f} min of optimisation steps on {summary['train_device']} ({trained_stages};
  data loading and checkpoint writes not counted).{base_note(summary['base_train_minutes'])}
- Per frame, batch 1, torch eager, median of {lat['repeats']}: **{lat['ms_per_frame']:.1f} ms**
  (p90 {lat['ms_per_frame_p90']:.1f} ms); DDIM from t={s.get('t_start', s.get('t0'))}, {s['steps']} steps,
  seed {s['seed']}{draws_note(s)}.

| stage (batch 1) | ms |
|---|---|
{stage_rows}

{stage_note(method, s)}

- Batched evaluation (batch {res['batched']['batch_size']}): {res['batched']['ms_per_frame']:.1f} ms per frame.
- Peak resident memory of the evaluation process: {res['peak_rss_mb']:.0f} MB (model, extractor, the whole
  test split and its maps in memory).

## Figure

![inputs, reconstructions, anomaly maps]({png.name})

Rows: for each type, the highest-scoring and the median-scoring image; columns: input (type and score),
reconstruction, anomaly map on one colour scale for all rows (white outline: ground truth), ground truth.
{extra_md}"""
    (args.results / f"{args.name}.md").write_text(md)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
