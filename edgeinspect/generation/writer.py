"""Output of a generation job: image + mask PNG pairs and a JSON index, atomic and resumable.

Generation is long (hours on a CPU, thousands of images), so a killed job must lose at most the
image in progress and a rerun must continue where it stopped, with no duplicates and no gaps.
Item i is a pure function of the job's settings and i (its seed is `item_seed(base seed, defect
type, index within the type)`), so the writer only has to know which indices are done: an index
entry is written after both of its PNGs are in place, and every file is written to a temporary name
and renamed, so a crash at any point leaves either a complete item in the index or nothing that the
index points to (an orphan PNG is overwritten when its index is generated again).

Layout of `out_dir`:
    images/000000.png ...   the generated images
    masks/000000.png ...    their masks (0 / 255)
    index.json              {"settings": {...}, "total": N, "items": {"0": {"image": ..., "mask": ..., ...}}}

A rerun with different settings into the same folder is refused: mixing two jobs in one index
would make the index lie about how each image was made.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from edgeinspect.core.atomic import write_json_atomic, write_png_atomic


class GenerationError(RuntimeError):
    pass


# Recorded in every job's settings: a folder made with another seeding scheme is refused on resume.
SEEDING = "SeedSequence(base_seed, crc32(defect_type), index_in_type)"


def item_seed(base_seed: int, defect_type: str, index_in_type: int) -> int:
    """The seed of output `index_in_type` of `defect_type`: independent across types and indices, and
    the same whether the type is generated alone or in a job with other types (so per-type jobs never
    reuse another type's noises, source images or placements)."""
    seq = np.random.SeedSequence([base_seed, zlib.crc32(defect_type.encode()), index_in_type])
    return int(seq.generate_state(1)[0])


def _normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples -> lists, paths -> strings)."""
    return json.loads(json.dumps(settings, default=str))


class GenerationWriter:
    def __init__(self, out_dir: str | Path, settings: dict[str, Any], total: int):
        if total < 1:
            raise ValueError(f"total must be at least 1, got {total}")
        self.out_dir = Path(out_dir)
        self.settings = _normalise(settings)
        self.total = total
        self.index_path = self.out_dir / "index.json"
        self.items: dict[str, dict[str, Any]] = {}
        if self.index_path.is_file():
            saved = json.loads(self.index_path.read_text())
            if saved.get("settings") != self.settings:
                changed = sorted(k for k in set(saved.get("settings", {})) | set(self.settings)
                                 if saved.get("settings", {}).get(k) != self.settings.get(k))
                raise GenerationError(
                    f"{self.out_dir} holds a generation job with different settings (differs in: "
                    f"{', '.join(changed)}); use another output folder or the same settings to resume")
            self.items = saved.get("items", {})
            over = [k for k in self.items if int(k) >= total]
            if over:
                # A larger earlier total is fine to extend; a smaller one would hide finished items.
                raise GenerationError(f"{self.out_dir} already has items up to {max(map(int, over))}, "
                                      f"beyond the requested total {total}; ask for at least {len(self.items)}")
        (self.out_dir / "images").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "masks").mkdir(parents=True, exist_ok=True)
        self._flush()

    def pending(self) -> list[int]:
        return [i for i in range(self.total) if str(i) not in self.items]

    def done(self) -> int:
        return len(self.items)

    def write(self, i: int, image_u8: np.ndarray, mask: np.ndarray, record: dict[str, Any],
              extras: dict[str, np.ndarray] | None = None) -> None:
        """Store item i: RGB uint8 (H,W,3) image and bool (H,W) mask, then its index entry.

        `extras`: more uint8 images of this item (e.g. "before_adaptation", "trimap"), written to
        <name>/<i>.png and listed in the entry under their names."""
        if not 0 <= i < self.total:
            raise IndexError(f"item {i} outside 0..{self.total - 1}")
        if image_u8.dtype != np.uint8 or image_u8.ndim != 3 or image_u8.shape[2] != 3:
            raise ValueError(f"image must be uint8 (H,W,3), got {image_u8.dtype} {image_u8.shape}")
        if mask.shape != image_u8.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match the image {image_u8.shape[:2]}")
        name = f"{i:06d}.png"
        write_png_atomic(self.out_dir / "images" / name, cv2.cvtColor(image_u8, cv2.COLOR_RGB2BGR))
        write_png_atomic(self.out_dir / "masks" / name, mask.astype(np.uint8) * 255)
        entry = _normalise(record)
        for key, extra in (extras or {}).items():
            if key in ("images", "masks") or not key.isidentifier():
                raise ValueError(f"bad extra name {key!r}")
            (self.out_dir / key).mkdir(exist_ok=True)
            pixels = cv2.cvtColor(extra, cv2.COLOR_RGB2BGR) if extra.ndim == 3 else extra
            write_png_atomic(self.out_dir / key / name, pixels)
            entry[key] = f"{key}/{name}"
        entry.update({"image": f"images/{name}", "mask": f"masks/{name}", "mask_pixels": int(mask.sum())})
        self.items[str(i)] = entry
        self._flush()

    def _flush(self) -> None:
        ordered = dict(sorted(self.items.items(), key=lambda kv: int(kv[0])))
        write_json_atomic(self.index_path, {"settings": self.settings, "total": self.total, "items": ordered})

    def progress(self, desc: str, enabled: bool = True) -> "GenerationProgress":
        return GenerationProgress(desc, self.total, self.done(), enabled)


class GenerationProgress:
    """tqdm bar over the whole job (resumed items counted as done) with this run's images/s."""

    def __init__(self, desc: str, total: int, initial: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not enabled,
                        dynamic_ncols=True)
        self.start = time.perf_counter()
        self.count = 0

    def update(self, n: int = 1, **stats: float) -> None:
        self.count += n
        rate = self.count / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix({"img/s": f"{rate:.3f}", **{k: f"{v:.3g}" for k, v in stats.items()}})
        self.bar.update(n)

    @property
    def images_per_s(self) -> float:
        return self.count / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "GenerationProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_index(out_dir: str | Path) -> dict[str, Any]:
    """A generation folder's index, with each item's files checked to exist."""
    out_dir = Path(out_dir)
    path = out_dir / "index.json"
    if not path.is_file():
        raise GenerationError(f"{out_dir} has no index.json: not a generation output folder")
    index = json.loads(path.read_text())
    for key, item in index.get("items", {}).items():
        for field in ("image", "mask"):
            if not (out_dir / item[field]).is_file():
                raise GenerationError(f"{path}: item {key} points to a missing file {item[field]}")
    return index
