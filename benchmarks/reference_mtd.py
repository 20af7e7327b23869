"""DiAD and GLAD x scoring.reference {reconstruction, bank, hybrid} on a category -> results/reference_mtd.*

Bank reference alone, no diffusion model needed (the edge preset's feature settings; DiAD's and GLAD's bank
rows differ only by their scoring settings: blur, image score):

    nice python benchmarks/reference_mtd.py --data ../shared/data/mtd --bank-only

The whole ablation on trained detectors (runs on torch, or bundles on onnxruntime; a missing bank is built
from the training normals first, as `edgeinspect bank` does, and stored beside the run / in the bundle):

    nice python benchmarks/reference_mtd.py --data ../shared/data/mtd --diad runs/diad_mtd_edge --glad runs/glad_mtd_edge
    nice python benchmarks/reference_mtd.py --data ../shared/data/mtd --diad bundles/diad --glad bundles/glad

Each run updates results/<name>.json (flat keys `<method>.<reference>.<metric>`: image_auroc, pixel_auroc,
pixel_ap, pro, ms_per_frame, bundle_mb, ...; rows measured earlier and not measured again are kept) and
rewrites results/<name>.md from it. Scores come from the committed pipelines (edgeinspect.runtime.detector),
metrics from edgeinspect.evaluation.metrics.evaluate; every threshold-free metric, nothing fitted on defects.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edgeinspect.calibration.bank import bank_bytes, coreset_bank, fit_bank, save_run_bank, training_normals
from edgeinspect.config import build_config, frame_size, merge_config, parse_overrides
from edgeinspect.core.atomic import write_json_atomic, write_text_atomic
from edgeinspect.core.networks import torch_networks
from edgeinspect.core.roles import bank_distance_signature, feature_signature
from edgeinspect.core.runs import resolve_checkpoint
from edgeinspect.data.mvtec import MVTecFolder, uint8_to_model
from edgeinspect.evaluation.machine import cpu_name
from edgeinspect.evaluation.metrics import auroc, evaluate
from edgeinspect.export.onnx import export_onnx
from edgeinspect.models.features import BankDistance, FeatureNet, build_features
from edgeinspect.runtime.bank import BANK_FILE, BANK_PAYLOAD, NormalBank, read_bank
from edgeinspect.runtime.bundle_loading import load_bundle
from edgeinspect.runtime.bundle_update import set_payload
from edgeinspect.runtime.detector import assemble_pipeline, bundle_bank, bundle_pipeline
from edgeinspect.runtime.run_detector import run_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCES = ("reconstruction", "bank", "hybrid")
METHODS = ("diad", "glad")


# --------------------------------------------------------------------------- scoring a test split


def score_split(pipe: Any, test: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(scores (N,), maps (N, H, W), wall ms per frame) of uint8 test frames through a pipeline."""
    scores, maps = [], []
    t0 = time.perf_counter()
    for s in range(0, len(test), batch):
        r = pipe(uint8_to_model(test[s:s + batch]))
        scores.append(r.scores.double().numpy())
        maps.append(r.maps.float().numpy())
    ms = 1000 * (time.perf_counter() - t0) / len(test)
    return np.concatenate(scores), np.concatenate(maps), ms


def metrics_row(split: MVTecFolder, labels: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                scores: np.ndarray) -> dict[str, Any]:
    m = evaluate(labels, scores, masks, maps)
    types = np.array([s.defect_type for s in split.samples])
    per_type = {t: round(auroc(labels[(types == t) | (types == "good")], scores[(types == t) | (types == "good")]), 4)
                for t in sorted(set(types) - {"good"})}
    return {**{k: round(float(v), 4) for k, v in m.items()}, "image_auroc_by_type": per_type}


def folder_mb(paths: list[Path]) -> float:
    return round(sum(p.stat().st_size for root in paths for p in ([root] if root.is_file() else root.rglob("*"))
                     if p.is_file()) / 2**20, 2)


# --------------------------------------------------------------------------- bank only (no diffusion model)


