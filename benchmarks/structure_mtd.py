"""A structure test set from a category's normal test images: defects of place, not of texture.

    python benchmarks/structure_mtd.py --data ../shared/data/mtd --out runs/mtd_structure
    nice python benchmarks/reference_mtd.py --data runs/mtd_structure --name reference_structure_mtd \\
        --diad BUNDLE --glad BUNDLE

A bank of training-normal features knows every normal texture but not where it belongs; a reconstruction
is aligned with the frame. MTD's defects (blowholes, breaks, cracks) are texture flaws a bank sees, so this
set asks the other question. From each normal test image (left untouched under test/good) it makes:

- `moved`: a vertical strip at the tile's left or right border (where MTD's tiles have their edge line)
  copied over the middle of the tile, over part of its height: every pixel of it is a normal pixel, out of
  place;
- `missing`: that border strip covered by a strip of the tile's own interior: the edge line is gone.

Both are seeded per image and written in MVTec layout (test/<type>, ground_truth/<type>/<name>_mask.png,
the mask being the region that changed; train/ links to the source's training normals), so every detector
tool reads it as it reads the source.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from edgeinspect.data.mvtec import IMAGE_SUFFIXES

BORDER = 0.12        # strip width, as a fraction of the image width (MTD's edge line lies in the outer 5 %)
HEIGHT = (0.45, 0.8)  # the moved strip's height, as a fraction of the image height
TYPES = ("moved", "missing")


def image_rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])


def moved_strip(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image with a border strip copied into its middle, mask of the pasted region)."""
    h, w = image.shape[:2]
    sw = max(2, round(BORDER * w))
    sh = max(2, round(rng.uniform(*HEIGHT) * h))
    top = int(rng.integers(0, h - sh + 1))
    src = 0 if rng.random() < 0.5 else w - sw
    left = int(rng.integers(round(0.3 * w), round(0.7 * w) - sw + 1))
    out = image.copy()
    out[top:top + sh, left:left + sw] = image[top:top + sh, src:src + sw]
    mask = np.zeros((h, w), bool)
    mask[top:top + sh, left:left + sw] = True
    return out, mask


def missing_strip(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image with one border strip covered by a strip of its interior, mask of the covered strip)."""
    h, w = image.shape[:2]
    sw = max(2, round(BORDER * w))
    dst = 0 if rng.random() < 0.5 else w - sw
    src = int(rng.integers(round(0.3 * w), round(0.7 * w) - sw + 1))
    out = image.copy()
    out[:, dst:dst + sw] = image[:, src:src + sw]
    mask = np.zeros((h, w), bool)
    mask[:, dst:dst + sw] = True
    return out, mask


def build_structure_set(data: Path, out: Path, seed: int = 0) -> dict[str, int]:
    """Write the set under `out` (see the module doc); returns the number of images per test type."""
    normals = sorted(p for p in (data / "test" / "good").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not normals:
        raise SystemExit(f"{data}/test/good holds no images")
    (out / "test" / "good").mkdir(parents=True, exist_ok=True)
    train = out / "train"
    if not train.exists():
        os.symlink((data / "train").resolve(), train, target_is_directory=True)
    makers = {"moved": moved_strip, "missing": missing_strip}
    for kind in TYPES:
        (out / "test" / kind).mkdir(parents=True, exist_ok=True)
        (out / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
    for path in normals:
        image = np.asarray(Image.open(path))
        Image.fromarray(image).save(out / "test" / "good" / f"{path.stem}.png")
        for kind, make in makers.items():
            changed, mask = make(image, image_rng(f"{kind}/{path.name}", seed))
            Image.fromarray(changed).save(out / "test" / kind / f"{path.stem}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "ground_truth" / kind / f"{path.stem}_mask.png")
    return {"good": len(normals), **{k: len(normals) for k in TYPES}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a category in MVTec layout")
    ap.add_argument("--out", type=Path, required=True, help="folder for the structure set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts = build_structure_set(args.data, args.out, args.seed)
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
