"""AdaBLDM trimaps: where a defect goes, and the map that tells the control branch.

A trimap is 1 on the defect mask, 0.5 on the rest of the object foreground and 0 elsewhere. The
defect mask is a real seed mask cropped to its bounding box, rotated and scaled at random, and moved
(shrunk when it must be) so that it lies wholly inside the foreground. The transform is recorded in
a `PlacedMask`, so a cut-paste composite can move the seed's pixels with exactly the same warp.

Edge defects (`edge_band` > 0): a seed mask reaching within `edge_band` px of its picture's frame is
a defect of the part's edge (a chipped tile edge, a crack running off it). Placed anywhere, it would
become a blob or a stub in mid-part that no real part shows; so it is mirrored and/or turned by 180
degrees (`edge_turns` "half": the defect stays on an edge parallel to its own, and a texture's grain
keeps its direction) or by any multiple of 90 degrees ("quarter"), and placed where the pixels that
touched the frame lie along the target foreground's edge (the frame, or the object's boundary).
Other seeds are placed as before.

Foregrounds: "whole" (textures, tiles), "otsu" (`anomalies.otsu_foreground`) or "features" (two-way
k-means of pretrained features with the border-is-background prior, edges refined by GrabCut). Images are uint8 RGB (H, W, 3),
masks bool (H, W).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch

from edgeinspect.data.anomalies import otsu_foreground
from edgeinspect.data.mvtec import image_to_tensor

ForegroundMethod = Literal["whole", "otsu", "features"]
EdgeTurns = Literal["half", "quarter"]
EDGE_TURNS = {"half": 180.0, "quarter": 90.0}  # the angle step of an edge seed's turns

TRIMAP_DEFECT = 1.0
TRIMAP_FOREGROUND = 0.5
SHRINK_STEP = 0.9  # each fitting round shrinks the mask to 90 % of the previous size
# An edge seed's placement must put at least this share of its frame-contact pixels on the target's edge band.
EDGE_CONTACT_SHARE = 0.5


class MaskDoesNotFit(ValueError):
    """No rotation, position or allowed shrink puts the seed mask wholly inside the foreground."""


# --------------------------------------------------------------------------- foreground


def estimate_foreground(image_u8: np.ndarray, method: ForegroundMethod, extractor=None,
                        min_fraction: float = 0.05) -> np.ndarray:
    """The object's foreground as bool (H, W).

    "features" needs an `edgeinspect` FeatureExtractor with a stride-8 map (e.g.
    `build_feature_extractor("efficientnet_lite0", "default", (8,))`). A foreground smaller than
    `min_fraction` of the image is implausible: the whole image is returned, with a warning."""
    if image_u8.ndim != 3 or image_u8.shape[2] != 3 or image_u8.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image_u8.dtype} {image_u8.shape}")
    h, w = image_u8.shape[:2]
    if method == "whole":
        return np.ones((h, w), bool)
    if method == "otsu":
        return otsu_foreground(image_u8, min_fraction)
    if method != "features":
        raise ValueError(f"foreground method must be 'whole', 'otsu' or 'features', not {method!r}")
    if extractor is None:
        raise ValueError("foreground method 'features' needs a feature extractor (build_feature_extractor(..., strides=(8,)))")
    fg = _feature_foreground(image_u8, extractor)
    if fg.mean() < min_fraction:
        warnings.warn(f"feature-clustered foreground covers {fg.mean():.1%} of the image (< {min_fraction:.0%}); "
                      "using the whole image", UserWarning, stacklevel=2)
        return np.ones((h, w), bool)
    return fg


def _feature_foreground(image_u8: np.ndarray, extractor) -> np.ndarray:
    if 8 not in extractor.strides:
        raise ValueError(f"the feature extractor has strides {extractor.strides}; the foreground needs a stride-8 map")
    h, w = image_u8.shape[:2]
    with torch.no_grad():
        fmap = extractor(image_to_tensor(image_u8).unsqueeze(0))[extractor.strides.index(8)][0]
    c, fh, fw = fmap.shape
    vectors = fmap.permute(1, 2, 0).reshape(-1, c).double().numpy()
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    border = np.zeros((fh, fw), bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    split = _two_means(vectors, border.ravel())
    if split is None:  # every position alike: nothing to separate
        return np.ones((h, w), bool)
    labels, centres = split
    # the cluster that holds more of the border is the background
    background = int(labels.reshape(fh, fw)[border].mean() > 0.5)
    dist = ((vectors[:, None, :] - centres[None]) ** 2).sum(axis=2)
    # a soft margin (closer to the object's centre than to the background's), upsampled before the
    # cut, places the edge between cells rather than on the coarse grid
    margin = (dist[:, background] - dist[:, 1 - background]).reshape(fh, fw).astype(np.float32)
    coarse = cv2.resize(margin, (w, h), interpolation=cv2.INTER_LINEAR) > 0
    return _clean(_grabcut_refine(image_u8, coarse))


def _grabcut_refine(image_u8: np.ndarray, coarse: np.ndarray, iters: int = 3) -> np.ndarray:
    """Pixel-accurate edges for the feature clusters: a stride-8 cell whose receptive field touches
    the object joins the object's cluster, so the coarse foreground overshoots by about a cell.
    GrabCut, started from it as "probably foreground" and the image border as sure background,
    pulls the edge back onto the object's colours."""
    gc = np.where(coarse, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    gc[[0, -1], :] = cv2.GC_BGD
    gc[:, [0, -1]] = cv2.GC_BGD
    if not (gc == cv2.GC_PR_FGD).any():
        return coarse
    cv2.setRNGSeed(0)  # GrabCut's colour models start from a random k-means
    cv2.grabCut(np.ascontiguousarray(image_u8[:, :, ::-1]), gc, None, np.zeros((1, 65)), np.zeros((1, 65)),
                iters, cv2.GC_INIT_WITH_MASK)
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


def _two_means(x: np.ndarray, border: np.ndarray, iters: int = 30) -> tuple[np.ndarray, np.ndarray] | None:
    """Lloyd's k-means with k=2, started deterministically: one centre at the mean border vector,
    the other at the vector farthest from it. (labels, centres), or None when all vectors coincide."""
    c0 = x[border].mean(axis=0)
    far = int(np.argmax(((x - c0) ** 2).sum(axis=1)))
    if np.allclose(x[far], c0, atol=1e-6):
        return None
    centres = np.stack([c0, x[far]])
    labels = np.zeros(len(x), np.int64)
    for it in range(iters):
        dist = ((x[:, None, :] - centres[None]) ** 2).sum(axis=2)
        new = dist.argmin(axis=1)
        if it > 0 and (new == labels).all():
            break
        labels = new
        for k in range(2):
            if (labels == k).any():
                centres[k] = x[labels == k].mean(axis=0)
    return (labels, centres) if 0 < labels.sum() < len(labels) else None


def _clean(fg: np.ndarray) -> np.ndarray:
    """Open/close away speckle the size of a feature cell and fill holes enclosed by the object."""
    h, w = fg.shape
    k = max(3, (min(h, w) // 32) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    out = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    out = cv2.morphologyEx(out, cv2.MORPH_CLOSE, kernel)
    flood = np.pad(1 - out, 1, constant_values=1).astype(np.uint8)
    cv2.floodFill(flood, None, (0, 0), 2)
    return flood[1:-1, 1:-1] != 2


# --------------------------------------------------------------------------- placing a seed mask


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (top, left, height, width) of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("the mask is empty: it has no bounding box")
    return int(ys.min()), int(xs.min()), int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def affine_canvas(shape: tuple[int, int], angle: float, scale: float) -> tuple[np.ndarray, tuple[int, int]]:
    """A 2x3 matrix rotating (counter-clockwise, degrees) and scaling a (h, w) patch about its centre,
    shifted so the whole result lands in the returned (height, width) canvas. Angle 0 and scale 1
    give the identity on a canvas of the patch's own size."""
    h, w = shape
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), float(angle), float(scale))
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], np.float64)
    mapped = corners @ m.T
    lo = mapped.min(axis=0)
    span = mapped.max(axis=0) - lo
    m[:, 2] -= lo
    # the tolerance keeps an exact integer span (e.g. angle 0) from growing by a pixel
    return m, (int(math.ceil(span[1] - 1e-6)) + 1, int(math.ceil(span[0] - 1e-6)) + 1)


