"""Updating a verified bundle in place: its calibration slot and its int8 (Q/DQ) graphs. Every file is
re-hashed and the manifest re-signed (its digest), and the manifest is replaced atomically; a bundle that
does not verify is never re-signed. Export uses the same hashing for a new bundle."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeinspect.core.atomic import fsync_path, write_bytes_atomic, write_json_atomic
from edgeinspect.runtime.bundle_loading import (
    MANIFEST,
    UNHASHED_DIRS,
    BundleError,
    manifest_digest,
    sha256_file,
    verify_bundle,
)


def hash_files(root: Path, exclude: Sequence[Path] = ()) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, the target-machine caches and the
    folders `exclude` (relative to root: ones about to be deleted)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if (p.is_file() and rel.as_posix() != MANIFEST and rel.parts[0] not in UNHASHED_DIRS
                and not any(rel.is_relative_to(e) for e in exclude)):
            out[rel.as_posix()] = sha256_file(p)
    return out


def finalize_manifest(root: Path, manifest: dict[str, Any],
                      exclude: Sequence[Path] | set[Path] = ()) -> dict[str, Any]:
    manifest = dict(manifest)
    manifest["files"] = hash_files(root, tuple(exclude))
    manifest.pop("manifest_sha256", None)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return manifest


def set_calibration(bundle_dir: str | Path, calibration: dict[str, Any],
                    files: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Store calibration (thresholds, normalisation) in a verified bundle: `calibration` goes into the
    manifest's calibration slot, `files` (name -> bytes) under calibration/; hashes and the manifest
    digest are updated and the manifest replaced atomically. Returns the new manifest."""
    root = Path(bundle_dir)
    manifest = verify_bundle(root)  # never re-sign a tampered bundle
    json.dumps(calibration)  # must be JSON
    for name, data in (files or {}).items():
        rel = Path("calibration") / name
        if rel.is_absolute() or ".." in rel.parts:
            raise BundleError(f"calibration file name {name!r} must stay inside the bundle")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest["calibration"] = calibration
    new = finalize_manifest(root, manifest)
    write_json_atomic(root / MANIFEST, new)
    return new


def set_payload(bundle_dir: str | Path, name: str, data: bytes, scoring: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Store a payload file (`data`: safetensors bytes, e.g. the normal-feature bank) as <name>.safetensors
    in a verified bundle; `scoring` (fields of the config's scoring section, e.g. {"reference": "bank"})
    is written into config.json and settings.json too, and then the calibration slot is emptied (its
    thresholds were fitted on other scores). Hashes and digest are updated, the manifest replaced
    atomically. Returns the new manifest."""
    root = Path(bundle_dir)
    manifest = verify_bundle(root)  # never re-sign a tampered bundle
    if not name.isidentifier() or name == "context":
        raise BundleError(f"bad payload name {name!r} (an identifier other than 'context')")
    rel = f"{name}.safetensors"
    write_bytes_atomic(root / rel, data)
    manifest["payload"] = {**(manifest.get("payload") or {}), name: rel}
    if scoring:
        for key in (manifest["config"], manifest["settings"]):
            doc = json.loads((root / key).read_text())
            if "scoring" not in doc:
                raise BundleError(f"bundle {root}: {key} has no scoring section to set {sorted(scoring)} in")
            doc["scoring"] = {**doc["scoring"], **scoring}
            write_json_atomic(root / key, doc)
        manifest["calibration"] = None
    new = finalize_manifest(root, manifest)
    write_json_atomic(root / MANIFEST, new)
    return new


# int8 (Q/DQ) graphs live in onnx/int8/<role>-<sha256 prefix>/ (see set_int8_variants).
INT8_DIR = Path("onnx") / "int8"


def set_int8_variants(bundle_dir: str | Path,
                      variants: dict[str, tuple[Sequence[Path], dict[str, Any]]]) -> dict[str, Any]:
    """Store int8 (Q/DQ) graphs in a verified bundle: role -> (files written elsewhere on the same file
    system, the graph first and its external data after it; the manifest record). The files are moved to
    onnx/int8/<role>-<hash>/ (the graph becomes networks.<role>.files.int8, precision int8, the record
    networks.<role>.int8),
    "int8" joins the bundle's precisions, hashes and digest are updated and the manifest replaced
    atomically. Returns the new manifest."""
    root = Path(bundle_dir)
    manifest = verify_bundle(root)  # never re-sign a tampered bundle
    for role, (files, record) in variants.items():
        if role not in manifest["networks"]:
            raise BundleError(f"bundle {root}: no network {role!r} to add an int8 graph to")
        json.dumps(record)  # must be JSON
        names = [Path(f).name for f in files]
        if not names or not names[0].endswith(".onnx") or any("/" in n or n.startswith(".") for n in names):
            raise BundleError(f"bundle {root}: bad int8 files for {role!r}: {names}")
    old_used = _int8_folders(manifest)
    for folder in _int8_dirs(root):  # orphans of a call killed before its manifest was replaced
        if folder.relative_to(root) not in old_used:
            shutil.rmtree(folder)
    for role, (files, record) in variants.items():
        # A new graph never overwrites the one the manifest points at: it goes to a folder named by its
        # own hash, so a kill anywhere before the manifest is replaced leaves the old manifest with its
        # old, intact files (the orphan folder is removed by the next call).
        folder = root / INT8_DIR / f"{role}-{sha256_file(Path(files[0]))[:16]}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            fsync_path(Path(f))
            os.replace(f, folder / Path(f).name)
        fsync_path(folder)
        entry = manifest["networks"][role]
        entry["files"] = {**entry["files"], "int8": (folder / Path(files[0]).name).relative_to(root).as_posix()}
        entry["precision"] = {**entry.get("precision", {}), "int8": "int8"}
        entry["int8"] = record
    if "int8" not in manifest["precisions"]:
        manifest["precisions"] = [*manifest["precisions"], "int8"]
    stale = old_used - _int8_folders(manifest)
    new = finalize_manifest(root, manifest, exclude=stale)
    write_json_atomic(root / MANIFEST, new)
    for folder in stale:  # replaced graphs (a kill before this leaves them as orphans: harmless)
        shutil.rmtree(root / folder, ignore_errors=True)
    return new


def _int8_folders(manifest: dict[str, Any]) -> set[Path]:
    """The int8 graph folders (relative to the bundle) that `manifest` points at."""
    return {Path(e["files"]["int8"]).parent for e in manifest["networks"].values() if "int8" in e.get("files", {})}


def _int8_dirs(root: Path) -> list[Path]:
    d = root / INT8_DIR
    return sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
