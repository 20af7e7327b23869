"""Cut-paste defect composites: a real defect's pixels moved into a normal image.

The seed defect is cut along its mask, rotated and scaled by the transform `place_mask` chose, and
pasted inside the normal image's foreground. AdaBLDM's control branch trains on these composites,
and the downstream benchmark uses them as the baseline that generated defects must beat. The
returned mask is exactly the set of pasted pixels; nothing outside it changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgeinspect.data.trimap import PlacedMask, place_mask, warp_patch


@dataclass
class CutPaste:
    image: np.ndarray  # uint8 RGB (H, W, 3)
    mask: np.ndarray  # bool (H, W): the pasted pixels
    placement: PlacedMask


def cut_paste(normal_u8: np.ndarray, seed_image_u8: np.ndarray, seed_mask: np.ndarray, foreground: np.ndarray,
              rng: np.random.Generator, rotation: tuple[float, float] = (0.0, 360.0),
              scale: tuple[float, float] = (0.85, 1.15), feather: float = 0.0, tries: int = 50,
              min_shrink: float = 0.25, edge_band: int = 0, edge_turns: str = "half") -> CutPaste:
    """Paste the seed's masked pixels into `normal_u8` inside `foreground` (placement: `place_mask`,
    whose arguments these are).

    `feather` > 0 (Gaussian sigma in pixels) softens the seam by blending the pasted pixels in near
    the mask's edge; the blend ramps inward, so pixels outside the mask still stay untouched."""
    if normal_u8.ndim != 3 or normal_u8.shape[2] != 3 or normal_u8.dtype != np.uint8:
        raise ValueError(f"normal image must be uint8 RGB (H, W, 3), got {normal_u8.dtype} {normal_u8.shape}")
    if seed_image_u8.shape[:2] != np.shape(seed_mask) or seed_image_u8.shape[2:] != (3,):
        raise ValueError(f"seed image {seed_image_u8.shape} and seed mask {np.shape(seed_mask)} must be "
                         "(H, W, 3) and (H, W) of the same size")
    if normal_u8.shape[:2] != np.shape(foreground):
        raise ValueError(f"normal image {normal_u8.shape} and foreground {np.shape(foreground)} must have the same size")
    if feather < 0:
        raise ValueError(f"feather must be >= 0, got {feather}")
    placed = place_mask(seed_mask, foreground, rng, rotation, scale, tries, min_shrink, edge_band, edge_turns)
    t, l, h, w = placed.seed_box
    patch = warp_patch(seed_image_u8[t:t + h, l:l + w], placed.angle, placed.effective_scale, cv2.INTER_LINEAR,
                       placed.flip)
    ct, cl, ch, cw = placed.canvas_box
    top, left = placed.offset
    region = (slice(top, top + ch), slice(left, left + cw))
    pasted = np.zeros_like(normal_u8)
    pasted[region] = patch[ct:ct + ch, cl:cl + cw]
    image = normal_u8.copy()
    if feather == 0:
        image[placed.mask] = pasted[placed.mask]
    else:
        alpha = cv2.GaussianBlur(placed.mask.astype(np.float32), (0, 0), feather) * placed.mask
        alpha = alpha[..., None]
        image = np.clip(np.rint(alpha * pasted + (1 - alpha) * normal_u8), 0, 255).astype(np.uint8)
    return CutPaste(image, placed.mask, placed)
