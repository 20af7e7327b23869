"""Autoencoder round-trip fidelity of trained runs on a real MVTec-layout test split -> results/.

    python benchmarks/autoencoder_mtd.py --data ../shared/data/mtd \
        runs/diad_mtd_edge/checkpoints/autoencoder-final runs/diad_mtd_edge_f4/checkpoints/autoencoder-final

Every `--every`-th test image (all types) at the run's model size goes through encode (posterior
mean) and decode; the report gives the latent shape and the PSNR (images in [-1, 1], peak-to-peak 2)
per run, and a figure: input, then each run's round trip, for the first six images. Writes
results/autoencoder_mtd.{md,json,png}; the JSON holds per run: latent_shape, psnr_mean, psnr_median.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.data.mvtec import MVTecFolder, tensor_to_image, uint8_to_model
from edgeinspect.data.visualize import grid, label, write_png
from edgeinspect.evaluation.machine import cpu_name
from edgeinspect.models.diad import VAEDecoderNet, VAEEncoderNet
from edgeinspect.runtime.torch_backend import load_diad

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def roundtrip(vae: torch.nn.Module, x: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, tuple[int, ...]]:
    enc, dec = VAEEncoderNet(vae), VAEDecoderNet(vae)
    outs, shape = [], None
    for s in range(0, len(x), batch):
        z = enc(x[s:s + batch])
        shape = tuple(z.shape[1:])
        outs.append(dec(z).clamp(-1, 1))
    return torch.cat(outs), shape


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, for images in [-1, 1] (peak-to-peak 2)."""
    return 10 * torch.log10(4 / (a - b).pow(2).mean(dim=(1, 2, 3)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path, help="DiAD-family run or checkpoint folders")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    summary, rows = {}, None
    for ck in args.checkpoints:
        cfg, model = load_diad(ck)
        data = MVTecFolder(args.data, "test", cfg.model.image_size)
        idx = list(range(0, len(data), args.every))
        x = uint8_to_model(torch.from_numpy(np.stack([data.load(i)[0] for i in idx])).permute(0, 3, 1, 2))
        rec, shape = roundtrip(model.vae, x)
        p = psnr(rec, x)
        summary[str(ck)] = {"latent_shape": list(shape), "psnr_mean": round(float(p.mean()), 2),
                            "psnr_median": round(float(p.median()), 2), "n_images": len(idx),
                            "image_size": cfg.model.image_size}
        if rows is None:
            rows = [[label(tensor_to_image(x[k]), "input")] for k in range(min(6, len(x)))]
        for k, row in enumerate(rows):
            row.append(label(tensor_to_image(rec[k]), "x".join(map(str, shape[1:]))))
    args.results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.results / "autoencoder_mtd.json", summary)
    write_png(args.results / "autoencoder_mtd.png", grid(rows))
    table = "\n".join(f"| `{k}` | {v['latent_shape']} | {v['psnr_mean']:.2f} | {v['psnr_median']:.2f} |"
                      for k, v in summary.items())
    cmd = " ".join(["python benchmarks/autoencoder_mtd.py", "--data", str(args.data), "--every", str(args.every),
                    *map(str, args.checkpoints)])
    (args.results / "autoencoder_mtd.md").write_text(f"""# Autoencoder round trip on {args.data.name}

    {cmd}

{cpu_name()}, 1 torch thread, no GPU. Every {args.every}th test image of `{args.data}` (all types), encoded
(posterior mean) and decoded at the run's model size; PSNR with images in [-1, 1].

| checkpoint | latent (C, h, w) | PSNR mean (dB) | PSNR median (dB) |
|---|---|---|---|
{table}

![inputs and round trips](autoencoder_mtd.png)

Columns: input, then each checkpoint's round trip in the order above.
""")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
