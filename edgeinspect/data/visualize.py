"""Heat-map overlays and figure grids a person can look at (OpenCV only)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgeinspect.core.atomic import write_png_atomic


def heatmap_overlay(image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
                    mask: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB image + (H, W) map on a fixed [vmin, vmax] scale (so images are comparable);
    the ground-truth outline is drawn in white when a mask is given."""
    norm = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    if norm.shape != image_rgb.shape[:2]:
        norm = cv2.resize(norm.astype(np.float32), image_rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    out = cv2.addWeighted(image_rgb, 1 - alpha, heat, alpha, 0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out


def frame_and_heatmap(image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
                      mask: np.ndarray | None = None, caption: str | None = None) -> np.ndarray:
    """The picture every heat-map PNG shows: the frame at its own size and aspect ratio, beside the same
    frame under its anomaly map (stretched to the frame; fixed scale [vmin, vmax]: blue at vmin, red at
    and above vmax) with the true defect outlined in white; `caption` above both."""
    if mask is not None and mask.shape != image_rgb.shape[:2]:
        mask = cv2.resize(mask.astype(np.uint8), image_rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    tile = np.concatenate([image_rgb, heatmap_overlay(image_rgb, amap, vmin, vmax, mask)], axis=1)
    return tile if caption is None else label(tile, caption)


def label(img: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((18, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], axis=0)


def grid(rows: list[list[np.ndarray]], pad: int = 4) -> np.ndarray:
    """Rows of equally sized uint8 RGB tiles into one image with white padding."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, tile in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = tile
    return out


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    write_png_atomic(path, rgb[:, :, ::-1])
