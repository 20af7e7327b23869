"""`edgeinspect generate adabldm --bundle DIR`: the AdaBLDM generation job from an exported bundle.

A workstation needs the bundle and a folder of normal images: Algorithm 1 runs on the bundle's
networks (the backend of its config's runtime section; a training run's "torch" means onnxruntime
here), Algorithm 2 in PyTorch on a decoder rebuilt from the bundle's architecture settings and
decoder weights, the placement from the bundle's seed masks. Planning, adaptation and writing are
`run_blended_job`'s, the same as from a run, so with the same settings and normals a bundle job
writes the images a run job writes, up to the backend's numerical differences.

A bundle holds one defect type (export/adabldm.py); its items are numbered and seeded as a run
job's with `defect_types=[that type]`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgeinspect.generation.adabldm import BlendedJob, run_blended_job
from edgeinspect.models.autoencoder import autoencoder_from_config
from edgeinspect.runtime.adaptation import LatentDecoder
from edgeinspect.runtime.blended import ROLES
from edgeinspect.runtime.bundle_loading import Bundle, BundleError, load_bundle
from edgeinspect.runtime.backends import generation_networks


def bundle_decoder(bundle: Bundle) -> LatentDecoder:
    """The original decoder (post_quant_conv + decoder) from the bundle's payload, for the adaptation."""
    settings = bundle.manifest["method_settings"]["decoder"]
    vae = autoencoder_from_config(settings["vae_config"])
    decoder = LatentDecoder.from_vae(vae)
    decoder.load_state_dict(bundle.payload("decoder"))
    if decoder.scaling_factor != settings["scaling_factor"]:
        raise BundleError(f"bundle {bundle.path}: the decoder's scaling factor {decoder.scaling_factor} differs from "
                          f"the recorded {settings['scaling_factor']}")
    return decoder.eval()


def generate_adabldm_bundle(bundle_dir: str | Path, out_dir: str | Path, n_per_type: int,
                            data_root: str | Path | None = None, defect_types: list[str] | None = None,
                            overrides: dict | None = None, progress: bool = True, keep_before: bool = True,
                            precision: str = "fp32") -> Path:
    """Generate n_per_type defects of the bundle's defect type into out_dir (resumable); returns out_dir.
    `overrides` may change sampling/foreground/runtime settings (not the networks); `data_root` is the
    folder whose train/ normals are edited (default: the exporting run's data folder)."""
    bundle = load_bundle(bundle_dir, overrides=overrides)
    if bundle.method != "adabldm":
        raise BundleError(f"bundle {bundle.path} is a {bundle.method!r} bundle, not an AdaBLDM one")
    cfg = bundle.config
    settings = bundle.manifest["method_settings"]
    dtype = settings["defect_type"]
    if defect_types and list(defect_types) != [dtype]:
        raise ValueError(f"bundle {bundle.path} holds the defect type {dtype!r} only (asked for {list(defect_types)}); "
                         "export a bundle per type with `edgeinspect export --defect-type TYPE`")
    root = data_root or cfg.train.data_root
    if root is None or not (Path(root) / "train").is_dir():
        raise ValueError(f"the normal images are read from DATA/train; {root} has none: pass the folder with --data")
    networks = generation_networks(bundle, ROLES, precision=precision)
    masks = bundle.payload("seed_masks")["masks"].bool().numpy()
    names = list(settings["seed_defects"])
    if len(names) != len(masks):
        raise BundleError(f"bundle {bundle.path}: {len(masks)} seed masks but {len(names)} seed names")
    job = BlendedJob(
        cfg, [dtype], lambda _type: networks, bundle_decoder(bundle).to(torch.device(cfg.runtime.device)),
        {dtype: settings["prompts"]["defect"]}, {dtype: bundle.contexts["defect"]}, bundle.contexts["empty"],
        {dtype: masks}, {dtype: names},
        {"bundle": str(bundle.path.resolve()), "backend": networks.name, "precision": precision})
    return run_blended_job(job, out_dir, n_per_type, Path(root), progress, keep_before)
