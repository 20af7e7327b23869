"""`edgeinspect calibrate`: thresholds and score normalisation from held-out images, stored in a bundle;
with --int8, first the INT8 (Q/DQ) graphs TensorRT builds int8 engines from, calibrated on the same images.
`edgeinspect bank`: the normal-feature bank of a run or a bundle, from the category's training normals."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from edgeinspect.calibration.bank import bank_bytes, build_run_bank, fit_bank, training_normals
from edgeinspect.calibration.calibrate import calibrate_bundle, select_normals
from edgeinspect.config import REFERENCES, ConfigError, frame_size, merge_config, parse_overrides
from edgeinspect.core.runs import CheckpointError
from edgeinspect.runtime.bank import BANK_PAYLOAD, BankError
from edgeinspect.runtime.bundle_loading import load_bundle
from edgeinspect.runtime.bundle_update import set_payload
from edgeinspect.runtime.detector import bundle_pipeline
from edgeinspect.calibration.qdq import quantize_bundle
from edgeinspect.data.batches import spread_indices
from edgeinspect.data.mvtec import DatasetError
from edgeinspect.runtime.bundle_loading import BundleError


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _print_int8(results: dict) -> None:
    for role, r in results.items():
        c, q = r["calibration"], r["quantization"]
        layers = ", ".join(f"{v['quantized']}/{v['total']} {k}" for k, v in q["layers"].items())
        err = r["vs_fp32"]["outputs"]
        worst = max(err.values(), key=lambda e: e["rel_rms"])
        print(f"  int8 {role:12s} {r['file']:26s} {r['status']} ({r['method']}, {c['items']} inputs from "
              f"{c['images']} images); int8 layers {layers}; vs fp32 rel. RMS error {worst['rel_rms']:.3g}, "
              f"correlation {worst['corr']:.4f}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    int8 = args.int8 is not None
    precision = args.precision or ("int8" if int8 else "fp32")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            if int8:
                if args.dry_run:
                    raise ValueError("--dry-run stores nothing and --int8 writes graphs into the bundle: use one")
                normals = select_normals(args.normals, args.limit)
                images = [normals[i] for i in spread_indices(len(normals), args.int8_images)]
                results = quantize_bundle(args.bundle, images, args.int8 or None, method=args.int8_method,
                                          threads=args.threads, progress=not args.quiet)
                print(f"bundle {args.bundle}: INT8 Q/DQ graphs from {len(images)} of the normal images")
                _print_int8(results)
            cal = calibrate_bundle(args.bundle, args.normals, args.defects, args.target_frr,
                                   precision=precision, threads=args.threads, batch_size=args.batch_size,
                                   pixel_rule=args.pixel_rule, verdict_from=args.verdict, limit=args.limit,
                                   progress=not args.quiet, store=not args.dry_run)
    except (BundleError, DatasetError, ValueError) as e:
        print(f"edgeinspect calibrate: {e}", file=sys.stderr)
        return 2
    for w in caught:
        if "RANDOM weights" not in str(w.message):
            print(f"warning: {w.message}", file=sys.stderr)
    img, norm, v = cal["image"], cal["normalization"], cal["verdict"]
    print(f"bundle {args.bundle}: calibrated on {img['n']} normal images"
          + (f" and {cal['data']['labelled']['n']} labelled images" if cal["data"]["labelled"] else "")
          + f", scored with the {precision} graphs"
          + (" (dry run: not stored)" if args.dry_run else ""))
    print(f"  normalisation  (s - {norm['median']:.6g}) / {norm['scale']:.6g}   [(s - median) / (p99 - median)]")
    print(f"  image @ FRR {img['target_frr']:g}  threshold {img['threshold']:.6g} (normalised "
          f"{img['normalized_threshold']:.4g}), {img['k']}-th of {img['n']} normal scores; achieved FRR "
          f"{img['achieved_frr']:.4g}, expected {img['expected_frr']:.4g}"
          + ("" if img["guaranteed"] else "  [too few normals for the guarantee]"))
    if "pixel" in cal:
        px = cal["pixel"]
        print(f"  pixel @ FRR     threshold {px['threshold']:.6g} ({px['rule'].split(':')[0]}); pixel FPR "
              f"{px['pixel_fpr']:.3g}, normal frames with a pixel over {px['frames_with_pixels_over']:.3g}")
    if "image_f1" in cal:
        f = cal["image_f1"]
        print(f"  image F1-opt    threshold {f['threshold']:.6g}: F1 {f['f1']:.4f} (P {f['precision']:.3f}, "
              f"R {f['recall']:.3f}), FRR on normals {f['achieved_frr']:.4g}; F1 at the FRR threshold "
              f"{img['f1_on_labelled']:.4f}")
    if "pixel_f1" in cal:
        f = cal["pixel_f1"]
        print(f"  pixel F1-opt    threshold {f['threshold']:.6g}: F1 {f['f1']:.4f} (P {f['precision']:.3f}, "
              f"R {f['recall']:.3f})")
    print(f"  verdict ({v['source']}): NG if score > {v['image_threshold']:.6g}; pixel threshold "
          f"{_fmt(v['pixel_threshold'])}")
    return 0


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate", help="fit thresholds and score normalisation from held-out images and store them in a bundle",
        description="Score held-out normal images (and optionally labelled or generated defects) through the "
                    "bundle's pipeline on onnxruntime; fit the image threshold at a target false-reject rate "
                    "(split-conformal rule: the ceil((n+1)(1-FRR))-th smallest normal score), the pixel threshold, "
                    "the score normalisation (s - median) / (p99 - median) of the normals, and with defects the "
                    "F1-optimal thresholds; store them in the bundle's calibration slot (hashes updated). With "
                    "--int8, first write INT8 (Q/DQ) graphs calibrated on the same images, then score with them: "
                    "TensorRT then builds int8 engines from the bundle (precision int8).")
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (edgeinspect export)")
    p.add_argument("--normals", type=Path, required=True,
                   help="folder of held-out normal images (not the training images; an MVTec category folder "
                        "gives its test/good)")
    p.add_argument("--defects", type=Path,
                   help="labelled defects: an MVTec-layout folder (test/<type> + ground_truth masks) or a JSON "
                        "index of {image, mask} pairs (generated defects, e.g. AdaBLDM/DualAnoDiff)")
    p.add_argument("--target-frr", type=float, default=0.01,
                   help="target false-reject rate on normal frames (default 0.01; needs >= ceil(1/FRR)-1 normals)")
    p.add_argument("--pixel-rule", choices=["map_max", "pixels"], default="map_max",
                   help="pixel threshold: map_max = a normal frame has any pixel over it with probability <= FRR "
                        "(default); pixels = a fraction FRR of normal pixels is over it")
    p.add_argument("--verdict", choices=["target_frr", "f1"], default="target_frr",
                   help="which image threshold decides OK/NG (f1 needs --defects)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                   help="graphs to score with (calibrate with the precision the line will run; default int8 with "
                        "--int8, else fp32; int8 runs the Q/DQ graphs, the roles without one in fp16, else fp32)")
    p.add_argument("--int8", nargs="*", metavar="ROLE",
                   help="first write INT8 Q/DQ graphs (onnx/int8/<role>-<hash>/, hashed in the manifest) for TensorRT "
                        "int8 engines, calibrated on the same normal images; roles default to the UNet, the VAE "
                        "encoder and the feature extractor (the VAE decoder stays fp16/fp32). Up-to-date graphs "
                        "are kept and the activation ranges are cached (BUNDLE/engines/int8)")
    p.add_argument("--int8-method", choices=["entropy", "percentile", "minmax"], default="entropy",
                   help="INT8 calibration method (default entropy)")
    p.add_argument("--int8-images", type=int, default=64,
                   help="use at most this many of the normal images for INT8 (spread evenly; default 64)")
    p.add_argument("--limit", type=int, help="use at most this many normal images (spread evenly)")
    p.add_argument("--batch-size", type=int, help="frames per pipeline call (default: inference.batch_size)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--dry-run", action="store_true", help="print the calibration, do not store it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)
    return p


def cmd_bank(args: argparse.Namespace) -> int:
    # the bank is built with the reconstruction reference: the bank and hybrid ones need the bank itself
    overrides = merge_config(parse_overrides(args.overrides), {"scoring": {"reference": "reconstruction"}})
    try:
        paths = training_normals(args.data)
        if args.model is not None:
            if args.reference is not None:
                raise ValueError("--reference sets a bundle's scoring.reference; for a run pass --set "
                                 "scoring.reference=... to test/predict, or --reference to export")
            where, bank, cfg = build_run_bank(args.model, args.data, overrides, progress=not args.quiet)
        else:
            pipe = bundle_pipeline(args.bundle, "onnxruntime", overrides=overrides, verdict=False,
                                   intra_op_threads=args.threads, references=("bank",))
            cfg = load_bundle(args.bundle, overrides=overrides).config
            bank = fit_bank(pipe, paths, frame_size(cfg.model.image_size, cfg.scoring, "bank"), cfg.inference.batch_size, progress=not args.quiet)
            set_payload(args.bundle, BANK_PAYLOAD, bank_bytes(bank),
                        None if args.reference is None else {"reference": args.reference})
            where = args.bundle / f"{BANK_PAYLOAD}.safetensors"
    except (BankError, BundleError, DatasetError, CheckpointError, ConfigError, ValueError) as e:
        print(f"edgeinspect bank: {e}", file=sys.stderr)
        return 2
    shapes = ", ".join("x".join(map(str, v.shape)) for v in bank.vectors)
    print(f"bank: {where}  ({len(paths)} training normals, {bank.info['held_out_images']} held out; per level "
          f"{shapes}; {bank.nbytes / 2**20:.2f} MiB)")
    if bank.scales is not None:
        print(f"  hybrid scales (p{cfg.scoring.bank.scale_percentile:g} on held-out normals): reconstruction "
              f"{bank.scales[0]:.6g}, bank {bank.scales[1]:.6g}")
    if args.bundle is not None:
        size = sum(f.stat().st_size for f in args.bundle.rglob("*") if f.is_file())
        print(f"  bundle {args.bundle}: {size / 2**20:.2f} MiB"
              + ("" if args.reference is None else f"; scoring.reference set to {args.reference!r} "
                                                    "(calibration cleared: calibrate again)"))
    return 0


def add_bank_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bank", help="build the normal-feature bank (scoring.reference bank / hybrid) of a run or a bundle",
        description="Extract the scoring features of a category's training normals (through the run's or the "
                    "bundle's own feature network), keep a greedy k-centre coreset of scoring.bank.size vectors per "
                    "layer, and measure the hybrid reference's scales on scoring.bank.scale_images held-out training "
                    "normals. A run: written to its checkpoint folder (bank.safetensors; `edgeinspect export` "
                    "carries it into the bundle). A bundle: stored as its payload 'bank' (hashed in the manifest).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="run folder or checkpoint folder (torch)")
    which.add_argument("--bundle", type=Path, help="bundle folder (onnxruntime)")
    p.add_argument("--data", type=Path, required=True,
                   help="training normals: an MVTec category folder (its train/good) or a folder of images")
    p.add_argument("--reference", choices=REFERENCES,
                   help="a bundle: also set its scoring.reference (clears its calibration: calibrate again)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scoring setting, e.g. --set scoring.bank.size=8192 (repeatable)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (a bundle)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bank)
    return p
