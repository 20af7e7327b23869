"""Writing the deployable bundle: ONNX graphs (fp32 and fp16), prompt context(s), payload tensors,
settings, config and a manifest with every file's sha256, written atomically (a temporary folder
renamed into place).

The layout and the checks made on load are described in `edgeinspect.runtime.bundle_loading`.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import edgeinspect
from edgeinspect.config import BANK_REFERENCES, REFERENCES, dump_config
from edgeinspect.core.atomic import fsync_path, write_json_atomic
from edgeinspect.core.runs import resolve_checkpoint, run_method
from edgeinspect.export.adabldm import adabldm_bundle_parts
from edgeinspect.export.dualanodiff import dualanodiff_bundle_parts
from edgeinspect.export import fp16
from edgeinspect.export.glad import glad_method_settings
from edgeinspect.export.methods import EXPORTABLE_METHODS, build_role_exports
from edgeinspect.export.onnx import DEFAULT_OPSET, ExportError, check_parity, export_onnx, parity_report
from edgeinspect.export.roles import ExportContext, RoleExport
from edgeinspect.models.features import build_features
from edgeinspect.runtime.bundle_loading import (
    BUNDLE_FORMAT,
    MANIFEST,
    PRECISIONS,
    SCHEMA_VERSION,
    BundleError,
    NetworkEntry,
    sha256_file,
)
from edgeinspect.runtime.bank import BANK_FILE, BANK_PAYLOAD
from edgeinspect.runtime.bundle_update import finalize_manifest
from edgeinspect.runtime.tensorrt_engines import build_bundle_engines, require_engine_support
from edgeinspect.runtime.torch_backend import load_diad, load_glad
from edgeinspect.training.adabldm import load_adabldm
from edgeinspect.training.dualanodiff import load_dualanodiff


def package_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import timm

    return {"edgeinspect": edgeinspect.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        fsync_path(p)
    fsync_path(root)


def _progress(items: Sequence[str], enabled: bool, desc: str):
    if not enabled:
        return items
    return tqdm(items, desc=desc, unit="net")


def _on_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself when it lives on the CPU, else a CPU copy: export traces and checks parity on the
    CPU, and a caller's module (e.g. a GPU pipeline's feature extractor) must stay where it is."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return module
    return copy.deepcopy(module).cpu()


def write_bundle(cfg: Any, model: torch.nn.Module, out_dir: str | Path, *, features: torch.nn.Module | None = None,
                 precision: Sequence[str] = ("fp32", "fp16"), opset: int = DEFAULT_OPSET,
                 exporter: str = "torchscript", roles: Sequence[str] | None = None, overwrite: bool = False,
                 source: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None,
                 parity_atol: float = 1e-4, parity_rtol: float = 1e-3, fp16_atol: float = 1e-2,
                 fp16_rtol: float = 5e-2, threads: int | None = None, progress: bool = False,
                 method_settings: dict[str, Any] | None = None, contexts: dict[str, torch.Tensor] | None = None,
                 payload: dict[str, dict[str, torch.Tensor]] | None = None,
                 role_options: dict[str, Any] | None = None) -> Path:
    """Export a loaded model to a bundle folder (see `export_bundle` for a run folder). `method_settings`:
    what the method's loop runs with beyond the config (GLAD: the resolved ADP threshold), stored as the
    manifest's `method_settings` and in settings.json.

    A generator's loop needs more than one prompt context and some tensors besides graphs: `contexts`
    (name -> (1, L, D); the first is also the bundle's `context`, else it is the embedding of
    train.prompt), `payload` (name -> tensors, written to <name>.safetensors) and `role_options`
    (passed to the role builders as ExportContext.extra, e.g. AdaBLDM's defect type)."""

    precision = tuple(dict.fromkeys(precision))
    bad = [p for p in precision if p not in PRECISIONS]
    if bad or "fp32" not in precision:
        raise ExportError(f"precision must include 'fp32' and may add 'fp16'; got {list(precision)}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise BundleError(f"bundle {out}: already exists (pass overwrite=True / --overwrite to replace it)")
    method = cfg.method
    model = _on_cpu(model).eval()
    if features is None and method in ("diad", "glad"):
        features = build_features(cfg)
        if cfg.features.weights is None:
            warnings.warn("the exported feature extractor has RANDOM weights (features.weights is null): its scores "
                          "match no other build of it", UserWarning, stacklevel=2)
    if features is not None:
        features = _on_cpu(features).eval()
    named = {k: v.detach().float().cpu().contiguous() for k, v in (contexts or {}).items()}
    if "context" in named:
        raise ExportError("a named context cannot be called 'context' (the key of the bundle's single context)")
    if named:
        context = next(iter(named.values()))
    else:
        prompt = cfg.train.prompt if cfg.train.prompt is not None else ""  # GLAD: as model_pipeline does
        with torch.no_grad():
            context = model.context(prompt).detach().float().cpu().contiguous()
    specs = build_role_exports(method, ExportContext(cfg, model, features, context, dict(role_options or {}), named),
                               list(roles) if roles else None)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "onnx").mkdir(parents=True)
    try:
        networks: dict[str, Any] = {}
        parity: dict[str, Any] = {}
        real_opset = opset
        for role in _progress(list(specs), progress, "export"):
            spec: RoleExport = specs[role]
            graph = export_onnx(spec.module, spec.inputs, tmp / "onnx" / f"{role}.onnx", spec.output_names,
                                spec.dynamic_axes, probe=spec.probe, opset=opset, exporter=exporter,
                                metadata={"role": role, "method": method})
            real_opset = graph.opset
            # at the export size and at the probe (another batch and size: the dynamic axes really work)
            err, scale = parity_report(spec.module, graph.path, [spec.inputs, spec.probe], spec.output_names,
                                       threads=threads)
            check_parity(err, scale, f"{role} (fp32)", parity_atol, parity_rtol)
            parity[role] = {"fp32": err, "scale": scale}
            files = {"fp32": f"onnx/{role}.onnx"}
            real = {"fp32": "fp32"}
            if "fp16" in precision:
                if spec.fp16:
                    samples = [{n: t.detach().cpu().numpy() for n, t in x.items()} for x in (spec.inputs, spec.probe)]
                    rep = fp16.convert_onnx_fp16(graph.path, tmp / "onnx" / f"{role}.fp16.onnx", samples,
                                            atol=fp16_atol, rtol=fp16_rtol, threads=threads)
                    files["fp16"], real["fp16"] = f"onnx/{role}.fp16.onnx", "fp16"
                    parity[role]["fp16_vs_fp32"] = rep.max_abs_error
                else:  # numerically fragile (the VAE): the fp16 variant uses the fp32 graph
                    files["fp16"], real["fp16"] = files["fp32"], "fp32"
            entry = NetworkEntry(role, graph.inputs, graph.outputs, files, real, spec.batch_multiplier, spec.pipeline)
            networks[role] = {**entry.to_json(), "external_data": graph.external_data, "notes": spec.notes}

        save_file({"context": context.clone(), **named}, str(tmp / "context.safetensors"))
        payload_files = {}
        for name, tensors in (payload or {}).items():
            if not name.isidentifier() or name == "context":
                raise ExportError(f"bad payload name {name!r} (an identifier other than 'context')")
            payload_files[name] = f"{name}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / payload_files[name]))
        config = dump_config(cfg)
        write_json_atomic(tmp / "config.json", config)
        settings = {k: config[k] for k in ("scheduler", "inference", "scoring", "sampling", "runtime") if k in config}
        scoring = getattr(cfg, "scoring", None)  # generators score nothing
        if scoring is not None:
            settings["feature_size"] = scoring.feature_size
        if method_settings is not None:
            settings["method_settings"] = method_settings
        write_json_atomic(tmp / "settings.json", settings)

        manifest = {
            "format": BUNDLE_FORMAT, "schema_version": SCHEMA_VERSION, "method": method,
            "preset": cfg.model.preset, "image_size": cfg.model.image_size, "latent_size": cfg.model.latent_size,
            "feature_size": (scoring.feature_size or cfg.model.image_size) if scoring is not None else None,
            "opset": real_opset,
            "exporter": exporter, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(), "source": source or {}, "precisions": list(precision),
            "context": {"file": "context.safetensors", "key": "context", "shape": list(context.shape)},
            "config": "config.json", "settings": "settings.json", "networks": networks,
            "parity": {"bound": {"fp32": [parity_atol, parity_rtol], "fp16": [fp16_atol, fp16_rtol]},
                       "max_abs_error": parity},
            "fp16": {"op_block_list": list(fp16.FP16_OP_BLOCK_LIST), "fp32_subgraphs": ["timestep"],
                     "keep_io_types": True} if "fp16" in precision else None,
            "calibration": calibration,
        }
        if method_settings is not None:
            manifest["method_settings"] = method_settings
        if named:
            manifest["contexts"] = {k: {"key": k, "shape": list(v.shape)} for k, v in named.items()}
        if payload_files:
            manifest["payload"] = payload_files
        write_json_atomic(tmp / MANIFEST, finalize_manifest(tmp, manifest))
        _fsync_tree(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _with_bank(cfg: Any, ckpt: Path, reference: str | None) -> tuple[Any, dict[str, torch.Tensor] | None]:
    """The detector's config with `reference` set (None: as it is) and its checkpoint's bank tensors (None
    without one; an error when the reference needs one)."""
    if reference is not None:
        if reference not in REFERENCES:
            raise ExportError(f"unknown scoring reference {reference!r} (choose from {', '.join(REFERENCES)})")
        cfg = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"reference": reference})})
    path = ckpt / BANK_FILE
    if not path.is_file():
        if cfg.scoring.reference in BANK_REFERENCES:
            raise ExportError(f"scoring.reference {cfg.scoring.reference!r} needs the normal-feature bank and "
                              f"{ckpt} has none: build it first with `edgeinspect bank --model {ckpt} --data DIR`")
        return cfg, None
    return cfg, load_file(str(path))