def warp_patch(patch: np.ndarray, angle: float, scale: float, interpolation: int, flip: bool = False) -> np.ndarray:
    """`patch` (mirrored left-right first when `flip`) through `affine_canvas`: nearest neighbour for masks (0 outside the source patch),
    linear for pixels (border replicated, so interpolation at the patch edge does not pull colours
    towards black).

    A mask's tight crop has mask pixels on every edge, so a replicated border would smear them across
    the rotated canvas's corners (streaks and parallelograms that are not in the seed). Pixels are
    used only where the mask is, so their border never shows."""
    if flip:
        patch = np.ascontiguousarray(patch[:, ::-1])
    m, (ch, cw) = affine_canvas(patch.shape[:2], angle, scale)
    border = cv2.BORDER_CONSTANT if interpolation == cv2.INTER_NEAREST else cv2.BORDER_REPLICATE
    return cv2.warpAffine(patch, m, (cw, ch), flags=interpolation, borderMode=border, borderValue=0)


@dataclass
class PlacedMask:
    """A seed mask moved into an image: `mask` bool (H, W) lies wholly inside the foreground.

    The seed's bounding-box crop `seed_box` (top, left, h, w) went through
    `warp_patch(crop, angle, scale * shrink, flip=flip)`; `canvas_box` (top, left, h, w) is the tight box
    of the result inside that canvas, and its top-left corner sits at `offset` (top, left) in the image.
    `edge` says the seed was an edge defect, placed on the foreground's edge."""

    mask: np.ndarray
    angle: float
    scale: float
    offset: tuple[int, int]
    shrink: float
    seed_box: tuple[int, int, int, int]
    canvas_box: tuple[int, int, int, int]
    flip: bool = False
    edge: bool = False

    @property
    def effective_scale(self) -> float:
        return self.scale * self.shrink

    def to_json(self) -> dict:
        return {"angle": self.angle, "scale": self.scale, "shrink": self.shrink, "offset": list(self.offset),
                "seed_box": list(self.seed_box), "canvas_box": list(self.canvas_box),
                "area": int(self.mask.sum()), "flip": self.flip, "edge": self.edge}


