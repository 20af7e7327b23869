"""Autoencoder round-trip fidelity on a real MVTec-layout test split, against an honest baseline -> results/.

    python benchmarks/autoencoder_mtd.py --data ../shared/data/mtd --default pca \
        pca=runs/ae_mtd_edge resize=runs/resize/ae_mtd_edge

Each entry is NAME=PATH (a run folder or a checkpoint folder holding an autoencoder; a bare PATH is
named by itself). Every `--every`-th test image (all types) at the model size goes through encode
(posterior mean) and decode. Per autoencoder the report gives:

* PSNR on the whole image and inside the defect masks dilated by `--dilate` px (images in [-1, 1],
  peak-to-peak 2), each next to the *resize baseline that keeps as many values as the latent*: the
  grey image (channel mean: MTD's frames are grey, stored as three equal channels, so a grey value is
  the whole pixel) area-downscaled to s x s with s^2 = the latent's C*h*w, then bicubic-upscaled and
  repeated to three channels. A learnt code of that size should beat it;
* SSIM (grey, Gaussian window 11, sigma 1.5), encode and decode ms per image (batch 1, median of
  `--repeats`, `--threads` torch threads), and the training time and device of its autoencoder stage
  (state.json's train_seconds: optimisation steps only; wall: config.json to autoencoder-final);
* a per-type table (normals and each defect type) and a figure: per type one image, its round trip
  and |difference| x 4, and the same for the resize baseline.

Writes results/autoencoder_mtd.{md,json,png} (or `--name`); the JSON holds per entry `latent_shape`,
`psnr_mean`, `resize_psnr_mean`, `defect_psnr_mean`, `defect_resize_psnr_mean`, `ssim_mean`,
`anchor_psnr_mean` and `anchor_defect_psnr_mean` (anchored ones: the linear code alone),
`encode_ms`, `decode_ms`, `train_minutes`, `train_wall_minutes`, `train_device`, `per_type`, and a
top-level `default` object: the entry named by `--default` (the edge preset's base).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.data.mvtec import MVTecFolder, tensor_to_image, uint8_to_model
from edgeinspect.data.visualize import grid, label, write_png
from edgeinspect.evaluation.machine import cpu_name
from edgeinspect.models.diad import VAEDecoderNet, VAEEncoderNet
from edgeinspect.runtime.torch_backend import load_diad

RESULTS = Path(__file__).resolve().parent / "results"


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per image, for images in [-1, 1] (peak-to-peak 2); with a (N, H, W) mask, over its pixels only."""
    err = (a - b).pow(2).mean(dim=1)
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        m = mask.float()
        mse = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per image SSIM of the grey (channel-mean) images, rescaled to [0, 1]."""
    x, y = [(t.mean(dim=1, keepdim=True) + 1) / 2 for t in (a, b)]
    g = torch.exp(-((torch.arange(window) - window // 2).float() ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).view(1, 1, window, window)

    def blur(t):
        return F.conv2d(t, k)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def resize_baseline(x: torch.Tensor, values: int) -> torch.Tensor:
    """The grey image coded with `values` numbers (an s x s area downscale), bicubic back, 3 channels."""
    s = math.isqrt(values)
    if s * s != values:
        raise ValueError(f"a latent of {values} values has no square resize of the same size")
    small = F.adaptive_avg_pool2d(x.mean(dim=1, keepdim=True), s)
    up = F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False)
    return up.clamp(-1, 1).expand(-1, 3, -1, -1)


def dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    if px <= 0:
        return mask
    return F.max_pool2d(mask[:, None].float(), 2 * px + 1, stride=1, padding=px)[:, 0] > 0


@torch.no_grad()
def roundtrip(vae: torch.nn.Module, x: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, tuple[int, ...]]:
    enc, dec = VAEEncoderNet(vae).eval(), VAEDecoderNet(vae).eval()
    outs, shape = [], None
    for s in range(0, len(x), batch):
        z = enc(x[s:s + batch])
        shape = tuple(z.shape[1:])
        outs.append(dec(z).clamp(-1, 1))
    return torch.cat(outs), shape


@torch.no_grad()
def anchor_roundtrip(vae: torch.nn.Module, x: torch.Tensor, batch: int = 16) -> torch.Tensor | None:
    """An anchored autoencoder's linear code alone (no learnt residual); None for other autoencoders."""
    if not hasattr(vae, "anchor_only_encode"):
        return None
    return torch.cat([vae.anchor_only_decode(vae.anchor_only_encode(x[s:s + batch])).clamp(-1, 1)
                      for s in range(0, len(x), batch)])


