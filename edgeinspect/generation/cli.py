"""`edgeinspect generate <method>`: synthetic defects (image + mask pairs and a JSON index).

From a trained run (`--model`, PyTorch) or an exported bundle (`--bundle`, the bundle's backend for
the sampling loop; AdaBLDM's decoder adaptation stays in PyTorch with the bundle's decoder weights).
Resumable: rerun the same command into the same --out folder and it continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeinspect.config import parse_overrides
from edgeinspect.runtime.bundle_loading import BundleError
from edgeinspect.generation.adabldm import generate_adabldm
from edgeinspect.generation.adabldm_bundle import generate_adabldm_bundle
from edgeinspect.generation.dualanodiff import generate_dualanodiff
from edgeinspect.generation.dualanodiff_bundle import generate_dualanodiff_bundle
from edgeinspect.generation.writer import GenerationError, load_index


def cmd_generate(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    source = args.bundle if args.bundle is not None else args.model
    try:
        if args.method == "adabldm":
            run = generate_adabldm_bundle if args.bundle is not None else generate_adabldm
            out = run(source, args.out, args.per_type, data_root=args.data, defect_types=args.types,
                      overrides=overrides, progress=not args.quiet)
        else:
            run_dual = generate_dualanodiff_bundle if args.bundle is not None else generate_dualanodiff
            out = run_dual(source, args.out, args.per_type, data_root=args.data, overrides=overrides,
                           progress=not args.quiet)
    except (GenerationError, BundleError) as e:
        print(f"edgeinspect: {e}", file=sys.stderr)
        return 2
    index = load_index(out)
    print(f"generated: {len(index['items'])} images in {out} (index: {Path(out) / 'index.json'})")
    return 0


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate defect images with masks (resumable)")
    p.add_argument("method", choices=["adabldm", "dualanodiff"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="trained run folder or checkpoint folder (PyTorch)")
    src.add_argument("--bundle", type=Path, help="exported bundle folder (its backend runs the loop)")
    p.add_argument("--out", type=Path, required=True, help="output folder (images/, masks/, index.json)")
    p.add_argument("--per-type", type=int, default=200,
                   help="images per defect type (AdaBLDM) / images of the run's defect type (DualAnoDiff)")
    p.add_argument("--data", type=Path, help="MVTec-layout folder with the normal images (default: the run's)")
    p.add_argument("--types", nargs="+", help="AdaBLDM: defect types to generate (default: all the model has)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sampling setting, e.g. --set sampling.adapt_steps=50 (repeatable)")
    p.set_defaults(func=cmd_generate)