def transformed_seed_mask(seed_mask: np.ndarray, angle: float, scale: float, flip: bool = False
                          ) -> tuple[np.ndarray, tuple[int, int, int, int], tuple[int, int, int, int]] | None:
    """The seed mask's crop (mirrored when `flip`) rotated and scaled, cropped tight:
    (patch, seed_box, canvas_box), or None when the scale is so small that nothing is left."""
    seed_box = mask_box(seed_mask)
    t, l, h, w = seed_box
    canvas = warp_patch(seed_mask[t:t + h, l:l + w].astype(np.uint8), angle, scale, cv2.INTER_NEAREST, flip) > 0
    if not canvas.any():
        return None
    canvas_box = mask_box(canvas)
    ct, cl, chh, cww = canvas_box
    return canvas[ct:ct + chh, cl:cl + cww], seed_box, canvas_box


SIDES = ("top", "right", "bottom", "left")  # counter-clockwise rotation by 90 degrees moves each to the previous


def frame_contact(mask: np.ndarray, band: int) -> dict[str, np.ndarray]:
    """Per side of the picture's frame, the mask's pixels within `band` px of it (bool, same shape);
    sides the mask does not reach are left out (all of them when band is 0)."""
    mask = np.asarray(mask, bool)
    out = {}
    if band <= 0:
        return out
    for side in SIDES:
        near = np.zeros_like(mask)
        if side == "top":
            near[:band] = True
        elif side == "bottom":
            near[-band:] = True
        elif side == "left":
            near[:, :band] = True
        else:
            near[:, -band:] = True
        if (mask & near).any():
            out[side] = mask & near
    return out


def moved_side(side: str, angle: float, flip: bool) -> str:
    """Where a patch's `side` ends up after `warp_patch(..., angle, flip=flip)` with `angle` a multiple of 90."""
    if flip and side in ("left", "right"):
        side = "right" if side == "left" else "left"
    turns = int(round(angle / 90.0)) % 4  # counter-clockwise
    return SIDES[(SIDES.index(side) - turns) % 4]