def bank_only_rows(data: Path, overrides: dict, batch: int) -> dict[str, dict[str, Any]]:
    """The bank rows of DiAD and GLAD at their edge presets' scoring settings: one bank (the settings it
    depends on, features and scoring.bank, are the same in both presets), each method's blur and image score."""
    cfgs = {m: build_config(m, "edge", merge_config(overrides, {"scoring": {"reference": "bank"}})) for m in METHODS}
    diad = cfgs["diad"]
    features = build_features(diad)
    levels = len(features.strides)
    nets = torch_networks({"features": FeatureNet(features), "bank_distance": BankDistance(levels)}, "cpu",
                          {"features": feature_signature(levels), "bank_distance": bank_distance_signature(levels)})
    size = diad.model.image_size
    at = frame_size(size, diad.scoring)  # frames are read at the bank's view (masks at the model size)
    feature_size = diad.scoring.bank.feature_size or diad.scoring.feature_size or size
    bank_cfg = diad.scoring.bank
    paths = training_normals(data)
    t0 = time.perf_counter()

    def features_of(frames: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(frames, size=(feature_size,) * 2, mode="bilinear", align_corners=False)
        return list(nets["features"](image=x).values())

    bank = coreset_bank(features_of, paths, at, bank_cfg, batch, progress=True)
    build_s = time.perf_counter() - t0
    deploy_mb = bank_deployment_mb(nets, bank, feature_size)

    split = MVTecFolder(data, "test", at, mask_size=size)
    test, masks, labels = split.load_all()
    out = {}
    for method, cfg in cfgs.items():
        pipe = assemble_pipeline(cfg, nets, torch.zeros(1, 1, 1), bank=bank)
        scores, maps, ms = score_split(pipe, test, batch)
        s = cfg.scoring
        out[f"{method}.bank"] = {
            **metrics_row(split, labels.numpy(), masks.numpy(), maps, scores), "ms_per_frame": round(ms, 1),
            "bundle_mb": deploy_mb, "source": "no model (features + bank_distance + bank only)",
            "feature_size": feature_size, "blur_sigma": s.blur_sigma,
            "image_score": (f"top-{cfg.inference.top_k} mean" if method == "glad"
                            else f"{s.pool_iterations} x avg-pool {s.pool_size}, max"),
            "bank_size": bank_cfg.size, "bank_candidates": bank.info["candidates"],
            "bank_projection": bank_cfg.projection, "bank_mb": round(bank.nbytes / 2**20, 2),
            "bank_build_s": round(build_s, 1), "test_images": len(labels), "train_images": len(paths)}
        print(json.dumps({method: out[f"{method}.bank"]}), flush=True)
    return out


def bank_deployment_mb(nets: Any, bank: NormalBank, feature_size: int) -> float:
    """MB of what the bank reference loads: the features and bank_distance graphs and the bank file."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = torch.rand(1, 3, feature_size, feature_size) * 2 - 1
        fnet = nets["features"].module
        export_onnx(fnet, {"image": image}, root / "features.onnx", nets["features"].output_names,
                    {"image": {0: "batch"}})
        with torch.no_grad():
            feats = fnet(image)
        inputs = {**{f"feature_{i}": f for i, f in enumerate(feats)},
                  **{f"bank_{i}": v for i, v in enumerate(bank.vectors)}}
        export_onnx(nets["bank_distance"].module, inputs, root / "bank_distance.onnx",
                    nets["bank_distance"].output_names, {})
        save_file(bank.tensors(), str(root / BANK_FILE))
        return folder_mb([root])


# --------------------------------------------------------------------------- the ablation on a trained detector


def detector_rows(method: str, source: Path, data: Path, batch: int | None, threads: int | None,
                  settings: dict | None = None) -> dict[str, dict[str, Any]]:
    """The three references of one trained detector: a run folder (torch) or a bundle (onnxruntime), with
    `settings` (inference/scoring overrides) on top of its own. A bank is built first when it has none."""
    is_bundle = (source / "manifest.json").is_file()
    over = merge_config(settings or {}, {"scoring": {"reference": "reconstruction"}})
    if is_bundle:
        cfg = load_bundle(source, overrides=over).config
        pipe = bundle_pipeline(source, "onnxruntime", overrides=over, verdict=False, intra_op_threads=threads,
                               references=REFERENCES)
        if BANK_PAYLOAD not in (load_bundle(source).manifest.get("payload") or {}):
            bank = fit_bank(pipe, training_normals(data), frame_size(cfg.model.image_size, cfg.scoring, "bank"),
                            cfg.inference.batch_size)
            set_payload(source, BANK_PAYLOAD, bank_bytes(bank))
        bank = bundle_bank(load_bundle(source))
        mb: float | None = folder_mb([source])
    else:
        cfg, pipe, _ = run_pipeline(source, over)
        path = resolve_checkpoint(source) / BANK_FILE
        if not path.is_file():
            save_run_bank(source, fit_bank(pipe, training_normals(data),
                                           frame_size(cfg.model.image_size, cfg.scoring, "bank"),
                                           cfg.inference.batch_size))
        bank = read_bank(path)
        mb = None
    if cfg.method != method:
        raise SystemExit(f"{source} is a {cfg.method} detector, given as --{method}")
    size = cfg.model.image_size
    split = MVTecFolder(data, "test", size)
    test, masks, labels = split.load_all()
    frames = {size: test}  # by the size each reference reads frames at (config.frame_size); masks at `size`
    out = {}
    for ref in REFERENCES:
        at = frame_size(size, cfg.scoring, ref)
        if at not in frames:
            frames[at] = MVTecFolder(data, "test", at, mask_size=size).load_all()[0]
        scores, maps, ms = score_split(pipe.using(ref, bank), frames[at], batch or cfg.inference.batch_size)
        out[f"{method}.{ref}"] = {
            **metrics_row(split, labels.numpy(), masks.numpy(), maps, scores), "ms_per_frame": round(ms, 1),
            "bundle_mb": mb, "source": str(source), "backend": "onnxruntime" if is_bundle else "torch",
            "feature_size": cfg.scoring.feature_size, "blur_sigma": cfg.scoring.blur_sigma,
            "bank_feature_size": frame_size(size, cfg.scoring, "bank"),
            "bank_neighbourhood": cfg.scoring.bank.neighbourhood,
            "bank_size": len(bank.vectors[0]), "bank_mb": round(bank.nbytes / 2**20, 2),
            "hybrid_scales": bank.scales, "test_images": len(labels), "settings": settings or {}}
        print(json.dumps({f"{method}.{ref}": out[f"{method}.{ref}"]}), flush=True)
    return out


# --------------------------------------------------------------------------- report


KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "pro", "ms_per_frame", "bundle_mb")


def flat(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{name}.{k}": row[k] for name, row in rows.items() for k in KEYS if k in row}


def flat_settings(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= flat_settings(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def figure(doc: dict[str, Any], out_png: Path) -> None:
    """Per detector, image and pixel AUROC of each reference (bars), with ms per frame written above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    methods = [m for m in METHODS if any(f"{m}.{r}" in rows for r in REFERENCES)]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.8 * len(methods), 4.0), dpi=110, squeeze=False)
    for ax, m in zip(axes[0], methods):
        refs = [r for r in REFERENCES if f"{m}.{r}" in rows]
        x = np.arange(len(refs))
        for k, (key, label) in enumerate((("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"))):
            vals = [rows[f"{m}.{r}"][key] for r in refs]
            bars = ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=label)
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        for i, r in enumerate(refs):
            ax.text(i, 0.47, f"{rows[f'{m}.{r}']['ms_per_frame']:.0f} ms", ha="center", fontsize=7)
        ax.set_xticks(x, refs)
        ax.set_ylim(0.45, 1.1)
        ax.set_title(m)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper center", ncol=2, fontsize=7)
    fig.suptitle(doc.get("title") or "scoring reference", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def report(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    lines = [f"# {doc.get('title') or 'DiAD and GLAD x scoring reference on MTD'}", "",
             *([doc["note"], ""] if doc.get("note") else []),
             "Image/pixel metrics of the whole test split per detector and `scoring.reference` "
             "(reconstruction: the papers' scoring; bank: the nearest training-normal feature, no diffusion; "
             "hybrid: both, scaled on held-out training normals; edgeinspect/runtime/bank.py). ms per frame: wall "
             "time of the pipeline on this machine (2 cores shared with training runs: disturbed by their load). "
             "bundle MB: the bundle folder; for a bank row measured without a model, the files the bank reference "
             "loads (features and bank_distance graphs, bank file).", "",
             f"`default_reference` (what the edge preset ships with): **{doc['default_reference']}**.", "",
             "The bank's settings (feature size, layers, blur, coreset size) were swept on the same split: "
             "reference_sweep_mtd.md.", "",
             "| detector | reference | image AUROC | pixel AUROC | pixel AP | PRO | per-type image AUROC | "
             "ms/frame | bundle MB | bank (vectors/level, MB; view px, neighbourhood) | source; settings |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(rows):
        r = rows[name]
        method, ref = name.split(".")
        types = ", ".join(f"{t} {v:.3f}" for t, v in r["image_auroc_by_type"].items())
        lines.append(f"| {method} | {ref} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['pixel_ap']:.4f} | "
                     f"{r['pro']:.4f} | {types} | {r['ms_per_frame']} | {r['bundle_mb']} | "
                     f"{r['bank_size']}, {r['bank_mb']}"
                     + (f"; {r['bank_feature_size']} px, {r['bank_neighbourhood']}" if "bank_feature_size" in r else "")
                     + f" | {r['source']}"
                     + ("; " + ", ".join(f"{k}={v}" for k, v in flat_settings(r["settings"]).items())
                        if r.get("settings") else "") + " |")
    pending = [f"{m}.{ref}" for m in METHODS for ref in REFERENCES if f"{m}.{ref}" not in rows]
    if pending:
        lines += ["", "Not measured yet (need trained models): " + ", ".join(pending) + ". Fill them with:", "",
                  "    nice python benchmarks/reference_mtd.py --data ../shared/data/mtd --diad RUN_OR_BUNDLE "
                  "--glad RUN_OR_BUNDLE"]
    for m in METHODS:
        if f"{m}.hybrid" in rows and f"{m}.bank" in rows:
            h, b = rows[f"{m}.hybrid"], rows[f"{m}.bank"]
            lines += ["", f"{m}: the diffusion's contribution (hybrid - bank): image AUROC "
                          f"{h['image_auroc'] - b['image_auroc']:+.4f}, pixel AUROC {h['pixel_auroc'] - b['pixel_auroc']:+.4f}."]
    if doc.get("figure"):
        lines += ["", f"![image and pixel AUROC per detector and reference; ms per frame above the axis]({doc['figure']})"]
    lines += ["", "## Commands", ""] + [f"    {c}" for c in doc["commands"]]
    lines += ["", "## Machine", "", f"{doc['machine']['cpu']}, {doc['machine']['threads']} torch threads, no GPU, "
              f"torch {doc['machine']['torch']}.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--bank-only", action="store_true", help="the bank rows, without a model (edge presets)")
    ap.add_argument("--diad", type=Path, help="a trained DiAD run folder or bundle")
    ap.add_argument("--glad", type=Path, help="a trained GLAD run folder or bundle")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="--bank-only: override a setting of both presets, e.g. --set scoring.bank.size=8192")
    for m in METHODS:
        ap.add_argument(f"--{m}-set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"an inference/scoring setting of the {m} detector, e.g. --{m}-set scoring.decoder=anchor")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--default-reference", default=None, help="record what the edge preset ships with")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--name", default="reference_mtd")
    ap.add_argument("--title", help="the report's title (kept from the earlier run when not given)")
    ap.add_argument("--note", help="a paragraph for the report: what the data is, what the rows say")
    args = ap.parse_args()
    if not (args.bank_only or args.diad or args.glad):
        ap.error("nothing to measure: give --bank-only and/or --diad/--glad")
    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, Any]] = {}
    if args.bank_only:
        rows.update(bank_only_rows(args.data, parse_overrides(args.overrides), args.batch))
    for method in METHODS:
        source = getattr(args, method)
        if source is not None:
            rows.update(detector_rows(method, source, args.data, args.batch, args.threads,
                                      parse_overrides(getattr(args, f"{method}_set"))))
    path = args.results / f"{args.name}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}, "commands": []}
    doc["rows"].update(rows)
    doc.update(flat(doc["rows"]))
    command = "nice python benchmarks/reference_mtd.py " + " ".join(sys.argv[1:])
    doc["commands"] = list(dict.fromkeys([*doc["commands"], command]))  # a repeated command: its rows replaced
    doc["default_reference"] = args.default_reference or doc.get("default_reference") or "reconstruction"
    for key in ("title", "note"):
        if getattr(args, key):
            doc[key] = getattr(args, key)
    doc["machine"] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "load_average": os.getloadavg()[0]}
    doc["figure"] = f"{args.name}.png"
    args.results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, doc)
    write_text_atomic(args.results / f"{args.name}.md", report(doc))
    figure(doc, args.results / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
