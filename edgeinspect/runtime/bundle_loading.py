"""Loading a deployable bundle: verify it, then hand a runtime what it needs to build a pipeline.

A bundle (written by `edgeinspect.export.bundle.export_bundle`) is one folder:

    manifest.json          what is in the bundle (schema below), sha256 of every other file, and a
                           digest of the manifest itself
    config.json            the full validated config of the run the bundle was exported from
    settings.json          scheduler (DDIM), inference and scoring settings, for readers without pydantic
    context.safetensors    the prompt embedding (a constant per deployment: the prompt encoder is not
                           exported) under "context"; a generator's loop needs several, stored beside
                           it under their names (manifest `contexts`: AdaBLDM defect/empty,
                           DualAnoDiff whole/part/empty)
    <name>.safetensors     payload tensors a generator's loop needs besides graphs (manifest `payload`:
                           AdaBLDM's decoder weights for its PyTorch adaptation and its seed masks)
    onnx/<role>.onnx       one graph per network role (fp32); onnx/<role>.fp16.onnx the fp16 variants;
                           onnx/int8/<role>-<hash>/ explicitly quantised (Q/DQ) variants, written into the
                           bundle by `edgeinspect calibrate --int8` (manifest: files.int8, networks.<role>.int8)
    engines/               TensorRT engines, built on the target machine (a cache: not hashed, every
                           engine is keyed by GPU, TensorRT version, profile and ONNX hash instead);
                           engines/int8/ the INT8 activation ranges (a cache keyed by graph, images, method)
    calibration/           files stored with the calibration (`edgeinspect calibrate`: the scores it was
                           fitted on), hashed like the rest; the thresholds themselves are in the
                           manifest's `calibration` slot

The manifest's `method_settings` hold what a method's loop runs with beyond the config (GLAD: the
category's ADP settings and the resolved firing threshold; AdaBLDM: the defect type, its seed-defect
names and the decoder's architecture; DualAnoDiff: the defect type and prompts).

`load_bundle` refuses a bundle whose files do not match their hashes, whose manifest was edited,
that misses a file, or that was written by an incompatible edgeinspect (major version, schema) or
with an opset this runtime does not support. The digests detect corruption and accidental edits;
they are not a signature (whoever can write the folder can recompute them).

A bundle holds graphs, not torch weights: the torch backend runs from the run folder
(`edgeinspect.runtime.torch_backend`), never from a bundle; `edgeinspect.runtime.detector` assembles a
detector from either.
The one exception is AdaBLDM's decoder, whose per-sample adaptation needs gradients: its weights are
payload, and the adaptation runs in PyTorch whatever backend runs the loop.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import edgeinspect
from edgeinspect.config import ConfigError, build_config, merge_config

BUNDLE_FORMAT = "edgeinspect-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MIN_OPSET = 17
# Files under these folders are caches built on the target machine, not part of the exported bundle.
UNHASHED_DIRS = ("engines",)
PRECISIONS = ("fp32", "fp16")
_REQUIRED_KEYS = {
    "format": str, "schema_version": int, "method": str, "preset": str, "image_size": int,
    "opset": int, "versions": dict, "networks": dict, "precisions": list, "context": dict,
    "config": str, "settings": str, "files": dict, "manifest_sha256": str,
}
PIPELINE_ROLES = {"diad": ("vae_encoder", "hint_encoder", "unet", "vae_decoder", "features"),
                   "glad": ("vae_encoder", "unet_plain", "vae_decoder", "features")}
# Generators run as generation jobs (edgeinspect.generation.adabldm_bundle, .dualanodiff_bundle), not as an
# inspection pipeline. DualAnoDiff also needs dual_unet (BCM on) or dual_unet_plain (BCM off).
GENERATOR_ROLES = {"adabldm": ("vae_encoder", "trimap_encoder", "unet", "vae_decoder"),
                    "dualanodiff": ("vae_encoder", "vae_decoder")}


class BundleError(ValueError):
    """A bundle that is missing, incomplete, tampered with or incompatible; the message names the file."""


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def major_version(version: str) -> str:
    return str(version).split(".", 1)[0]


# --------------------------------------------------------------------------- tensor specs


@dataclass(frozen=True)
class TensorSpec:
    """A graph input/output: name, dtype and shape. A str dim is dynamic (its axis name, "batch" for the
    batch axis); `deploy_shape` is the concrete shape at batch 1 and the deployment size."""

    name: str
    shape: tuple[int | str, ...]
    deploy_shape: tuple[int, ...]
    dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "deploy_shape": list(self.deploy_shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), tuple(d["shape"]), tuple(int(v) for v in d["deploy_shape"]),
                   str(d.get("dtype", "float32")))

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


class NamedIO:
    """The input and output names of something with `inputs` and `outputs` TensorSpecs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


