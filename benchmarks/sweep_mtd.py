"""One table (and figure) from several detection_mtd.py evaluations of settings -> results/.

    python benchmarks/sweep_mtd.py --name glad_mtd_gpu_sweep --results /tmp/sweep/results \\
        --evals /tmp/sweep/evals --selection benchmarks/results/glad_mtd_selection.txt [--note NOTE.md] NAME [NAME ...]

Each NAME is a `detection_mtd.py --name NAME` evaluation: its summary `<results>/NAME.json` (metrics on
the whole test split and, with `--selection`, on the held-out images) and its raw `<evals>/NAME_eval.json`
(per-image scores), from which the image AUROC on the images the settings are chosen on is computed.
Pixel metrics on those images would need the stored maps, which a settings sweep need not keep.
Rows keep the given order; each shows the `--set` flags of its detection_mtd.py command (read from its
markdown report; `runtime.*` left out). Writes
results/<name>.{md,json,png}; the figure puts each row at its (image AUROC, pixel AUROC) on the whole
split, with the 0.90 targets drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgeinspect.core.atomic import write_text_atomic
from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.data.mvtec import name_keys
from edgeinspect.evaluation.evaluate import read_name_list
from edgeinspect.evaluation.metrics import auroc

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "pro")


def selection_image_auroc(raw: dict, chosen: set[str]) -> tuple[float, int]:
    rows = [p for p in raw["per_image"] if not chosen.isdisjoint(name_keys(p["type"], p["image"]))]
    if not rows:
        raise SystemExit("--selection: none of its names is an image of the evaluation")
    labels = np.array([p["type"] != "good" for p in rows], dtype=np.int64)
    return float(auroc(labels, np.array([p["score"] for p in rows]))), len(rows)


def overrides_of(report: Path) -> list[str]:
    """The `--set` flags of the detection_mtd.py command in an evaluation's markdown report."""
    for line in report.read_text().splitlines():
        if "benchmarks/detection_mtd.py" in line:
            words = line.split()
            return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]
    raise SystemExit(f"{report}: no detection_mtd.py command in it")


def figure(rows: list[dict], out_png: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    x = [r["full"]["image_auroc"] for r in rows]
    y = [r["full"]["pixel_auroc"] for r in rows]
    ax.scatter(x, y, s=18)
    for r, xi, yi in zip(rows, x, y):
        ax.annotate(r["name"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(target, color="grey", lw=0.8, ls="--")
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("image AUROC (whole test split)")
    ax.set_ylabel("pixel AUROC (whole test split)")
    ax.set_title("settings: image vs pixel AUROC (dashed: targets)")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", help="detection_mtd.py --name of each evaluation, in table order")
    ap.add_argument("--results", type=Path, required=True, help="folder of the evaluations' summary JSONs")
    ap.add_argument("--evals", type=Path, required=True, help="folder of their raw <name>_eval.json files")
    ap.add_argument("--selection", type=Path, help="the images the settings are chosen on (as detection_mtd.py)")
    ap.add_argument("--name", required=True, help="result file stem")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--prefix", default="", help="dropped from the names in the table")
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--note", type=Path, help="markdown file: how the evaluations were run, what they say")
    args = ap.parse_args()
    chosen = read_name_list(args.selection) if args.selection else None
    rows = []
    for name in args.names:
        summary_file, raw_file = args.results / f"{name}.json", args.evals / f"{name}_eval.json"
        for f in (summary_file, raw_file, summary_file.with_suffix(".md")):
            if not f.is_file():
                raise SystemExit(f"{f}: missing (run benchmarks/detection_mtd.py --name {name} first)")
        summary, raw = json.loads(summary_file.read_text()), json.loads(raw_file.read_text())
        row = {"name": name.removeprefix(args.prefix),
               "overrides": [o for o in overrides_of(summary_file.with_suffix(".md")) if not o.startswith("runtime.")],
               "checkpoint": raw.get("checkpoint"), "full": {k: summary[k] for k in METRICS},
               "n_images": summary["n_images"]}
        if "held_out" in summary:
            row["held_out"] = {k: summary["held_out"][k] for k in METRICS}
        if chosen is not None:
            row["selection_image_auroc"], row["n_selection"] = selection_image_auroc(raw, chosen)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"{args.name}.json", {"rows": rows, "target": args.target})
    figure(rows, args.out / f"{args.name}.png", args.target)

    def flags(r: dict) -> str:
        return " ".join(f"`{o}`" for o in r["overrides"]) or "(the run's own)"

    held = "held_out" in rows[0]
    head = "| row | run | `--set` | image AUROC | pixel AUROC | pixel AP | PRO |"
    sep = "|---|---|---|---:|---:|---:|---:|"
    if held:
        head += " held-out image / pixel AUROC |"
        sep += "---:|"
    if chosen is not None:
        head += " image AUROC on the selection |"
        sep += "---:|"
    lines = [head, sep]
    for r in rows:
        f = r["full"]
        line = (f"| {r['name']} | `{Path(r['checkpoint'] or '').parent.parent.name}` | {flags(r)} | "
                f"{f['image_auroc']:.4f} | {f['pixel_auroc']:.4f} | {f['pixel_ap']:.4f} | {f['pro']:.4f} |")
        if held:
            line += f" {r['held_out']['image_auroc']:.4f} / {r['held_out']['pixel_auroc']:.4f} |"
        if chosen is not None:
            line += f" {r['selection_image_auroc']:.4f} |"
        lines.append(line)
    sel = (f"Held out: the {rows[0]['n_images'] - rows[0]['n_selection']} test images not named in "
           f"`{args.selection}`; selection: the {rows[0]['n_selection']} named there.\n\n" if chosen is not None else "")
    md = f"""# Settings sweep: {args.name}

    python benchmarks/sweep_mtd.py {' '.join(sys.argv[1:])}

{args.note.read_text().strip() if args.note else ""}

Settings: each row's `--set` flags on top of its run's config. Metrics on the whole test split ({rows[0]['n_images']} images) unless named.
{sel}
{chr(10).join(lines)}

![image vs pixel AUROC]({args.name}.png)
"""
    write_text_atomic(args.out / f"{args.name}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
