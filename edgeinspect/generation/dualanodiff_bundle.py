"""`edgeinspect generate dualanodiff --bundle DIR`: the DualAnoDiff generation job from an exported bundle.

The dual sampling loop runs on the bundle's networks (the backend of its config's runtime section; a
training run's "torch" means onnxruntime here) with the bundle's whole/part/empty prompt contexts;
outputs, records and resumption are `run_dual_job`'s, the same as from a run. With BCM the
backgrounds are normals of DATA/train/good, so a workstation needs the bundle and that folder.
"""

from __future__ import annotations

from pathlib import Path

from edgeinspect.generation.dualanodiff import run_dual_job
from edgeinspect.runtime.bundle_loading import BundleError, load_bundle
from edgeinspect.runtime.backends import generation_networks
from edgeinspect.runtime.dual import PromptContexts


def generate_dualanodiff_bundle(bundle_dir: str | Path, out_dir: str | Path, n: int, data_root: str | Path | None = None,
                                overrides: dict | None = None, progress: bool = True,
                                precision: str = "fp32") -> Path:
    """Generate (or complete) `n` pairs into `out_dir`; returns `out_dir`. `overrides` may change sampling
    and runtime settings (not the networks or prompts)."""
    bundle = load_bundle(bundle_dir, overrides=overrides)
    if bundle.method != "dualanodiff":
        raise BundleError(f"bundle {bundle.path} is a {bundle.method!r} bundle, not a DualAnoDiff one")
    cfg = bundle.config
    unet = "dual_unet" if cfg.bcm.enabled else "dual_unet_plain"
    networks = generation_networks(bundle, ("vae_encoder", unet, "vae_decoder"), precision=precision)
    c = bundle.contexts
    contexts = PromptContexts(c["whole"], c["part"], c["empty"])
    source = {"bundle": str(bundle.path.resolve()), "backend": networks.name, "precision": precision}
    return run_dual_job(cfg, networks, contexts, source, bundle.manifest["method_settings"]["defect_type"], out_dir,
                        n, data_root, progress)
