"""`edgeinspect export`: a trained run -> a deployable bundle (ONNX fp32, optional fp16 and TensorRT engines)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeinspect.config import REFERENCES, ConfigError
from edgeinspect.core.runs import CheckpointError
from edgeinspect.export.bundle import export_bundle
from edgeinspect.export.fp16 import Fp16ConversionError
from edgeinspect.export.onnx import ExportError
from edgeinspect.runtime.bundle_loading import BundleError, load_bundle
from edgeinspect.runtime.tensorrt_engines import TensorRTUnavailableError


def cmd_export(args: argparse.Namespace) -> int:
    precision = ("fp32", "fp16") if args.fp16 else ("fp32",)
    try:
        out = export_bundle(args.model, args.out, precision, engines=args.engines, engine_max_batch=args.max_batch,
                            overwrite=args.overwrite, opset=args.opset, exporter=args.exporter,
                            threads=args.threads, progress=not args.quiet, defect_type=args.defect_type,
                            data_root=args.data, reference=args.reference)
    except (TensorRTUnavailableError, ExportError, Fp16ConversionError, BundleError, CheckpointError,
            ConfigError) as e:
        print(f"edgeinspect export: {e}", file=sys.stderr)
        return 2
    bundle = load_bundle(out)
    parity = bundle.manifest["parity"]["max_abs_error"]
    print(f"bundle: {out}  ({bundle.method}, preset {bundle.manifest['preset']}, precisions {bundle.precisions})")
    for role, entry in bundle.networks.items():
        errs = parity.get(role, {})
        fp32 = max(errs.get("fp32", {}).values(), default=0.0)
        fp16 = errs.get("fp16_vs_fp32")
        extra = f", fp16 vs fp32 {max(fp16.values()):.2e}" if fp16 else ""
        print(f"  {role:13s} {entry.files['fp32']:28s} max |torch - onnxruntime| {fp32:.2e}{extra}")
    if args.engines:
        print(f"  TensorRT engines: {out / 'engines'}")
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export a trained run to a deployable bundle (ONNX, optional fp16 and TensorRT engines)",
        description="Export every network of a trained run to ONNX (checked against torch), with the prompt "
                    "context, settings, config and a manifest of hashes, into one bundle folder.")
    p.add_argument("--model", type=Path, required=True, help="run folder or checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write (atomically)")
    p.add_argument("--fp16", action="store_true", help="also write fp16 variants (VAE and fragile ops stay fp32)")
    p.add_argument("--engines", action="store_true",
                   help="also build TensorRT engines into BUNDLE/engines (needs a GPU and edgeinspect[gpu])")
    p.add_argument("--max-batch", type=int, help="largest batch for the TensorRT profiles (default: inference.batch_size)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (dynamo needs onnxscript)")
    p.add_argument("--defect-type", help="AdaBLDM: the defect type to export (one bundle per type; default: the "
                                         "run's only type)")
    p.add_argument("--data", type=Path, help="AdaBLDM: data folder with the seed defects' masks (default: the run's)")
    p.add_argument("--reference", choices=REFERENCES,
                   help="DiAD/GLAD: the bundle's scoring.reference (default: the run's); bank and hybrid need the "
                        "checkpoint's normal-feature bank (edgeinspect bank), which is exported whenever it exists")
    p.add_argument("--threads", type=int, help="onnxruntime threads for the parity checks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)
    return p
