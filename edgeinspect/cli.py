"""`edgeinspect <verb>`: train, test, predict, glad-threshold, generate, export, calibrate, serve, client."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeinspect.config import ConfigError, load_config, parse_overrides
from edgeinspect.calibration.cli import add_calibrate_parser
from edgeinspect.export.cli import add_export_parser
from edgeinspect.generate_cli import add_generate_parser
from edgeinspect.serve_cli import add_serve_parsers


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set inference.steps=20 (repeatable)")


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads (default: the run's train.threads, else all cores)")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.method, args.preset, args.overrides)
    if args.data is not None:
        cfg.train.data_root = Path(args.data)
    if args.method == "diad":
        from edgeinspect.training.diad import train_diad

        ckpt = train_diad(cfg, args.run, resume=args.resume, progress=not args.quiet)
    elif args.method == "glad":
        from edgeinspect.training.glad import train_glad

        ckpt = train_glad(cfg, args.run, resume=args.resume, progress=not args.quiet)
    elif args.method == "adabldm":
        from edgeinspect.training.adabldm import train_adabldm

        ckpt = train_adabldm(cfg, args.run, resume=args.resume, progress=not args.quiet)
    elif args.method == "dualanodiff":
        from edgeinspect.training.dualanodiff import train_dualanodiff

        ckpt = train_dualanodiff(cfg, args.run, resume=args.resume, progress=not args.quiet)
    else:  # pragma: no cover - argparse restricts the choices
        raise ConfigError(f"unknown method {args.method}")
    print(f"trained: {ckpt}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from edgeinspect.evaluate import method_of

    if method_of(args.model) == "glad":
        from edgeinspect.evaluate_glad import evaluate_glad as evaluate
    else:
        from edgeinspect.evaluate import evaluate_diad as evaluate

    overrides = parse_overrides(args.overrides)
    result = evaluate(args.model, args.data, out_json=args.out, overrides=overrides,
                      exclude_file=args.exclude, progress=not args.quiet,
                      overlays_dir=args.overlays, max_overlays=args.max_overlays, threads=args.threads)
    print(json.dumps(result["metrics"], indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from edgeinspect.evaluate import method_of

    if method_of(args.model) == "glad":
        from edgeinspect.evaluate_glad import predict_glad as predict
    else:
        from edgeinspect.evaluate import predict_diad as predict

    overrides = parse_overrides(args.overrides)
    rows = predict(args.model, args.images, args.out, overrides=overrides, threshold=args.threshold,
                   threads=args.threads)
    for r in rows:
        verdict = "" if r["verdict"] is None else f"  {r['verdict']}"
        print(f"{r['score']:.5f}{verdict}  {r['image']} -> {r['overlay']}")
    return 0


def cmd_glad_threshold(args: argparse.Namespace) -> int:
    from edgeinspect.evaluate_glad import glad_threshold

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
    p.add_argument("--model", type=Path, required=True, help="run folder or checkpoint folder")
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
    p.add_argument("--model", type=Path, required=True, help="run folder or checkpoint folder")
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--out", type=Path, required=True, help="folder for overlay PNGs and scores.json")
    p.add_argument("--threshold", type=float, help="image-score threshold for an OK/NG verdict")
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
