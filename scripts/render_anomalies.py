"""Render a grid of GLAD's synthetic anomalies to PNG (to check the masks and sources by eye).

    python scripts/render_anomalies.py --data data/mtd_sample --out anomalies.png
    python scripts/render_anomalies.py --config configs/glad_mtd_edge.yaml --n 12 --seed 3 \\
        --set train.anomalies.foreground=otsu --out anomalies.png

Each row: normal image | synthetic anomaly | mask | outline on the anomaly, labelled with the
source and the blend factor beta. The anomaly settings come from the GLAD config (preset or YAML,
`--set` overrides); every sample is forced anomalous (clean_ratio is ignored here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from edgeinspect.config import ConfigError, load_config
from edgeinspect.data.anomalies import AnomalySynthesizer
from edgeinspect.data.mvtec import MVTecFolder
from edgeinspect.data.visualize import grid, label, write_png


def render(data_root: Path, cfg, n: int, seed: int, size: int | None = None) -> np.ndarray:
    size = size or cfg.model.image_size
    data = MVTecFolder(data_root, "train", size)
    images_u8, _, _ = data.load_all()
    pool = images_u8.permute(0, 2, 3, 1).contiguous().numpy()
    synth = AnomalySynthesizer(cfg.train.anomalies, pool)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        i = int(rng.integers(len(pool)))
        s = synth(pool[i], rng, index=i, force=True)
        mask_rgb = np.repeat((s.mask * 255).astype(np.uint8)[..., None], 3, axis=2)
        outlined = s.image.copy()
        contours, _ = cv2.findContours(s.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outlined, contours, -1, (255, 0, 0), 1)
        text = f"{s.source} b={s.beta:.2f}" if s.source else "clean"
        rows.append([label(pool[i], data.samples[i].path.name[:24]), label(s.image, text),
                     label(mask_rgb, f"{100 * s.mask.mean():.1f}% a={s.angle:.0f}"), label(outlined, "outline")])
    return grid(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="GLAD YAML config (default: the preset)")
    ap.add_argument("--preset", choices=["tiny", "edge", "sd15"], default=None)
    ap.add_argument("--data", type=Path, help="MVTec-layout category folder (default: the config's train.data_root)")
    ap.add_argument("--n", type=int, default=8, help="number of examples (rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, help="image size (default: the model's)")
    ap.add_argument("--out", type=Path, required=True, help="PNG file to write")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, "glad", args.preset, args.overrides)
    except ConfigError as e:
        print(f"render_anomalies: {e}", file=sys.stderr)
        return 2
    data = args.data or cfg.train.data_root
    if data is None:
        print("render_anomalies: pass --data (no train.data_root in the config)", file=sys.stderr)
        return 2
    write_png(args.out, render(Path(data), cfg, args.n, args.seed, args.size))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