@dataclass(frozen=True)
class NetworkEntry(NamedIO):
    """One network role of a bundle (manifest["networks"][role])."""

    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, str]  # precision -> path relative to the bundle
    precision: dict[str, str]  # bundle precision -> precision the file really has ("fp32" VAE in fp16)
    batch_multiplier: int = 1  # the loop calls it with this many times the frame batch (features: 2)
    pipeline: bool = True  # called by the method's loop (False: exported on its own, e.g. guidance)

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
                "files": dict(self.files), "precision": dict(self.precision),
                "batch_multiplier": self.batch_multiplier, "pipeline": self.pipeline}

    @classmethod
    def from_json(cls, role: str, d: dict[str, Any]) -> "NetworkEntry":
        return cls(role, tuple(TensorSpec.from_json(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_json(t) for t in d["outputs"]), dict(d["files"]),
                   dict(d.get("precision", {})), int(d.get("batch_multiplier", 1)), bool(d.get("pipeline", True)))


# --------------------------------------------------------------------------- the bundle


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    config: Any  # the method's validated config (DiADConfig)
    context: torch.Tensor
    contexts: dict[str, torch.Tensor] = field(default_factory=dict)  # a generator's named prompt contexts

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self.manifest.get("calibration")

    @property
    def batch_size(self) -> int:
        """Frames (inspection) or samples (generators) per loop call: what TensorRT profiles are built for."""
        cfg = self.config
        return cfg.inference.batch_size if hasattr(cfg, "inference") else cfg.sampling.batch_size

    def payload(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of a payload file (verified with the bundle, like every file)."""
        from safetensors.torch import load_file

        files = self.manifest.get("payload") or {}
        if name not in files:
            raise BundleError(f"{self.path / MANIFEST}: the bundle has no payload {name!r} (it has {sorted(files)})")
        return load_file(str(self.path / files[name]))

    @property
    def networks(self) -> dict[str, NetworkEntry]:
        return {r: NetworkEntry.from_json(r, d) for r, d in self.manifest["networks"].items()}

    def network(self, role: str) -> NetworkEntry:
        nets = self.manifest["networks"]
        if role not in nets:
            raise BundleError(f"{self.path / MANIFEST}: the bundle has no network {role!r} (it has {sorted(nets)})")
        return NetworkEntry.from_json(role, nets[role])

    def pipeline_roles(self) -> tuple[str, ...]:
        return tuple(r for r, e in self.networks.items() if e.pipeline)

    def onnx_path(self, role: str, precision: str = "fp32") -> Path:
        return self.variant(role, precision)[0]

    def variant(self, role: str, precision: str = "fp32") -> tuple[Path, str]:
        """The graph `role` runs from at `precision`, and the precision that graph really has (the VAE's
        fp16 entry is its fp32 graph). "int8" takes the role's Q/DQ graph (`edgeinspect calibrate --int8`);
        a role left unquantised (the VAE decoder) runs from its fp16 graph, else its fp32 one."""
        entry = self.network(role)
        if precision in entry.files:
            return self.path / entry.files[precision], entry.precision.get(precision, precision)
        if precision == "int8":
            if not any("int8" in e.files for e in self.networks.values()):
                raise BundleError(f"{self.path / MANIFEST}: the bundle has no int8 (Q/DQ) graphs; write them with "
                                  f"`edgeinspect calibrate --bundle {self.path} --normals IMAGES --int8`")
            fallback = "fp16" if "fp16" in entry.files else "fp32"
            return self.path / entry.files[fallback], entry.precision.get(fallback, fallback)
        raise BundleError(
            f"{self.path / MANIFEST}: network {role!r} has no {precision} variant (it has {sorted(entry.files)}); "
            f"re-export with that precision (edgeinspect export --fp16)"
        )


def _fail(path: Path, what: str) -> BundleError:
    return BundleError(f"bundle {path}: {what}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle {path}: not a folder")
    if not mf.is_file():
        raise _fail(path, f"{MANIFEST} is missing (not a bundle written by `edgeinspect export`)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise _fail(path, f"{MANIFEST}: the top level must be an object")
    return manifest


def _check_schema(path: Path, manifest: dict[str, Any]) -> None:
    if manifest.get("format") != BUNDLE_FORMAT:
        raise _fail(path, f"{MANIFEST}: format is {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    for key, kind in _REQUIRED_KEYS.items():
        if key not in manifest:
            raise _fail(path, f"{MANIFEST}: field {key!r} is missing")
        if not isinstance(manifest[key], kind) or (kind is int and isinstance(manifest[key], bool)):
            raise _fail(path, f"{MANIFEST}: field {key!r} must be a {kind.__name__}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise _fail(path, f"{MANIFEST}: schema_version {manifest['schema_version']} is not supported by this "
                          f"edgeinspect {edgeinspect.__version__} (it reads schema {SCHEMA_VERSION}); export the "
                          "bundle again with this version")


def _check_versions(path: Path, manifest: dict[str, Any]) -> None:
    written = manifest["versions"].get("edgeinspect")
    if written is None:
        raise _fail(path, f"{MANIFEST}: versions.edgeinspect is missing")
    if major_version(written) != major_version(edgeinspect.__version__):
        raise _fail(path, f"{MANIFEST}: written by edgeinspect {written}, this is edgeinspect "
                          f"{edgeinspect.__version__} (major versions differ); export the bundle again")
    opset = manifest["opset"]
    newest = newest_opset()
    if not MIN_OPSET <= opset <= (newest or opset):
        raise _fail(path, f"{MANIFEST}: opset {opset} is outside what this runtime supports "
                          f"({MIN_OPSET}..{newest}); export the bundle again")


def newest_opset() -> int | None:
    """The newest ONNX opset this environment knows (from the onnx package); None without onnx (a lean
    serving environment, requirements-serve.txt): then only the lower bound is checked here, and onnxruntime
    refuses a graph whose opset it does not implement when it builds the session, naming the opset."""
    try:
        import onnx  # lazily: only the opset check needs it, and serving does without it
    except ImportError:
        return None
    return int(onnx.defs.onnx_opset_version())


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    files: dict[str, str] = manifest["files"]
    for rel in files:
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise _fail(path, f"{MANIFEST}: file entry {rel!r} points outside the bundle")
    referenced = {manifest["config"], manifest["settings"], manifest["context"].get("file", "")}
    referenced.update((manifest.get("payload") or {}).values())
    for role, entry in manifest["networks"].items():
        if not isinstance(entry, dict) or "files" not in entry or "inputs" not in entry or "outputs" not in entry:
            raise _fail(path, f"{MANIFEST}: networks.{role} needs inputs, outputs and files")
        referenced.update(entry["files"].values())
    unlisted = sorted(r for r in referenced if r not in files)
    if unlisted:
        raise _fail(path, f"{MANIFEST}: {unlisted[0]} is used but has no sha256 in 'files'")
    for rel, expected in files.items():
        p = path / rel
        if not p.is_file():
            raise _fail(path, f"file {rel} listed in {MANIFEST} is missing")
        found = sha256_file(p)
        if found != expected:
            raise _fail(path, f"file {rel} does not match its sha256 in {MANIFEST} (expected {expected[:16]}..., "
                              f"found {found[:16]}...): it was modified or corrupted after export; export the "
                              "bundle again")


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check schema, versions, the manifest's digest and every file's sha256; return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    if "manifest_sha256" not in manifest:
        raise _fail(path, f"{MANIFEST}: field 'manifest_sha256' is missing")
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise _fail(path, f"{MANIFEST} was modified after export (its content does not match its "
                          "manifest_sha256); export the bundle again (calibration is stored with "
                          "edgeinspect.export.bundle.set_calibration, which updates the digest)")
    _check_schema(path, manifest)
    _check_versions(path, manifest)
    _check_files(path, manifest)
    required = {**PIPELINE_ROLES, **GENERATOR_ROLES}
    if manifest["method"] in required:
        missing = [r for r in required[manifest["method"]] if r not in manifest["networks"]]
        if missing:
            raise _fail(path, f"{MANIFEST}: method {manifest['method']!r} needs networks {missing}")
    return manifest


def build_bundle_config(path: Path, manifest: dict[str, Any], overrides: dict[str, Any] | None):
    data = json.loads((path / manifest["config"]).read_text())
    if overrides:
        bad = set(overrides) & {"model", "guidance", "method", "features", "control", "lora", "saim", "bcm",
                                "prompts"}
        if bad:
            raise BundleError(f"bundle {path}: cannot override {sorted(bad)}: they are baked into the graphs")
        data = merge_config(data, overrides)
    method = data.pop("method", manifest["method"])
    try:
        return build_config(method, data["model"]["preset"], data, source=str(path / manifest["config"]))
    except ConfigError as e:
        raise BundleError(f"bundle {path}: {manifest['config']} does not validate: {e}") from None


def load_bundle(path: str | Path, verify: bool = True, overrides: dict[str, Any] | None = None) -> Bundle:
    """A verified bundle: manifest, validated config (with optional inference/scoring overrides) and the
    prompt context. `verify=False` skips the hashes (not the schema): for tools that repair bundles."""
    path = Path(path)
    if verify:
        manifest = verify_bundle(path)
    else:
        manifest = read_manifest(path)
        _check_schema(path, manifest)
    cfg = build_bundle_config(path, manifest, overrides)
    from safetensors.torch import load_file

    ctx_file = path / manifest["context"]["file"]
    tensors = load_file(str(ctx_file))
    key = manifest["context"].get("key", "context")
    named = {name: spec.get("key", name) for name, spec in (manifest.get("contexts") or {}).items()}
    absent = [k for k in (key, *named.values()) if k not in tensors]
    if absent:
        raise BundleError(f"bundle {path}: {manifest['context']['file']} has no tensor {absent[0]!r}")
    contexts = {name: tensors[k].float() for name, k in named.items()}
    return Bundle(path, copy.deepcopy(manifest), cfg, tensors[key].float(), contexts)
