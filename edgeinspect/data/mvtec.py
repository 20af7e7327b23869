"""MVTec-AD layout folder datasets: train/good, test/<type>, ground_truth/<type>/<name>_mask.png.

Images are read with OpenCV, grayscale replicated to three channels, resized to the model's square
input (area interpolation when shrinking, cubic when enlarging); masks are resized with nearest
neighbour so they stay binary. Tensors follow the project's convention: float images in [-1, 1],
(3, H, W); masks bool (H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset folder that does not follow the MVTec layout, or an unreadable file."""


def read_image(path: str | Path) -> np.ndarray:
    """Any image file as uint8 RGB (H, W, 3); grayscale and 16-bit inputs are converted."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"cannot read image {path}")
    return to_rgb_uint8(img, source=str(path))


def to_rgb_uint8(img: np.ndarray, source: str = "image") -> np.ndarray:
    """Normalise a decoded frame (gray, BGR, BGRA, uint8 or uint16) to uint8 RGB."""
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DatasetError(f"{source}: unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise DatasetError(f"{source}: unsupported image shape {img.shape}")


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def read_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask file as a bool (H, W) array at its own size (defect: grey value > 127)."""
    raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if raw is None:
        raise DatasetError(f"cannot read mask {path}")
    return raw > 127


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [-1, 1] -> uint8 RGB (H, W, 3)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def name_keys(defect_type: str, path: str | Path) -> tuple[str, str, str]:
    """The names an image answers to in a name list (exclude files, selections): its file name,
    "<type>/<name>", or its path as given."""
    path = Path(path)
    return path.name, f"{defect_type}/{path.name}", str(path)


@dataclass(frozen=True)
class Sample:
    path: Path
    defect_type: str  # "good" for normals
    mask_path: Path | None

    @property
    def label(self) -> int:
        return int(self.defect_type != "good")


class MVTecFolder:
    """One category in MVTec layout. `split` is "train" or "test"."""

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 256,
                 defect_types: list[str] | None = None, exclude: set[str] | None = None,
                 include: set[str] | None = None, mask_size: int | None = None):
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        # Masks at another size than the images: a detector whose frames are read larger than its maps
        # (config.frame_size) is scored against masks at its maps' size.
        self.mask_size = mask_size or image_size
        if split not in ("train", "test"):
            raise DatasetError(f"split must be 'train' or 'test', not {split!r}")
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DatasetError(
                f"{self.root} is not an MVTec-layout folder: missing {split}/ "
                "(expected train/good, test/<type>, ground_truth/<type>/<name>_mask.png)"
            )
        images = {d.name: _list_images(d) for d in sorted(split_dir.iterdir()) if d.is_dir()}
        types = list(images)
        if split == "train" and "good" not in types:
            raise DatasetError(f"{split_dir} has no good/ folder of normal images")
        if defect_types is not None:
            missing = set(defect_types) - set(types)
            if missing:
                raise DatasetError(f"{split_dir} has no folder(s) {sorted(missing)}; found {types}")
            types = [t for t in types if t in defect_types]

        exclude = exclude or set()
        if exclude:
            # an entry that names no image (of any type) would silently leave a seen image in an evaluation
            unknown = sorted(exclude - {k for t, ps in images.items() for p in ps for k in name_keys(t, p)})
            if unknown:
                raise DatasetError(f"{split_dir}: {len(unknown)} excluded name(s) match no image "
                                   f"(expected <name>, <type>/<name> or a path): {unknown[:8]}")
        samples: list[Sample] = []
        for t in types:
            for p in images[t]:
                if not exclude.isdisjoint(name_keys(t, p)):
                    continue
                if include is not None and p.name not in include:
                    continue
                mask = None
                if t != "good":
                    mask = self.root / "ground_truth" / t / f"{p.stem}_mask.png"
                    if not mask.is_file():
                        raise DatasetError(f"no ground-truth mask for {p}: expected {mask}")
                samples.append(Sample(p, t, mask))
        if include is not None:
            missing = sorted(include - {s.path.name for s in samples})
            if missing:
                raise DatasetError(f"{split_dir}: images asked for but not found: {missing[:8]}")
        if not samples:
            raise DatasetError(f"no images found under {split_dir}")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 RGB image at image_size, bool mask at mask_size); the mask is all False for normals."""
        s = self.samples[i]
        img = resize_image(read_image(s.path), self.image_size)
        if s.mask_path is None:
            mask = np.zeros((self.mask_size, self.mask_size), bool)
        else:
            mask = resize_mask(read_mask(s.mask_path), self.mask_size)
        return img, mask

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All samples in memory: uint8 images (N,3,H,W), bool masks (N,H,W), labels (N,)."""
        imgs, masks = zip(*(self.load(i) for i in range(len(self))))
        images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
        return images, torch.from_numpy(np.stack(masks)), torch.tensor([s.label for s in self.samples])


def uint8_to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)
