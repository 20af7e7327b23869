"""The one place a detector (DiAD or GLAD pipeline) is assembled, and its bundle side: a bundle on
onnxruntime or TensorRT. The run side (a trained run folder on torch: `run_pipeline`, `model_pipeline`,
`load_detector`) is `runtime.run_detector`, kept apart so that a process serving bundles imports no
torch models.

    bundle_pipeline(bundle, "onnxruntime")              # pipeline with the bundle's calibrated verdicts

Every path ends in `assemble_pipeline`: the method's loop over Networks, its DDIM schedule, settings and
post-processor. A GLAD pipeline runs with its category's settings and the ADP firing threshold and SAFF
weight bounds calibrated at the end of training (checkpoint state or the bundle's method_settings)
wherever the settings leave them unset.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeinspect.config import BANK_REFERENCES, GLADConfig, bank_image_levels
from edgeinspect.core.ddim import DDIM
from edgeinspect.core.networks import Networks
from edgeinspect.runtime.bank import BANK_PAYLOAD, NormalBank, bank_from_tensors
from edgeinspect.runtime.backends import bundle_networks
from edgeinspect.runtime.bundle_loading import (
    GENERATOR_ROLES,
    PIPELINE_ROLES,
    Bundle,
    BundleError,
    build_bundle_config,
    load_bundle,
)
from edgeinspect.runtime.diad import DiADPipeline
from edgeinspect.runtime.glad import GLADPipeline, usable_calibration
from edgeinspect.runtime.postprocess import PostProcessor

DETECTORS = tuple(PIPELINE_ROLES)
Pipeline = DiADPipeline | GLADPipeline


def assemble_pipeline(cfg: Any, networks: Networks, context: torch.Tensor, *, category: str | None = None,
                      adp_threshold: float | None = None,
                      weight_bounds: tuple[float | None, float | None] | None = None,
                      post: PostProcessor | None = None, bank: NormalBank | None = None) -> Pipeline:
    """The method's pipeline over `networks`. GLAD: cfg.inference with `category`'s overrides (default: the
    config's category); `adp_threshold` and `weight_bounds` are used where those settings leave them unset.
    `post`: the post-processor whose verdicts every result carries (None: results carry none). `bank`: the
    normal-feature bank (needed by scoring.reference bank and hybrid)."""
    schedule = DDIM(cfg.scheduler)
    image_levels = bank_image_levels(list(cfg.features.strides), cfg.scoring)
    if isinstance(cfg, GLADConfig):
        pipe: Pipeline = GLADPipeline(networks, context, schedule, cfg.inference.for_category(category or cfg.category),
                                      cfg.scoring, cfg.scoring.feature_size, threshold=adp_threshold,
                                      weight_bounds=weight_bounds, bank=bank, image_size=cfg.model.image_size,
                                      image_levels=image_levels)
    else:
        pipe = DiADPipeline(networks, context, schedule, cfg.inference, cfg.scoring, cfg.scoring.feature_size,
                            bank=bank, image_size=cfg.model.image_size, image_levels=image_levels)
    pipe.verdict = post
    return pipe



def for_calibration(cfg: GLADConfig) -> GLADConfig:
    """The config with the minmax SAFF weight and the reconstruction reference: calibration reads the check
    scores and maps up to the fire, which the weight (applied at the fire) cannot change, and a linear weight
    may lack its bounds until calibration has proposed them; the ADP check is the diffusion's whatever the
    frame is finally scored against, and a bank reference would need a bank a run may not have built yet."""
    return cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"weight_mode": "minmax"}),
                                  "scoring": cfg.scoring.model_copy(update={"reference": "reconstruction"})})


def bundle_pipeline(bundle: Bundle | str | Path, backend: str = "onnxruntime", *, precision: str = "fp32",
                    providers: Sequence[Any] | None = None, intra_op_threads: int | None = None,
                    overrides: dict[str, Any] | None = None, engine_cache_dir: str | Path | None = None,
                    max_batch: int | None = None, device: str | torch.device | None = None,
                    verdict: bool = True, memory_arena: bool = True, references: Sequence[str] = (),
                    image_rows: int | None = None) -> Pipeline:
    """The method's pipeline on a verified bundle. `overrides` may change inference and scoring settings
    (not the networks): e.g. {"inference": {"steps": 5}}. Only the networks its scoring.reference runs are
    loaded (`pipeline_roles`); `references`: the other references it will be switched to with `using`.
    memory_arena, image_rows: onnxruntime's memory settings (edgeinspect.runtime.ort_backend.ort_networks).

    Results carry `verdicts` ("OK"/"NG" per frame from the calibrated image threshold; None when the bundle
    is not calibrated or `verdict=False`) and `normalized_scores` (see edgeinspect.runtime.postprocess)."""
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, overrides=overrides)
    elif overrides:
        bundle = Bundle(bundle.path, bundle.manifest, build_bundle_config(bundle.path, bundle.manifest, overrides),
                        bundle.context, bundle.contexts)
    if bundle.method in GENERATOR_ROLES:
        raise BundleError(f"bundle {bundle.path}: {bundle.method!r} is a generator, not an inspection pipeline; "
                          f"run it with `edgeinspect generate {bundle.method} --bundle {bundle.path}`")
    if bundle.method not in PIPELINE_ROLES:
        raise BundleError(f"bundle {bundle.path}: no pipeline for method {bundle.method!r} in this version")
    cfg = bundle.config
    # max_batch counts frames; GLAD runs its noise draws as one batch and its ADP check decodes two
    # estimates per row in one call, so its TensorRT profiles need 2 x draws times that (a profile's batch
    # range comes from one role-wide multiplier)
    factor = 2 * cfg.inference.for_category(cfg.category).draws if bundle.method == "glad" else 1
    bank = bundle_bank(bundle) if cfg.scoring.reference in BANK_REFERENCES else None
    roles = pipeline_roles(bundle, cfg, references)
    nets = bundle_networks(bundle, backend, precision=precision, providers=providers,
                           intra_op_threads=intra_op_threads, roles=roles,
                           engine_cache_dir=engine_cache_dir,
                           max_batch=(max_batch or cfg.inference.batch_size) * factor, device=device,
                           memory_arena=memory_arena, image_rows=image_rows)
    post = PostProcessor.from_bundle(bundle) if verdict and bundle.calibration else None
    if post is not None:
        _warn_if_calibrated_otherwise(bundle, precision)
    ms = bundle.manifest.get("method_settings") or {}
    threshold, bounds = ms.get("adp_threshold"), (ms.get("weight_low"), ms.get("weight_high"))
    if isinstance(cfg, GLADConfig):  # a bundle loaded with another adp_space than it was calibrated in
        threshold, bounds = usable_calibration(cfg.inference.for_category(cfg.category), ms.get("adp_calibration"),
                                               threshold, bounds if None not in bounds else None)
    return assemble_pipeline(cfg, nets, bundle.context, adp_threshold=threshold, weight_bounds=bounds, post=post,
                             bank=bank)


def pipeline_roles(bundle: Bundle, cfg: Any, references: Sequence[str] = ()) -> tuple[str, ...]:
    """The network roles a pipeline on `bundle` runs with `cfg`'s scoring (reference, encoder and decoder), and
    with each of `references` (for `using`): a session per role costs memory, so no role is loaded that no
    reference runs. bank: the extractor and the bank search only (no diffusion); hybrid: the method's networks
    and the bank search; reconstruction: the method's networks."""
    wanted = {cfg.scoring.reference, *references}
    networks = bundle.manifest["networks"]
    roles: list[str] = []
    if wanted - {"bank"}:
        roles += PIPELINE_ROLES[bundle.method]
        # scoring.decoder anchor: the anchored autoencoder's resize decoder (a bundle without it: the loop says so)
        if cfg.scoring.decoder == "anchor" and "vae_anchor_decoder" in networks:
            roles.append("vae_anchor_decoder")
        # scoring.encoder anchor: the resize encoder, in place of the full one unless a vae_roundtrip reference
        # runs its round trip (a bundle without it: the loop says so)
        if cfg.scoring.encoder == "anchor" and "vae_anchor_encoder" in networks:
            roles.append("vae_anchor_encoder")
            if "vae_roundtrip" not in wanted:
                roles.remove("vae_encoder")
    else:
        roles.append("features")
    # a bundle without the bank search: the loop names what is missing
    if wanted & set(BANK_REFERENCES) and "bank_distance" in networks:
        roles.append("bank_distance")
    return tuple(roles)


def bundle_bank(bundle: Bundle) -> NormalBank:
    """The bundle's normal-feature bank (its payload "bank", verified with the bundle)."""
    if BANK_PAYLOAD not in (bundle.manifest.get("payload") or {}):
        raise BundleError(f"bundle {bundle.path}: scoring.reference {bundle.config.scoring.reference!r} needs the "
                          f"normal-feature bank, which this bundle lacks: add it with "
                          f"`edgeinspect bank --bundle {bundle.path} --data DIR`")
    if "bank_distance" not in bundle.manifest["networks"]:
        raise BundleError(f"bundle {bundle.path}: no bank_distance network (exported by an older version): "
                          "export the run again")
    return bank_from_tensors(bundle.payload(BANK_PAYLOAD), str(bundle.path / BANK_PAYLOAD))


def _warn_if_calibrated_otherwise(bundle: Bundle, precision: str) -> None:
    """Thresholds hold for the scores they were fitted on: say so when this pipeline scores differently."""
    used = (bundle.calibration or {}).get("settings") or {}
    differs = []
    if used.get("precision") not in (None, precision):
        differs.append(f"precision {precision} (calibrated with {used['precision']})")
    inference = used.get("inference")
    if inference is not None and inference != bundle.config.inference.model_dump(mode="json"):
        differs.append("other inference settings (overrides)")
    if differs:
        warnings.warn(f"bundle {bundle.path}: the calibrated verdict thresholds were fitted on scores from another "
                      f"setup than this pipeline's: {', '.join(differs)}; calibrate again for this setup",
                      UserWarning, stacklevel=3)


@dataclass
class Detector:
    """A pipeline ready to score frames, with what it was made from (for result files)."""

    cfg: Any
    pipeline: Pipeline
    checkpoint: str  # the checkpoint folder (a bundle: the one it was exported from, by name)
    train_seconds: float | None  # training time of that checkpoint (None from a bundle)