def edge_band_of(foreground: np.ndarray, band: int, side: str) -> np.ndarray:
    """Foreground pixels with the foreground's edge (the picture's frame or a background pixel) within
    `band` px towards `side`: where a defect reaching that side of its patch may sit."""
    fg = np.asarray(foreground, bool)
    h, w = fg.shape
    padded = np.pad(fg, band, constant_values=False)
    dy, dx = {"top": (-1, 0), "bottom": (1, 0), "left": (0, -1), "right": (0, 1)}[side]
    out = np.zeros_like(fg)
    for d in range(1, band + 1):
        out |= ~padded[band + d * dy:band + d * dy + h, band + d * dx:band + d * dx + w]
    return fg & out


def fitting_offsets(patch: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """All (top, left) where `patch` lies wholly inside `foreground`, as an (N, 2) int array.

    Correlating the outside-of-foreground indicator with the patch counts, for every position at
    once, the patch pixels that would fall outside; a position fits when that count is 0."""
    ph, pw = patch.shape
    fh, fw = foreground.shape
    if ph > fh or pw > fw:
        return np.zeros((0, 2), np.int64)
    outside = (~foreground).astype(np.float32)
    counts = cv2.matchTemplate(outside, patch.astype(np.float32), cv2.TM_CCORR)
    return np.argwhere(counts < 0.5)  # counts are integers up to FFT round-off


def place_mask(seed_mask: np.ndarray, foreground: np.ndarray, rng: np.random.Generator,
               rotation: tuple[float, float] = (0.0, 360.0), scale: tuple[float, float] = (0.85, 1.15),
               tries: int = 50, min_shrink: float = 0.25, edge_band: int = 0,
               edge_turns: EdgeTurns = "half") -> PlacedMask:
    """A random rotation and scale of the seed mask, placed uniformly among the positions where it lies
    wholly inside the foreground.

    `tries` (angle, scale) pairs are drawn up front (so the generator advances by the same amount
    every call); the first that fits anywhere is used. When none fits, the mask is shrunk by steps of
    0.9 down to `min_shrink`, trying every pair again at each size; past that, MaskDoesNotFit.

    `edge_band` > 0 and a seed reaching within that many px of its frame (an edge defect, module
    docstring): the angles are multiples of 90 degrees, each pair mirrored or not at random, and a
    position fits only when, besides lying inside the foreground, at least half of the seed's
    frame-contact pixels fall within `edge_band` px of the foreground's edge. Other seeds draw
    exactly as with `edge_band` 0. `edge_turns` "half": the angles are 0 or 180 (with the mirror: the
    four symmetries that keep the defect's axis); "quarter": any multiple of 90."""
    seed_mask = np.asarray(seed_mask, bool)
    foreground = np.asarray(foreground, bool)
    if seed_mask.ndim != 2 or foreground.ndim != 2:
        raise ValueError(f"seed mask and foreground must be 2-D bool masks, got shapes {seed_mask.shape} "
                         f"and {foreground.shape}")
    if not seed_mask.any():
        raise ValueError("the seed mask is empty: there is no defect to place")
    if not foreground.any():
        raise ValueError("the foreground is empty: there is nowhere to place a defect")
    if tries < 1 or not 0 < min_shrink <= 1:
        raise ValueError(f"tries must be >= 1 and min_shrink in (0, 1], got {tries} and {min_shrink}")
    if edge_band < 0 or edge_turns not in EDGE_TURNS:
        raise ValueError(f"edge_band must be >= 0 and edge_turns one of {EDGE_TURNS}, got {edge_band} and "
                         f"{edge_turns!r}")
    contact = frame_contact(seed_mask, edge_band)
    edge = bool(contact)
    if edge:
        angles = EDGE_TURNS[edge_turns] * rng.integers(0, 360 // EDGE_TURNS[edge_turns], tries)
        flips = rng.random(tries) < 0.5
        bands = {side: edge_band_of(foreground, edge_band, side).astype(np.float32) for side in SIDES}
    else:
        angles = rng.uniform(rotation[0], rotation[1], tries)
        flips = np.zeros(tries, bool)
    scales = rng.uniform(scale[0], scale[1], tries)
    shrink = 1.0
    while shrink >= min_shrink - 1e-9:
        for angle, s, flip in zip(angles, scales, flips):
            moved = transformed_seed_mask(seed_mask, float(angle), float(s) * shrink, bool(flip))
            if moved is None:
                continue
            patch, seed_box, canvas_box = moved
            offsets = fitting_offsets(patch, foreground)
            if edge and len(offsets):
                offsets = offsets[_on_edge(patch, contact, seed_box, canvas_box, float(angle), float(s) * shrink,
                                           bool(flip), bands)[offsets[:, 0], offsets[:, 1]]]
            if len(offsets):
                top, left = (int(v) for v in offsets[rng.integers(len(offsets))])
                mask = np.zeros_like(foreground)
                mask[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
                return PlacedMask(mask, float(angle), float(s), (top, left), shrink, seed_box, canvas_box,
                                  bool(flip), edge)
        shrink *= SHRINK_STEP
    t, l, h, w = mask_box(seed_mask)
    where = (f"along the foreground's edge (an edge defect: it reaches within {edge_band} px of its frame)"
             if edge else "wholly inside the foreground")
    raise MaskDoesNotFit(
        f"seed mask ({h}x{w} px bounding box, {int(seed_mask.sum())} px) does not fit {where} "
        f"({int(foreground.sum())} px of {foreground.shape[0]}x{foreground.shape[1]}) at any of "
        f"{tries} rotations/scales, even shrunk to {min_shrink:g}x: the foreground has no region that wide "
        "(pass a larger foreground, a smaller min_shrink or another seed"
        + (", or edge_band 0 to place it anywhere)" if edge else ")"))


def _on_edge(patch: np.ndarray, contact: dict[str, np.ndarray], seed_box, canvas_box, angle: float, scale: float,
             flip: bool, bands: dict[str, np.ndarray]) -> np.ndarray:
    """For every (top, left) of the placed `patch`: do enough of the seed's frame-contact pixels, moved
    with the same warp, land on the foreground's edge on the side their frame side moved to (every
    side the seed reached), and does the patch stay off the edge on every other side (a crack that ran
    off one edge must not end up running along another)? A bool map indexed like `fitting_offsets`'
    offsets."""
    t, l, h, w = seed_box
    ct, cl, ch, cw = canvas_box
    ok = np.ones((bands["top"].shape[0] - ch + 1, bands["top"].shape[1] - cw + 1), bool)
    kept = {moved_side(side, angle, flip) for side in contact}
    for side in SIDES:
        if side not in kept:
            ok &= cv2.matchTemplate(bands[side], patch.astype(np.float32), cv2.TM_CCORR) < 0.5
    for side, pixels in contact.items():
        moved = warp_patch(pixels[t:t + h, l:l + w].astype(np.uint8), angle, scale, cv2.INTER_NEAREST, flip)
        moved = moved[ct:ct + ch, cl:cl + cw].astype(np.float32)
        count = float(moved.sum())
        if count == 0:  # shrinking dropped this side's few contact pixels: nothing left to keep on an edge
            continue
        needed = max(1.0, math.ceil(EDGE_CONTACT_SHARE * count))
        ok &= cv2.matchTemplate(bands[moved_side(side, angle, flip)], moved, cv2.TM_CCORR) >= needed - 0.5
    return ok


# --------------------------------------------------------------------------- trimaps


def make_trimap(mask: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """float32 (H, W): 1 on the defect mask, 0.5 on the rest of the foreground, 0 elsewhere."""
    mask = np.asarray(mask, bool)
    foreground = np.asarray(foreground, bool)
    if mask.shape != foreground.shape or mask.ndim != 2:
        raise ValueError(f"mask {mask.shape} and foreground {foreground.shape} must be 2-D of the same shape")
    outside = int((mask & ~foreground).sum())
    if outside:
        raise ValueError(f"the defect mask has {outside} px outside the foreground; a trimap needs it inside "
                         "(place it with place_mask)")
    trimap = np.where(foreground, TRIMAP_FOREGROUND, 0.0).astype(np.float32)
    trimap[mask] = TRIMAP_DEFECT
    return trimap


def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask grown by `pixels` in every direction (elliptic structuring element)."""
    if pixels < 0:
        raise ValueError(f"pixels must be >= 0, got {pixels}")
    mask = np.asarray(mask, bool)
    if pixels == 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0
