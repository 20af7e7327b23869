"""What one DualAnoDiff denoising step costs: time and dispatched operators of its network calls.

    python benchmarks/dual_step.py --model runs/dualanodiff_mtd_gpu_break --batch 1,8 --threads 2

writes benchmarks/results/dual_step_<machine>.md and dual_step_<machine>.json (`--results` for another
folder). A step of `edgeinspect generate dualanodiff` makes one dual UNet call (both branches, their
BCM backgrounds, and under classifier-free guidance the unconditional copies, all as one batch) and,
with sampling.keep_background, one decoder call for the part's mask. Per pair batch size (`--batch`),
with the run's own sampling settings (`--set` overrides them, e.g. sampling.guidance_scale=1):

* median, p10 and p90 ms of the dual UNet call and of the decoder call, `--warmup` untimed calls
  first, then `--repeats` timed ones (torch, eager; CUDA synchronised around each call);
* ATen operators dispatched per call (torch.profiler, top-level ATen ops, i.e. those not called
  from another ATen op): a small UNet's step on a GPU costs about one kernel launch per operator,
  so this count, not the FLOPs, bounds its speed there.

JSON: machine, device, settings, command, and per batch size (by_batch.<n>): unet_ms, decoder_ms
({p50, p10, p90}), step_ms_p50 (unet + decoder medians), aten_ops_unet, aten_ops_decoder,
aten_ops_per_step, rows_per_unet_call.

Timings taken while other work loads the machine are not representative: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edgeinspect.core.atomic import write_text_atomic
from edgeinspect.evaluation.machine import cpu_name, gpu_name, logical_cpus, slug

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def aten_ops(fn: Callable[[], Any]) -> int:
    """Top-level ATen operators one call of `fn` dispatches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """p50 / p10 / p90 milliseconds of `fn` over `repeats` calls after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    p10, p50, p90 = np.percentile(times, [10, 50, 90])
    return {"p50": float(p50), "p10": float(p10), "p90": float(p90)}


def measure(cfg, model, batches: list[int], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """Per pair batch size: the step's network calls timed and their operators counted (see the module doc)."""
    s = cfg.sampling
    model = model.to(device).eval()
    nets = model.role_modules()
    unet = nets["dual_unet" if cfg.bcm.enabled else "dual_unet_plain"]
    decoder = nets["vae_decoder"]
    copies = 1 if s.guidance_scale == 1.0 else 2
    latent = (cfg.model.vae.latent_channels, cfg.model.latent_size, cfg.model.latent_size)
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        ctx = model.context(cfg.prompts.whole_prompt, 1).to(device)
        for n in batches:
            rows = copies * n
            z = torch.randn((rows, *latent), generator=g).to(device)
            inputs = {"sample_whole": z, "sample_part": z.flip(0), "timestep": torch.full((rows,), 500.0, device=device),
                      "ctx_whole": ctx.expand(rows, *ctx.shape[1:]), "ctx_part": ctx.expand(rows, *ctx.shape[1:])}
            if cfg.bcm.enabled:
                inputs["background"] = z.roll(1, 0)
            z_part = z[:n]

            def call_unet() -> Any:
                return unet(**inputs)

            def call_decoder() -> Any:
                return decoder(z_part)

            entry: dict[str, Any] = {"rows_per_unet_call": rows * (3 if cfg.bcm.enabled else 2),
                                     "unet_ms": timed(call_unet, device, warmup, repeats),
                                     "aten_ops_unet": aten_ops(call_unet)}
            if s.keep_background:
                entry["decoder_ms"] = timed(call_decoder, device, warmup, repeats)
                entry["aten_ops_decoder"] = aten_ops(call_decoder)
            entry["step_ms_p50"] = entry["unet_ms"]["p50"] + entry.get("decoder_ms", {}).get("p50", 0.0)
            entry["aten_ops_per_step"] = entry["aten_ops_unet"] + entry.get("aten_ops_decoder", 0)
            out[str(n)] = entry
    return out


def markdown(res: dict[str, Any]) -> str:
    st = res["settings"]
    m = res["machine"]
    lines = [f"# DualAnoDiff denoising step: {m['slug']}", "", f"Command: `{res['command']}`", "",
             f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs)" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
             + f"; device {res['device']}, torch {st['torch']}, {st['threads']} threads; {res['date']}", "",
             f"Model: `{st['model']}` ({st['image_size']} px, latents {st['latent']}, BCM {st['bcm']}, LoRA on "
             f"{', '.join(st['lora_targets'])}), guidance scale {st['guidance_scale']}, keep_background "
             f"{st['keep_background']}; {st['warmup']} untimed then {st['repeats']} timed calls per row.", "",
             "| pairs | rows per UNet call | UNet ms p50 (p10-p90) | decoder ms p50 | step ms p50 | ms per pair-step | "
             "ATen ops: UNet | decoder | step |", "|---|---|---|---|---|---|---|---|---|"]
    for n, e in res["by_batch"].items():
        u, d = e["unet_ms"], e.get("decoder_ms")
        cells = [n, e["rows_per_unet_call"], f"{u['p50']:.1f} ({u['p10']:.1f}-{u['p90']:.1f})",
                 f"{d['p50']:.1f}" if d else "-", f"{e['step_ms_p50']:.1f}", f"{e['step_ms_p50'] / int(n):.1f}",
                 e["aten_ops_unet"], e.get("aten_ops_decoder", "-"), e["aten_ops_per_step"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "ATen ops: top-level ATen operators dispatched per call (torch.profiler); on a GPU each is about "
              "one kernel launch, so a step of this small UNet is bound by their count, not by its FLOPs.", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    lines += [f"Numbers: `{res['json_file']}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="DualAnoDiff run or checkpoint folder")
    ap.add_argument("--batch", default="1,8", help="comma-separated pair batch sizes (default 1,8)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="sampling override, e.g. sampling.guidance_scale=1 (repeatable)")
    ap.add_argument("--note", help="a paragraph for the report")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for dual_step_<machine>.md/.json")
    ap.add_argument("--machine", help="machine slug for the file names (default cpu<N> or the GPU name)")
    args = ap.parse_args(argv)

    from edgeinspect.config import parse_overrides
    from edgeinspect.training.dualanodiff import load_dualanodiff

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        ap.error("--batch takes positive integers, e.g. 1,8")
    cfg, model, _ = load_dualanodiff(args.model, parse_overrides(args.set))
    by_batch = measure(cfg, model, batches, device, args.warmup, args.repeats)
    gpu = gpu_name() if device.type == "cuda" else None
    machine = args.machine or (slug(gpu) if gpu else f"cpu{logical_cpus()}")
    out_json = args.results / f"dual_step_{machine}.json"
    res = {
        "machine": {"slug": machine, "cpu": cpu_name(), "logical_cpus": logical_cpus(), "gpu": gpu},
        "device": str(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/dual_step.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "settings": {"model": str(args.model), "image_size": cfg.model.image_size,
                     "latent": [cfg.model.vae.latent_channels, cfg.model.latent_size, cfg.model.latent_size],
                     "bcm": cfg.bcm.enabled, "lora_targets": list(cfg.lora.target_modules),
                     "guidance_scale": cfg.sampling.guidance_scale, "keep_background": cfg.sampling.keep_background,
                     "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats,
                     "torch": torch.__version__},
        "note": args.note,
        "by_batch": by_batch,
        "json_file": out_json.name,
    }
    write_text_atomic(out_json, json.dumps(res, indent=1) + "\n")
    write_text_atomic(args.results / f"dual_step_{machine}.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
