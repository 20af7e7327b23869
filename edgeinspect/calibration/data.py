"""The images calibration is fitted on: held-out normals, and labelled defects from an MVTec-layout folder
or from a JSON index of generated image/mask pairs (AdaBLDM, DualAnoDiff).

A defects index is a JSON list (or {"items": [...]}) of objects

    {"image": "gen/0001.png", "mask": "gen/0001_mask.png"}      # mask optional (null: image level only)
    {"image": "gen/0002.png", "mask": null, "label": 0}         # label optional, default 1 (defective)

with paths relative to the index file's folder (or absolute). Masks: any image, > 127 is defective.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeinspect.data.mvtec import IMAGE_SUFFIXES, DatasetError, MVTecFolder, resize_mask
from edgeinspect.data.mvtec import read_mask as read_mask_file  # at the file's own size


@dataclass(frozen=True)
class LabelledImage:
    image: Path
    label: int  # 1: defective, 0: normal
    mask: Path | None = None  # None: no pixel labels (all-normal for a normal image)


def list_images(path: str | Path) -> list[Path]:
    """Image files of a folder (recursively, sorted) or a single image file."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(f"{p} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
        return [p]
    if not p.is_dir():
        raise DatasetError(f"no such image folder or file: {p}")
    out = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
                 and "ground_truth" not in q.relative_to(p).parts)
    if not out:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {p}")
    return out


def normal_images(path: str | Path) -> list[Path]:
    """Held-out normals: a folder of images; an MVTec category folder gives its test/good (train/good is
    what the model was fitted on: calibrating on it would set the thresholds too low)."""
    p = Path(path)
    if p.is_dir() and (p / "test" / "good").is_dir() and (p / "train").is_dir():
        return list_images(p / "test" / "good")
    return list_images(p)


def mvtec_labelled(root: str | Path) -> list[LabelledImage]:
    """Every test image of an MVTec-layout category: test/good as normals, test/<type> as defects with
    their ground_truth masks."""
    data = MVTecFolder(root, "test", image_size=8)  # the size is not used: only the file list
    return [LabelledImage(s.path, s.label, s.mask_path) for s in data.samples]


def index_labelled(index: str | Path) -> list[LabelledImage]:
    """A JSON index of (generated) images with optional masks, see the module docstring."""
    index = Path(index)
    try:
        raw = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read the defects index {index}: {e}") from None
    items = raw.get("items") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise DatasetError(f"{index}: expected a non-empty JSON list of {{image, mask}} objects (or {{\"items\": [...]}})")
    base = index.parent
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "image" not in it:
            raise DatasetError(f"{index}: item {i} needs an 'image' path")
        img = base / it["image"]
        mask = base / it["mask"] if it.get("mask") else None
        label = int(it.get("label", 1))
        if label not in (0, 1):
            raise DatasetError(f"{index}: item {i} has label {label}; use 1 (defective) or 0 (normal)")
        for f in (img, mask):
            if f is not None and not f.is_file():
                raise DatasetError(f"{index}: item {i}: no such file {f}")
        out.append(LabelledImage(img, label, mask))
    return out


def labelled_images(source: str | Path) -> list[LabelledImage]:
    """Labelled images from an MVTec-layout folder or a JSON index file."""
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".json":
        return index_labelled(p)
    if p.is_dir() and (p / "test").is_dir():
        return mvtec_labelled(p)
    raise DatasetError(f"--defects {p}: expected an MVTec-layout folder (test/<type>, ground_truth/<type>) or a "
                       "JSON index of {image, mask} objects")


def read_mask(path: Path | None, size: int) -> np.ndarray:
    """Bool (size, size) mask (nearest-neighbour resize); all False for None."""
    if path is None:
        return np.zeros((size, size), bool)
    return resize_mask(read_mask_file(path), size)
