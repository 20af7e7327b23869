"""Reports for the two defect generators on a real MVTec-layout dataset (MTD here).

    # 1. generate (resumable; one folder per AdaBLDM control checkpoint / DualAnoDiff run is fine)
    edgeinspect generate adabldm --model runs/adabldm_mtd_edge --out runs/adabldm_mtd_gen --per-type 200
    edgeinspect generate dualanodiff --model runs/dualanodiff_mtd_crack --out runs/dualanodiff_mtd_gen_crack ...
    # 2. cut-paste baselines from the same real defects, and the downstream segmenters
    python benchmarks/downstream.py cutpaste --data ../shared/data/mtd --split configs/mtd_fewshot_split.json \
        --seeds adabldm --out runs/cutpaste_mtd_adabldm
    python benchmarks/downstream.py train --data ../shared/data/mtd --split configs/mtd_fewshot_split.json \
        --defects runs/cutpaste_mtd_adabldm --name cutpaste --defects A,B,C --name adabldm ... --out D.json
    # 3. the reports
    python benchmarks/generators_mtd.py adabldm --gen A,B,C --downstream D.json --data ../shared/data/mtd
    python benchmarks/generators_mtd.py dualanodiff --gen X,Y,Z --downstream D.json --data ../shared/data/mtd

write benchmarks/results/<method>_mtd.{md,json,png} (or --name). JSON keys (as the issues name them):
adabldm: images_per_s, images_per_s_by_stage.{sampling,adaptation},
         downstream.cutpaste.{pixel_ap,pixel_auroc,image_auroc}, downstream.generated.{...};
dualanodiff: images_per_s, mask_iou, downstream.{cutpaste,generated,adabldm}.{pixel_ap,pixel_auroc,image_auroc}.

mask_iou (DualAnoDiff): per image, the region where the generated whole image differs from its
BCM background (|blur(I) - blur(B)|, max over channels, above the image's own Otsu threshold of
that difference) against the segmented mask; its IoU, averaged. A second, stricter alignment
number: the generated part image against the whole image inside the mask (mean |I - I_a|).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import cv2
import numpy as np

from edgeinspect.core.atomic import write_text_atomic
from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.data.mvtec import read_image, resize_image
from edgeinspect.data.visualize import grid, label, write_png
from edgeinspect.evaluation.machine import cpu_name, logical_cpus
from edgeinspect.generation.writer import load_index

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("pixel_ap", "pixel_auroc", "image_auroc", "pro")


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _gray3(path: Path) -> np.ndarray:
    g = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return np.repeat(g[:, :, None], 3, axis=2)


def folder_items(folders: list[Path]) -> list[tuple[Path, dict]]:
    return [(f, item) for f in folders for _, item in sorted(load_index(f)["items"].items(), key=lambda kv: int(kv[0]))]


def throughput(items: list[tuple[Path, dict]], stages: tuple[str, ...]) -> dict:
    """images/s over the summed per-image seconds of the given stages (wall time of the loops, not of
    process start-up or PNG writing), and per stage."""
    per_stage = {s: float(sum(it[f"{s}_s"] for _, it in items)) for s in stages}
    total = sum(per_stage.values())
    return {"images": len(items), "seconds": total, "images_per_s": len(items) / total,
            "images_per_s_by_stage": {s: len(items) / v for s, v in per_stage.items()},
            "seconds_per_image_by_stage": {s: v / len(items) for s, v in per_stage.items()}}


def downstream_table(results: dict, names: dict[str, str]) -> tuple[dict, list[str]]:
    out, lines = {}, ["| defects used for training | pixel AP | pixel AUROC | image AUROC | PRO | images | "
                      "per-type pixel AP |", "|---|---|---|---|---|---|---|"]
    for key, name in names.items():
        if name not in results:
            continue
        r = results[name]
        out[key] = {m: r[m] for m in METRICS} | {"n_defect_images": r["n_defect_images"],
                                                  "per_type": r["per_type"], "train_seconds": r["train_seconds"],
                                                  "steps": r["steps"], "source": r["defects"]}
        per = ", ".join(f"{t} {v['pixel_ap']:.3f}" for t, v in r["per_type"].items())
        lines.append(f"| {key} (`{r['defects']}`) | {r['pixel_ap']:.3f} | {r['pixel_auroc']:.3f} | "
                     f"{r['image_auroc']:.3f} | {r['pro']:.3f} | {r['n_defect_images']} | {per} |")
    return out, lines


def seed_spread(results: dict, groups: dict[str, list[str]]) -> tuple[dict, list[str]]:
    """The same defects' segmenter trained with several seeds: per group (label -> results entries),
    each metric's mean, min and max, as JSON and as markdown lines (empty for no groups)."""
    if not groups:
        return {}, []
    out = {}
    lines = ["| defects (segmenter seeds) | pixel AP | pixel AUROC | image AUROC | PRO | seeds |",
             "|---|---|---|---|---|---|"]
    for label, entries in groups.items():
        vals = {m: [float(results[e][m]) for e in entries] for m in METRICS}
        out[label] = {"entries": entries, "seeds": [results[e].get("settings", {}).get("seed") for e in entries],
                      **{m: {"mean": float(np.mean(v)), "min": min(v), "max": max(v)} for m, v in vals.items()}}
        cells = " | ".join(f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" for v in vals.values())
        lines.append(f"| {label} | {cells} | {len(entries)} |")
    return out, lines


def parse_spread(specs: list[str], downstream: dict) -> dict[str, list[str]]:
    """LABEL=ENTRY,ENTRY,... groups (the label may hold '='); every entry must be in the results."""
    groups = {}
    for spec in specs:
        label, sep, entries = spec.rpartition("=")
        names = [e for e in entries.split(",") if e]
        if not sep or not label or len(names) < 2:
            raise SystemExit(f"--spread {spec!r}: expected LABEL=ENTRY,ENTRY[,...] (two or more entries)")
        missing = [e for e in names if e not in downstream]
        if missing:
            raise SystemExit(f"--spread {spec!r}: no entries {missing} in the downstream results")
        groups[label] = names
    return groups


def _pick(items: list[tuple[Path, dict]], per_type: int) -> list[tuple[Path, dict]]:
    by_type: dict[str, list] = {}
    for f, it in items:
        by_type.setdefault(it["defect_type"], []).append((f, it))
    return [x for t in sorted(by_type) for x in by_type[t][:per_type]]


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[mask] = (0.5 * out[mask] + np.array([127, 0, 0])).astype(np.uint8)
    return out


def background_difference_mask(whole: np.ndarray, background: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Where a generated image differs from the background it was generated with (Otsu on the blurred
    absolute difference, max over channels)."""
    a = cv2.GaussianBlur(whole.astype(np.float32), (0, 0), sigma)
    b = cv2.GaussianBlur(background.astype(np.float32), (0, 0), sigma)
    diff = np.abs(a - b).max(axis=2)
    d8 = np.clip(diff, 0, 255).astype(np.uint8)
    _, region = cv2.threshold(d8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return region.astype(bool)


def inside_vs_ring(diff: np.ndarray, mask: np.ndarray, ring_px: int = 7) -> float:
    """(mean of `diff` inside the mask + 1) / (mean in a ring of `ring_px` around it + 1): how much more the
    whole image differs from its background where the mask is than right next to it (1: not at all)."""
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * ring_px + 1,) * 2, np.uint8)).astype(bool)
    ring = grown & ~mask
    return float((diff[mask].mean() + 1) / (diff[ring].mean() + 1)) if ring.any() else float("nan")


# A mask pixel counts as filled when the whole image differs there from its background by more than this
# (grey levels, blurred difference as for inside_vs_ring): how much of each mask shows a defect at all.
FILL_GREY = 15


def mask_alignment(items: list[tuple[Path, dict]], data_root: Path) -> dict:
    ious, part_err, ratios, fills = [], [], [], []
    for f, it in items:
        whole = _rgb(f / it["image"])
        mask = cv2.imread(str(f / it["mask"]), cv2.IMREAD_GRAYSCALE) > 127
        background = resize_image(read_image(data_root / "train" / "good" / it["background"]), whole.shape[0])
        region = background_difference_mask(whole, background)
        union = (region | mask).sum()
        ious.append(float((region & mask).sum() / union) if union else 1.0)
        if mask.any():
            part = _rgb(f / it["part"]).astype(np.float32)
            part_err.append(float(np.abs(part - whole.astype(np.float32))[mask].mean()))
            diff = np.abs(cv2.GaussianBlur(whole.astype(np.float32), (0, 0), 1.0)
                          - cv2.GaussianBlur(background.astype(np.float32), (0, 0), 1.0)).max(axis=2)
            ratios.append(inside_vs_ring(diff, mask))
            fills.append(float((diff[mask] > FILL_GREY).mean()))
    return {"mask_iou": float(np.mean(ious)), "mask_iou_median": float(np.median(ious)),
            "empty_masks": int(sum(1 for _, it in items if it["mask_pixels"] == 0)),
            "part_vs_whole_inside_mask_mean_abs_grey": float(np.mean(part_err)) if part_err else None,
            "inside_vs_ring_difference_median": float(np.nanmedian(ratios)) if ratios else None,
            "mask_fill_mean": float(np.mean(fills)) if fills else None}


def _machine() -> str:
    return f"{cpu_name()}, {logical_cpus()} logical CPUs, no GPU"


def _per_type(items: list[tuple[Path, dict]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, it in items:
        counts[it["defect_type"]] = counts.get(it["defect_type"], 0) + 1
    return counts


def _evaluated(downstream: dict) -> str:
    """How many real defects and normals the segmenters were evaluated on (as the results say)."""
    r = next(iter(downstream.values()), {})
    return f"{r.get('n_defect_images_evaluated', '?')} real defects and {r.get('n_normal_images', '?')} normals"


def _write(out: Path, md: list[str], result: dict) -> dict:
    write_text_atomic(out.with_suffix(".md"), "\n".join(md))
    write_json_atomic(out.with_suffix(".json"), result)
    return result


def _header(title: str, note: str | None, how: list[str] | None = None) -> list[str]:
    """Title, command, machine, the note every reader must see first and the commands that made the inputs."""
    lines = [f"# {title}", "", f"Command: `python {shlex.join(sys.argv)}`  ", f"Machine: {_machine()}", ""]
    lines += ["## Read this first", "", note, ""] if note else []
    if how:
        lines += ["How the inputs were made (each folder's index.json holds its full settings):", "",
                  *[f"    {c}" for c in how], ""]
    return lines


def adabldm_report(gen: list[Path], downstream: dict, data_root: Path, out: Path, note: str | None = None,
                   cutpaste_name: str = "cutpaste", also: dict[str, str] | None = None,
                   how: list[str] | None = None, spread: dict[str, list[str]] | None = None,
                   generated_name: str = "adabldm", gen_machine: str | None = None) -> dict:
    """`also`: more downstream rows, label -> entry of the results (e.g. an earlier run); `spread`:
    label -> entries of one kind of defects trained with several segmenter seeds; `generated_name`: the
    results' entry of `gen`'s segmenter; `gen_machine`: where `gen` was made (None: this machine, shared)."""
    items = folder_items(gen)
    thr = throughput(items, ("sampling", "adaptation"))
    counts = _per_type(items)
    rows = []
    for f, it in _pick(items, 2):
        source = resize_image(read_image(data_root / "train" / "good" / it["source_image"]),
                              _rgb(f / it["image"]).shape[0])
        rows.append([label(source, f"{it['defect_type']} source"), label(_gray3(f / it["trimap"]), "trimap"),
                     label(_rgb(f / it["before_adaptation"]), "before adapt."),
                     label(_rgb(f / it["image"]), "after adapt."), label(_gray3(f / it["mask"]), "mask")])
    write_png(out.with_suffix(".png"), grid(rows))
    table, lines = downstream_table(downstream, {"cutpaste": cutpaste_name, "generated": generated_name,
                                                 **(also or {})})
    spread_table, spread_lines = seed_spread(downstream, spread or {})
    settings = load_index(gen[0])["settings"]
    result = {"method": "adabldm", "images_per_s": thr["images_per_s"],
              "images_per_s_by_stage": thr["images_per_s_by_stage"], "throughput": thr, "images_per_type": counts,
              "downstream": table, "seed_spread": spread_table, "generation_settings": settings, "machine": _machine(),
              "generation_machine": gen_machine or _machine(), "command": shlex.join(sys.argv), "note": note,
              "inputs_made_by": how or []}
    s = settings["sampling"]
    md = [
        *_header("AdaBLDM on MTD (edge preset, CPU)" if gen_machine is None else "AdaBLDM on MTD (edge preset)",
                 note, how),
        f"Generated {thr['images']} defects ({', '.join(f'{k} {v}' for k, v in counts.items())}) from the 10 real "
        "seed defects per type of `configs/mtd_fewshot_split.json` (excluded from the evaluation below), "
        f"Algorithm 1 with {s['free_steps']}/{s['latent_steps']}/{s['pixel_steps']} free/latent/pixel DDIM "
        f"steps, {_guidance(s)}, and Algorithm 2 with {s['adapt_steps']} AdamW steps (lr {s['adapt_lr']}, lambda_con "
        f"{s['lambda_con']}, scope `{s.get('adapt_scope', 'decoder')}`) per image, batch {s['batch_size']}, "
        f"PyTorch, {_where(gen_machine)}", "",
        "| stage | images/s | s/image |", "|---|---|---|",
        *[f"| {k} | {v:.3f} | {thr['seconds_per_image_by_stage'][k]:.2f} |"
          for k, v in thr["images_per_s_by_stage"].items()],
        f"| whole (sampling + adaptation) | {thr['images_per_s']:.3f} | {1 / thr['images_per_s']:.2f} |", "",
        f"![grid]({out.with_suffix('.png').name})", "",
        "Columns: normal source image, trimap (white: defect, grey: foreground), Algorithm 1's output "
        "decoded by the original decoder, after online decoder adaptation, exact mask.", "",
        "## Downstream: the same segmenter trained on normals + each kind of defect", "",
        f"Evaluated on {_evaluated(downstream)} of the test split (no image used as a seed or few-shot "
        "image), at 128 px (EfficientNet-Lite0 FPN segmenter, benchmarks/downstream.py).", "",
        *lines, "",
        *_spread_section(spread_lines),
    ]
    return _write(out, md, result)


def _where(gen_machine: str | None) -> str:
    """Where the throughput below was measured."""
    if gen_machine is not None:
        return f"on {gen_machine}."
    return ("one thread per job. Throughput was measured while other jobs (training, the other generator, "
            "segmenters) shared the two cores, so an idle machine is faster.")


def _spread_section(lines: list[str]) -> list[str]:
    if not lines:
        return []
    return ["## Segmenter seeds", "", "The same defects with the segmenter trained from other seeds (everything else "
            "equal): mean (min-max). The rows above are single runs, seed 0.", "", *lines, ""]


def dualanodiff_report(gen: list[Path], downstream: dict, data_root: Path, out: Path,
                       ablation: tuple[str, list[Path]] | None = None, note: str | None = None,
                       also: dict[str, str] | None = None, how: list[str] | None = None,
                       spread: dict[str, list[str]] | None = None, generated_name: str = "dualanodiff",
                       adabldm_name: str = "adabldm", gen_machine: str | None = None) -> dict:
    """`ablation`: (label, folders) of a second DualAnoDiff variant, measured and listed alongside;
    its downstream entry is the results' `<label>`. `also`: more downstream rows, label -> entry;
    `spread`: as adabldm_report's; `generated_name`, `adabldm_name`: the results' entries of `gen`'s
    segmenter and of the AdaBLDM defects compared with it; `gen_machine`: as adabldm_report's."""
    items = folder_items(gen)
    thr = throughput(items, ("sampling",))
    align = mask_alignment(items, data_root)
    variant = None
    if ablation is not None:
        v_items = folder_items(ablation[1])
        v_sampling = load_index(ablation[1][0])["settings"]["sampling"]
        variant = {"label": ablation[0], "folders": [str(f) for f in ablation[1]], "images": len(v_items),
                   "start": _start(v_sampling), "training": _training(ablation[1][0]),
                   "images_per_s": throughput(v_items, ("sampling",))["images_per_s"],
                   "alignment": mask_alignment(v_items, data_root),
                   "lora_target_modules": _lora_targets(ablation[1][0])}
    counts = _per_type(items)
    rows = []
    for f, it in _pick(items, 2):
        whole = _rgb(f / it["image"])
        mask = cv2.imread(str(f / it["mask"]), cv2.IMREAD_GRAYSCALE) > 127
        rows.append([label(whole, f"{it['defect_type']} whole"), label(_rgb(f / it["part"]), "part"),
                     label(_gray3(f / it["mask"]), "mask"), label(_overlay(whole, mask), "overlay")])
    write_png(out.with_suffix(".png"), grid(rows))
    names = {"cutpaste": "cutpaste_fewshot", "generated": generated_name, "adabldm": adabldm_name}
    if variant is not None:
        names[variant["label"]] = variant["label"]
    table, lines = downstream_table(downstream, {**names, **(also or {})})
    spread_table, spread_lines = seed_spread(downstream, spread or {})
    settings = {str(f): load_index(f)["settings"] for f in gen}
    s = next(iter(settings.values()))["sampling"]
    result = {"method": "dualanodiff", "images_per_s": thr["images_per_s"], "mask_iou": align["mask_iou"],
              "alignment": align, "lora_target_modules": _lora_targets(gen[0]), "variant": variant,
              "throughput": thr, "images_per_type": counts, "downstream": table, "seed_spread": spread_table,
              "generation_settings": settings, "machine": _machine(), "generation_machine": gen_machine or _machine(),
              "command": shlex.join(sys.argv), "note": note, "inputs_made_by": how or []}
    md = [
        *_header("DualAnoDiff on MTD (edge preset, CPU)" if gen_machine is None else "DualAnoDiff on MTD (edge preset)",
                 note, how),
        f"Generated {thr['images']} image + mask pairs ({', '.join(f'{k} {v}' for k, v in counts.items())}), one "
        "run per defect type trained on about a third of that type's real defects (`configs/mtd_fewshot_split.json`, "
        f"excluded from the evaluation below); {_start(s)}, classifier-free guidance "
        f"{s['guidance_scale']}, BCM backgrounds = normal tiles, mask from the part image "
        f"(reference {s['mask'].get('reference', 'empty')}, threshold {s['mask']['threshold']}). "
        f"Training: {_training(gen[0])}.", "",
        f"Throughput: {thr['images_per_s']:.3f} images/s ({1 / thr['images_per_s']:.2f} s/image, batch "
        f"{s['batch_size']}, PyTorch, {_where(gen_machine).rstrip('.')}).", "",
        f"Mask-image alignment: mean IoU {align['mask_iou']:.3f} (median {align['mask_iou_median']:.3f}) of the mask "
        "with the region where the whole image differs from its BCM background (Otsu on the blurred difference); "
        f"{align['empty_masks']} empty masks; mean |whole - part| inside the mask "
        f"{align['part_vs_whole_inside_mask_mean_abs_grey'] or float('nan'):.1f} grey levels; median ratio of "
        "the whole image's difference from its background inside the mask to that in a 7-px ring around it "
        f"{_num(align.get('inside_vs_ring_difference_median'))} (1: the whole image has no defect where the mask "
        f"is); on average {_num(align.get('mask_fill_mean'))} of a mask's pixels differ from the background by more "
        f"than {FILL_GREY} grey levels (how much of the mask shows a defect at all).", "",
        f"LoRA on {', '.join(_lora_targets(gen[0]))}.", "",
        *([f"Variant `{variant['label']}` (LoRA on {', '.join(variant['lora_target_modules'])}; "
           f"{variant['start']}; training: {variant['training']}; `{', '.join(variant['folders'])}`): "
           f"{variant['images']} pairs, {variant['images_per_s']:.3f} images/s, mask IoU "
           f"{variant['alignment']['mask_iou']:.3f}, mean |whole - part| inside the mask "
           f"{variant['alignment']['part_vs_whole_inside_mask_mean_abs_grey'] or float('nan'):.1f} grey levels, "
           f"inside/ring ratio {_num(variant['alignment'].get('inside_vs_ring_difference_median'))}, "
           f"mask fill {_num(variant['alignment'].get('mask_fill_mean'))}, "
           f"{variant['alignment']['empty_masks']} empty masks.", ""] if variant else []),
        f"![grid]({out.with_suffix('.png').name})", "",
        "## Downstream: the same segmenter trained on normals + each kind of defect", "",
        f"Same evaluation set as AdaBLDM's report ({_evaluated(downstream)} outside every few-shot set). "
        "`cutpaste` here pastes DualAnoDiff's few-shot defects (the same real images DualAnoDiff trained on).", "",
        *lines, "",
        *_spread_section(spread_lines),
    ]
    return _write(out, md, result)


def _guidance(sampling: dict) -> str:
    scale = sampling.get("guidance_scale", 1.0)
    if scale <= 1.0:
        return "no classifier-free guidance"
    against = ("the empty prompt and the trimap without its defect" if sampling.get("uncond_trimap") == "no_defect"
               else "the empty prompt")
    return f"classifier-free guidance {scale:g} against {against}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _start(sampling: dict) -> str:
    strength = sampling.get("strength", 1.0)
    if strength >= 1.0:
        return f"{sampling['steps']} DDIM steps from pure noise"
    return (f"the last {max(1, round(strength * sampling['steps']))} of {sampling['steps']} DDIM steps, started "
            f"from the background noised to that level (strength {strength})")


def _run_config(folder: Path) -> dict:
    model = Path(load_index(folder)["settings"]["model"])
    return json.loads((model.parent.parent / "config.json").read_text())


def _training(folder: Path) -> str:
    """How the DualAnoDiff run that made a generation folder was trained."""
    t = _run_config(folder)["train"]
    weighted = f", noise loss weighted 1 + {t['defect_loss_weight']:g} on the defect" if t.get("defect_loss_weight") else ""
    return (f"{t['steps']} steps, lr {t['lr']}, batch {t['batch_size']}, BCM background "
            f"{t.get('background', 'normals')}{weighted}")


def _lora_targets(folder: Path) -> list[str]:
    """The LoRA target modules of the DualAnoDiff run that made a generation folder."""
    return list(_run_config(folder)["lora"]["target_modules"])


def parse_also(specs: list[str], downstream: dict) -> dict[str, str]:
    """LABEL=ENTRY pairs (a label may itself hold '='; an entry is a results key) -> {label: entry};
    an entry missing from the results is an error, not a silently dropped row."""
    also = {}
    for spec in specs:
        label, sep, entry = spec.rpartition("=")
        if not sep or not label or not entry:
            raise SystemExit(f"--also {spec!r}: expected LABEL=ENTRY")
        if entry not in downstream:
            raise SystemExit(f"--also {spec!r}: no entry {entry!r} in the downstream results "
                             f"(they hold {sorted(downstream)})")
        also[label] = entry
    return also


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=["adabldm", "dualanodiff"])
    p.add_argument("--gen", required=True, help="generation folder(s), comma-separated")
    p.add_argument("--downstream", type=Path, required=True, help="benchmarks/downstream.py train results JSON")
    p.add_argument("--data", type=Path, required=True, help="the MVTec-layout dataset (normal images)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--name", help="report file name without extension (default: <method>_mtd)")
    p.add_argument("--variant", help="DualAnoDiff: LABEL=folder,folder,... of a second variant to list beside")
    p.add_argument("--note", help="a paragraph every reader must see first (e.g. a known flaw of the run)")
    p.add_argument("--cutpaste-name", default="cutpaste",
                   help="AdaBLDM: the downstream entry of its cut-paste baseline (same seeds)")
    p.add_argument("--generated-name", help="the downstream entry of --gen's defects (default: the method's name)")
    p.add_argument("--adabldm-name", default="adabldm",
                   help="DualAnoDiff: the downstream entry of the AdaBLDM defects it is compared with")
    p.add_argument("--gen-machine", help="where --gen was made, for its throughput (default: this machine, shared "
                   "with other jobs)")
    p.add_argument("--also", action="append", default=[], metavar="LABEL=ENTRY",
                   help="one more downstream row: the results' ENTRY under LABEL (repeatable)")
    p.add_argument("--spread", action="append", default=[], metavar="LABEL=ENTRY,ENTRY",
                   help="entries of the same defects trained with other segmenter seeds (repeatable)")
    p.add_argument("--how", action="append", default=[], metavar="COMMAND",
                   help="a command that made the inputs (training, generation, segmenter), listed in the report")
    args = p.parse_args(argv)
    gen = [Path(g) for g in args.gen.split(",")]
    downstream = json.loads(args.downstream.read_text())
    also = parse_also(args.also, downstream)
    out = args.results / (args.name or f"{args.method}_mtd")
    if args.method == "adabldm":
        r = adabldm_report(gen, downstream, args.data, out, args.note, args.cutpaste_name, also, args.how,
                           parse_spread(args.spread, downstream), args.generated_name or "adabldm", args.gen_machine)
    else:
        variant = None
        if args.variant:
            label, folders = args.variant.split("=", 1)
            variant = (label, [Path(f) for f in folders.split(",")])
        r = dualanodiff_report(gen, downstream, args.data, out, variant, args.note, also, args.how,
                               parse_spread(args.spread, downstream), args.generated_name or "dualanodiff",
                               args.adabldm_name, args.gen_machine)
    print(json.dumps({k: r[k] for k in r if k in ("images_per_s", "mask_iou", "downstream", "seed_spread")}, indent=2))


if __name__ == "__main__":
    main()