@torch.no_grad()
def per_image_ms(vae: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    enc, dec = VAEEncoderNet(vae).eval(), VAEDecoderNet(vae).eval()
    one = x[:1]
    z = enc(one)
    dec(z)  # warm-up
    te, td = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        z = enc(one)
        t1 = time.perf_counter()
        dec(z)
        t2 = time.perf_counter()
        te.append(t1 - t0)
        td.append(t2 - t1)
    return 1000 * float(np.median(te)), 1000 * float(np.median(td))


def autoencoder_stage(path: Path) -> dict:
    """Training time and device of the autoencoder stage of the run that `path` is or belongs to."""
    run = path if (path / "checkpoints").is_dir() else path.parent.parent
    ck = run / "checkpoints" / "autoencoder-final"
    out = {"train_minutes": None, "train_wall_minutes": None, "train_device": None, "train_steps": None}
    if (ck / "state.json").is_file():
        state = json.loads((ck / "state.json").read_text())
        out["train_minutes"] = round(state["train_seconds"] / 60, 1)
    cfg_file = run / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        t = cfg.get("train", {})
        device = t.get("device", "cpu")
        out["train_device"] = f"{device} ({t.get('threads') or 'all'} threads)" if device == "cpu" else device
        out["train_steps"] = t.get("autoencoder_steps")
        if (ck / "state.json").is_file():
            wall = round(((ck / "state.json").stat().st_mtime - cfg_file.stat().st_mtime) / 60, 1)
            # config.json is rewritten on a resume (or by hand): then it no longer marks the start
            out["train_wall_minutes"] = wall if out["train_minutes"] is None or wall >= out["train_minutes"] else None
    return out


def diff_image(a: torch.Tensor, b: torch.Tensor, gain: float = 4.0) -> np.ndarray:
    d = ((a - b).abs().mean(dim=0) / 2 * gain).clamp(0, 1)
    return np.repeat((d.numpy() * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("entries", nargs="+", help="NAME=PATH or PATH: run or checkpoint folders")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--dilate", type=int, default=3, help="px the defect masks are dilated by")
    ap.add_argument("--default", help="the entry that is the edge preset's base (default: the first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--name", default="autoencoder_mtd")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--notes-file", type=Path, help="a markdown file appended to the report (findings)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    entries = [(e.split("=", 1) if "=" in e else (e, e)) for e in args.entries]
    default = args.default or entries[0][0]
    if default not in dict(entries):
        ap.error(f"--default {default!r} names no entry")

    summary: dict[str, dict] = {}
    x = masks = types = None
    figure_rows: list[list[np.ndarray]] = []
    for name, path in entries:
        cfg, model = load_diad(Path(path))
        if x is None:
            data = MVTecFolder(args.data, "test", cfg.model.image_size)
            idx = list(range(0, len(data), args.every))
            imgs, ms = zip(*(data.load(i) for i in idx))
            x = uint8_to_model(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2))
            masks = dilate(torch.from_numpy(np.stack(ms)), args.dilate)
            types = [data.samples[i].defect_type for i in idx]
            shown = {t: types.index(t) for t in dict.fromkeys(types)}
            figure_rows = [[label(tensor_to_image(x[k]), f"{t} input")] for t, k in shown.items()]
        elif cfg.model.image_size != x.shape[-1]:
            ap.error(f"{path}: model size {cfg.model.image_size}, but the first entry's is {x.shape[-1]}")
        rec, shape = roundtrip(model.vae, x)
        base = resize_baseline(x, int(np.prod(shape)))
        defect = masks.flatten(1).any(1)
        p, pb = psnr(rec, x), psnr(base, x)
        pd, pbd = psnr(rec[defect], x[defect], masks[defect]), psnr(base[defect], x[defect], masks[defect])
        sim, simb = ssim(rec, x), ssim(base, x)
        alone = anchor_roundtrip(model.vae, x)
        anchor_psnr = {} if alone is None else {
            "anchor_psnr_mean": round(float(psnr(alone, x).mean()), 2),
            "anchor_defect_psnr_mean": round(float(psnr(alone[defect], x[defect], masks[defect]).mean()), 2)}
        enc_ms, dec_ms = per_image_ms(model.vae, x, args.repeats)
        per_type = {}
        for t in dict.fromkeys(types):
            sel = torch.tensor([tt == t for tt in types])
            row = {"n": int(sel.sum()), "psnr": round(float(p[sel].mean()), 2),
                   "resize_psnr": round(float(pb[sel].mean()), 2)}
            if t != "good":
                dsel = sel[defect]
                row["defect_psnr"] = round(float(pd[dsel].mean()), 2)
                row["defect_resize_psnr"] = round(float(pbd[dsel].mean()), 2)
            per_type[t] = row
        summary[name] = {
            "path": str(path), "latent_shape": list(shape), "latent_values": int(np.prod(shape)),
            "autoencoder": (f"anchored {cfg.model.vae.anchor}" + (" grey" if cfg.model.vae.grey else "")
                            if cfg.model.vae.kind == "anchored" else cfg.model.vae.kind),
            **anchor_psnr,
            "psnr_mean": round(float(p.mean()), 2), "resize_psnr_mean": round(float(pb.mean()), 2),
            "defect_psnr_mean": round(float(pd.mean()), 2), "defect_resize_psnr_mean": round(float(pbd.mean()), 2),
            "ssim_mean": round(float(sim.mean()), 4), "resize_ssim_mean": round(float(simb.mean()), 4),
            "encode_ms": round(enc_ms, 2), "decode_ms": round(dec_ms, 2),
            "parameters": sum(q.numel() for q in model.vae.parameters()),
            "n_images": len(x), "n_defect_images": int(defect.sum()), "image_size": cfg.model.image_size,
            **autoencoder_stage(Path(path)), "per_type": per_type,
        }
        for row, k in zip(figure_rows, shown.values()):
            row += [label(tensor_to_image(rec[k]), f"{name}"), label(diff_image(rec[k], x[k]), "|diff| x4")]
        if name == default:
            for row, k in zip(figure_rows, shown.values()):
                row += [label(tensor_to_image(base[k]), f"resize {math.isqrt(int(np.prod(shape)))}px"),
                        label(diff_image(base[k], x[k]), "|diff| x4")]

    d = summary[default]
    result = {"default": {k: d[k] for k in ("psnr_mean", "resize_psnr_mean", "defect_psnr_mean",
                                             "defect_resize_psnr_mean", "latent_shape", "train_minutes",
                                             "train_device")} | {"name": default},
              "autoencoders": summary,
              "settings": {"data": str(args.data), "every": args.every, "dilate_px": args.dilate,
                           "threads": args.threads, "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs",
                           "python": platform.python_version(), "torch": torch.__version__}}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.results / f"{args.name}.json", result)
    write_png(args.results / f"{args.name}.png", grid(figure_rows))
    cmd = " ".join(["python benchmarks/autoencoder_mtd.py", "--data", str(args.data), "--every", str(args.every),
                    "--default", default, "--threads", str(args.threads),
                    *(["--notes-file", str(args.notes_file)] if args.notes_file else []),
                    *(f"{n}={pth}" if n != pth else pth for n, pth in entries)])

    def fmt(v):
        return "-" if v is None else str(v)

    table = "\n".join(
        f"| {n} | {v['autoencoder']} | {'x'.join(map(str, v['latent_shape']))} | **{v['psnr_mean']:.2f}** | "
        f"{v['resize_psnr_mean']:.2f} | {v['psnr_mean'] - v['resize_psnr_mean']:+.2f} | "
        f"**{v['defect_psnr_mean']:.2f}** | {v['defect_resize_psnr_mean']:.2f} | "
        f"{v['defect_psnr_mean'] - v['defect_resize_psnr_mean']:+.2f} | "
        f"{fmt(v.get('anchor_psnr_mean'))} / {fmt(v.get('anchor_defect_psnr_mean'))} | {v['ssim_mean']:.3f} | "
        f"{v['encode_ms']:.1f} / {v['decode_ms']:.1f} | {fmt(v['train_steps'])} | {fmt(v['train_minutes'])} "
        f"({fmt(v['train_wall_minutes'])}) | {fmt(v['train_device'])} |"
        for n, v in summary.items())
    type_rows = "\n".join(
        f"| {n} | {t} | {r['n']} | {r['psnr']:.2f} | {r['resize_psnr']:.2f} | "
        f"{fmt(r.get('defect_psnr'))} | {fmt(r.get('defect_resize_psnr'))} |"
        for n, v in summary.items() for t, r in v["per_type"].items())
    text = f"""# Autoencoder round trip on {args.data.name}: against the equal-size resize

    {cmd}

{cpu_name()}, {args.threads} torch threads, no GPU. Every {args.every}th test image of `{args.data}` ({len(x)}
images, {int(masks.flatten(1).any(1).sum())} with defects), encoded (posterior mean) and decoded at
{x.shape[-1]} px. PSNR with images in [-1, 1]; "defect" = inside the ground-truth masks dilated by {args.dilate} px.
The resize baseline codes the grey image (MTD's three channels are equal) with as many values as the
latent: area downscale to s x s (s^2 = C*h*w), bicubic upscale. Default (the edge preset's base): **{default}**.

| autoencoder | kind | latent | PSNR | resize | gain | defect PSNR | resize | gain | anchor alone | SSIM | enc / dec ms | steps | train min (wall) | device |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{table}

Anchor alone: an anchored autoencoder's linear code without its learnt residuals (PSNR / defect PSNR).
Train minutes: the autoencoder stage's optimisation steps (state.json); wall: from the run's start to
its autoencoder-final checkpoint (data loading and checkpoints included). Encode/decode: one image,
batch 1, median of {args.repeats}.

## Per type

| autoencoder | type | images | PSNR | resize | defect PSNR | resize |
|---|---|---|---|---|---|---|
{type_rows}

![round trips](./{args.name}.png)

Rows: one image per type. Columns: input, then per autoencoder its round trip and |difference| x 4
(white = an error of half the range), and for the default the resize baseline and its difference.
{args.notes_file.read_text() if args.notes_file else ""}
"""
    (args.results / f"{args.name}.md").write_text(text)
    print(json.dumps(result["default"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