def export_bundle(run_dir: str | Path, out_dir: str | Path, precision: Sequence[str] = ("fp32", "fp16"), *,
                  features: torch.nn.Module | None = None, engines: bool = False,
                  engine_max_batch: int | None = None, overwrite: bool = False, defect_type: str | None = None,
                  data_root: str | Path | None = None, reference: str | None = None, **kwargs: Any) -> Path:
    """Export a trained run (or checkpoint folder) to a bundle; `engines=True` also builds the TensorRT
    engines into <bundle>/engines (only on a machine with a GPU and tensorrt: checked before exporting).
    AdaBLDM: one bundle per `defect_type` (may be left out when the run has one), its seed masks read
    from `data_root` (default: the run's train.data_root). DiAD/GLAD: the checkpoint's normal-feature bank
    (`edgeinspect bank`), when it has one, goes into the bundle as its payload "bank"; `reference` sets the
    bundle's scoring.reference (default: the run's). Other keyword arguments: see `write_bundle`."""
    if engines:
        require_engine_support()
    ckpt = resolve_checkpoint(run_dir)
    method = run_method(ckpt)
    if method not in EXPORTABLE_METHODS:
        raise ExportError(f"{run_dir} is a {method!r} run: only {list(EXPORTABLE_METHODS)} runs can be exported so "
                          "far (a method is added by registering its roles, see edgeinspect/export/methods.py)")
    if (defect_type is not None or data_root is not None) and method != "adabldm":
        raise ExportError(f"{run_dir} is a {method!r} run: a defect type and data folder are AdaBLDM export options")
    parts: dict[str, Any] = {}
    if method == "glad":
        cfg, model, extra = load_glad(run_dir)
        parts["method_settings"] = glad_method_settings(cfg, extra)
    elif method == "adabldm":
        cfg, model, _ = load_adabldm(ckpt)
        parts = adabldm_bundle_parts(cfg, model, ckpt, defect_type, data_root)
    elif method == "dualanodiff":
        cfg, model, extra = load_dualanodiff(ckpt)
        parts = dualanodiff_bundle_parts(cfg, model, extra)
    else:
        cfg, model = load_diad(run_dir)
    if method in ("diad", "glad"):
        cfg, bank = _with_bank(cfg, ckpt, reference)
        if bank is not None:
            parts["payload"] = {BANK_PAYLOAD: bank}
    elif reference is not None:
        raise ExportError(f"{run_dir} is a {method!r} run: a scoring reference is a detector (DiAD, GLAD) option")
    source = {"run": str(Path(run_dir).resolve()), "checkpoint": ckpt.name,
              "weights_sha256": sha256_file(ckpt / "model.safetensors")}
    out = write_bundle(cfg, model, out_dir, features=features, precision=precision, overwrite=overwrite,
                       source=source, **parts, **kwargs)
    if engines:
        build_bundle_engines(out, precision="fp16" if "fp16" in precision else "fp32", max_batch=engine_max_batch)
    return out
