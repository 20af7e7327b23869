"""`edgeinspect <verb>`: train, test, predict, glad-threshold, generate, export, calibrate, serve, client."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeinspect.calibration.bank import finish_training_bank
from edgeinspect.calibration.cli import add_bank_parser, add_calibrate_parser
from edgeinspect.config import ConfigError, load_config, parse_overrides
from edgeinspect.evaluation.commands import evaluate_detector, predict_detector
from edgeinspect.evaluation.glad import glad_threshold
from edgeinspect.export.cli import add_export_parser
from edgeinspect.generation.cli import add_generate_parser
from edgeinspect.runtime.backends import BACKENDS
from edgeinspect.runtime.daemon.cli import add_serve_parsers
from edgeinspect.training.adabldm import train_adabldm
from edgeinspect.training.diad import train_diad
from edgeinspect.training.dualanodiff import train_dualanodiff
from edgeinspect.training.glad import train_glad

TRAINERS = {"diad": train_diad, "glad": train_glad, "adabldm": train_adabldm, "dualanodiff": train_dualanodiff}


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set inference.steps=20 (repeatable)")


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _add_detector(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="run folder or checkpoint folder (torch backend)")
    which.add_argument("--bundle", type=Path, help="bundle folder (edgeinspect export): onnxruntime or tensorrt")
    p.add_argument("--backend", choices=BACKENDS,
                   help="torch (with --model, the default there) or onnxruntime/tensorrt (with --bundle; default "
                        "onnxruntime)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="the bundle's graphs to run (default fp32)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads (default: the run's train.threads, else all cores)")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.method, args.preset, args.overrides)
    if args.data is not None:
        cfg.train.data_root = Path(args.data)
    ckpt = TRAINERS[args.method](cfg, args.run, resume=args.resume, progress=not args.quiet)
    if args.method in ("diad", "glad"):
        finish_training_bank(cfg, ckpt, progress=not args.quiet)
    print(f"trained: {ckpt}")
    return 0


def _detector_source(args: argparse.Namespace) -> dict:
    """The detector options `test` and `predict` share: a run folder (torch) or a bundle on a backend."""
    if args.model is not None and args.backend not in (None, "torch"):
        raise ConfigError(f"--model runs on the torch backend; for --backend {args.backend} export the run to a "
                          f"bundle (edgeinspect export --model {args.model} --out BUNDLE) and pass --bundle BUNDLE")
    backend = args.backend or ("torch" if args.model is not None else "onnxruntime")
    return {"model": args.model, "bundle": args.bundle, "backend": backend, "precision": args.precision}


def cmd_test(args: argparse.Namespace) -> int:
    src = _detector_source(args)
    result = evaluate_detector(src.pop("model"), args.data, out_json=args.out,
                               overrides=parse_overrides(args.overrides), exclude_file=args.exclude,
                               progress=not args.quiet, overlays_dir=args.overlays, max_overlays=args.max_overlays,
                               threads=args.threads, **src)
    print(json.dumps(result["metrics"], indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    src = _detector_source(args)
    rows = predict_detector(args.images, args.out, src.pop("model"), overrides=parse_overrides(args.overrides),
                            threshold=args.threshold, threads=args.threads, **src)
    for r in rows:
        verdict = "" if r["verdict"] is None else f"  {r['verdict']}"
        print(f"{r['score']:.5f}{verdict}  {r['image']} -> {r['overlay']}")
    return 0


def cmd_glad_threshold(args: argparse.Namespace) -> int:
    r = glad_threshold(args.model, args.data, overrides=parse_overrides(args.overrides), images=args.images,
                       percentile=args.percentile, margin=args.margin, out_json=args.out, threads=args.threads)
    print(json.dumps({k: v for k, v in r.items() if k not in ("set", "set_weight")}, indent=2))
    print(f"proposed ADP threshold {r['threshold']:.6g}; apply with: {r['set']}")
    print(f"proposed linear SAFF weight bounds [{r['weight_low']:.6g}, {r['weight_high']:.6g}]; apply with: "
          f"{r['set_weight']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgeinspect", description=__doc__)
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train a model (checkpointed; --resume continues after a kill)")
    p.add_argument("method", choices=["diad", "glad", "adabldm", "dualanodiff"])
    p.add_argument("--config", type=Path, help="YAML config (default: the preset alone)")
    p.add_argument("--preset", choices=["tiny", "edge", "sd15"], help="model preset (default: from the config, else edge)")
    p.add_argument("--data", type=Path, help="MVTec-layout category folder (overrides train.data_root)")
    p.add_argument("--run", type=Path, required=True, help="run folder for checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="score a test split and print image/pixel metrics")
    _add_detector(p)
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    p.add_argument("--out", type=Path, help="write metrics, per-image scores and latency here (JSON)")
    p.add_argument("--exclude", type=Path, help="text file of test images to leave out, one per line: a name, "
                   "<type>/<name> or a path (e.g. generator seeds)")
    p.add_argument("--overlays", type=Path, help="also write heat-map overlays into this folder")
    p.add_argument("--max-overlays", type=int, default=24)
    p.add_argument("--quiet", action="store_true")
    _add_overrides(p)
    _add_threads(p)
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("predict", help="score images and write heat-map overlays")
    _add_detector(p)
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--out", type=Path, required=True, help="folder for overlay PNGs and scores.json")
    p.add_argument("--threshold", type=float, help="image-score threshold for an OK/NG verdict (default: a "
                   "calibrated bundle's own)")
    _add_overrides(p)
    _add_threads(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("glad-threshold",
                       help="propose GLAD's ADP firing threshold and SAFF weight bounds from normal images")
    p.add_argument("--model", type=Path, required=True, help="GLAD run folder or checkpoint folder")
    p.add_argument("--data", type=Path, help="MVTec-layout category folder (default: the run's train.data_root); "
                   "its train/good normals are used")
    p.add_argument("--images", type=int, help="how many normals (spread evenly; default calibration.images, 0: all)")
    p.add_argument("--percentile", type=float, help="percentile of the per-frame maximum check scores")
    p.add_argument("--margin", type=float, help="factor applied to that percentile")
    p.add_argument("--out", type=Path, help="write the proposal and its statistics here (JSON)")
    _add_overrides(p)
    _add_threads(p)
    p.set_defaults(func=cmd_glad_threshold)
    add_generate_parser(sub)
    add_export_parser(sub)
    add_calibrate_parser(sub)
    add_bank_parser(sub)
    add_serve_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"edgeinspect: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nedgeinspect: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
