"""Synthetic anomalies for GLAD's anomaly-oriented training (DRAEM-style).

A Perlin-noise mask (lattice 2^a x 2^b cells, a and b drawn from the configured scale range,
rotated by a random angle, thresholded), optionally intersected with an Otsu foreground, is filled
with a source — a procedural texture, another training image, or the image itself with its grid
shuffled — blended with factor beta: x_a = x (1 - M) + M ((1 - beta) source + beta x).

Everything draws from a `numpy.random.Generator` passed in, so a seed fixes every sample. Images
are uint8 RGB (H, W, 3), masks bool (H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edgeinspect.config import SyntheticAnomalyConfig

SOURCES = ("texture", "image", "shuffle")


# --------------------------------------------------------------------------- Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise with `res` lattice cells per axis, float32 (H, W), about [-1, 1].

    Generated on a grid padded up to a multiple of `res` and cropped, so any shape works."""
    h, w = shape
    ry, rx = res
    ph, pw = -(-h // ry) * ry, -(-w // rx) * rx
    dy, dx = ph // ry, pw // rx
    angles = 2 * np.pi * rng.random((ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    yy = (np.arange(ph) % dy + 0.5) / dy  # position inside the cell, in (0, 1)
    xx = (np.arange(pw) % dx + 0.5) / dx
    fy, fx = np.meshgrid(yy, xx, indexing="ij")
    cy = np.arange(ph) // dy
    cx = np.arange(pw) // dx

    def corner(oy: int, ox: int) -> np.ndarray:
        g = grads[cy[:, None] + oy, cx[None, :] + ox]  # (ph, pw, 2)
        return g[..., 0] * (fy - oy) + g[..., 1] * (fx - ox)

    ty, tx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - tx) + corner(0, 1) * tx
    bottom = corner(1, 0) * (1 - tx) + corner(1, 1) * tx
    out = math.sqrt(2) * (top * (1 - ty) + bottom * ty)
    return out[:h, :w].astype(np.float32)


def rotate_field(field: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate a 2-D field about its centre (counter-clockwise, degrees), reflecting at the border
    so the corners are noise too rather than a constant fill."""
    if angle_deg == 0:
        return field.copy()
    h, w = field.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), float(angle_deg), 1.0)
    return cv2.warpAffine(field, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


@dataclass
class PerlinMask:
    mask: np.ndarray  # bool (H, W)
    noise: np.ndarray  # the rotated field the mask thresholds
    scale: tuple[int, int]  # lattice cells per axis
    angle: float  # degrees


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, min_scale: int = 0, max_scale: int = 5,
                threshold: float = 0.3, max_rotation: float = 90.0) -> PerlinMask:
    """A thresholded, rotated Perlin field. The draws (scale, gradients, angle) are in a fixed order,
    so with max_rotation=0 the same generator state gives the same field unrotated."""
    ey = int(rng.integers(min_scale, max_scale + 1))
    ex = int(rng.integers(min_scale, max_scale + 1))
    scale = (2**ey, 2**ex)
    noise = perlin_noise(shape, scale, rng)
    angle = float(rng.uniform(-max_rotation, max_rotation)) if max_rotation > 0 else 0.0
    noise = rotate_field(noise, angle)
    return PerlinMask(noise > threshold, noise, scale, angle)


# --------------------------------------------------------------------------- foreground


def otsu_foreground(image: np.ndarray, min_fraction: float = 0.05) -> np.ndarray:
    """Foreground of an object image: Otsu threshold of the blurred gray image, with the polarity
    chosen so that most of the border is background, then opened/closed and hole-filled. When the
    result is implausible (below `min_fraction`, or almost everything) the whole image is returned,
    which is the right answer for texture-like categories."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    h, w = gray.shape
    k = max(3, (min(h, w) // 32) | 1)
    blurred = cv2.GaussianBlur(gray, (k, k), 0)
    _, th = cv2.threshold(blurred, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    border = np.concatenate([th[0], th[-1], th[:, 0], th[:, -1]])
    fg = th == 0 if border.mean() > 0.5 else th == 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, kernel)
    # fill holes: everything not reachable from the border through background is foreground
    flood = np.pad(1 - fg, 1, constant_values=1).astype(np.uint8)
    cv2.floodFill(flood, None, (0, 0), 2)
    fg = (flood[1:-1, 1:-1] != 2)
    frac = float(fg.mean())
    if frac < min_fraction or frac > 0.98:
        return np.ones((h, w), bool)
    return fg


# --------------------------------------------------------------------------- sources


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random colour texture (uint8 RGB): fractal Perlin noise, stripes, a checkerboard or
    scratches/blobs — stand-ins for an external texture set, which is not available offline."""
    h, w = shape
    kind = int(rng.integers(4))
    c0, c1 = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    if kind == 0:  # fractal Perlin noise, a colour ramp between two colours
        t = np.zeros((h, w), np.float32)
        amp = 1.0
        for octave in range(int(rng.integers(2, 5))):
            r = 2 ** (octave + int(rng.integers(0, 3)))
            t += amp * perlin_noise((h, w), (r, r), rng)
            amp *= 0.5
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif kind == 1:  # oriented sinusoidal stripes
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(3, max(4.0, min(h, w) / 4))
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period
                               + rng.uniform(0, 2 * np.pi))
    elif kind == 2:  # rotated checkerboard
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta = rng.uniform(0, np.pi / 2)
        cell = rng.uniform(3, max(4.0, min(h, w) / 6))
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    else:  # scratches and blobs on a flat background
        canvas = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(3, 12))):
            p0 = (int(rng.integers(w)), int(rng.integers(h)))
            if rng.random() < 0.5:
                p1 = (int(rng.integers(w)), int(rng.integers(h)))
                cv2.line(canvas, p0, p1, float(rng.uniform(0.3, 1)), int(rng.integers(1, max(2, min(h, w) // 16))))
            else:
                cv2.circle(canvas, p0, int(rng.integers(2, max(3, min(h, w) // 6))), float(rng.uniform(0.3, 1)), -1)
        t = cv2.GaussianBlur(canvas, (3, 3), 0)
    out = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def shuffle_grid(image: np.ndarray, grid: int, rng: np.random.Generator) -> np.ndarray:
    """The image cut into grid x grid equal blocks, the blocks permuted. A remainder strip at the
    bottom/right (size not divisible by grid) stays in place."""
    h, w = image.shape[:2]
    bh, bw = h // grid, w // grid
    if bh == 0 or bw == 0:
        return image.copy()
    out = image.copy()
    region = image[: bh * grid, : bw * grid]
    blocks = region.reshape(grid, bh, grid, bw, *image.shape[2:]).swapaxes(1, 2).reshape(grid * grid, bh, bw,
                                                                                         *image.shape[2:])
    blocks = blocks[rng.permutation(grid * grid)]
    out[: bh * grid, : bw * grid] = blocks.reshape(grid, grid, bh, bw, *image.shape[2:]).swapaxes(1, 2).reshape(
        region.shape)
    return out


# --------------------------------------------------------------------------- synthesis


@dataclass
class SyntheticAnomaly:
    image: np.ndarray  # uint8 RGB (H, W, 3)
    mask: np.ndarray  # bool (H, W); all False for a clean sample
    clean: bool
    source: str | None = None
    beta: float | None = None
    angle: float | None = None


def blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """x (1 - M) + M ((1 - beta) source + beta x), rounded back to uint8."""
    x = image.astype(np.float32)
    m = mask.astype(np.float32)[..., None]
    out = x * (1 - m) + m * ((1 - beta) * source.astype(np.float32) + beta * x)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class AnomalySynthesizer:
    """Draws clean or anomalous versions of training images (config: `train.anomalies`).

    `pool` (N, H, W, 3) uint8 holds the training images that serve as the "other image" source."""

    def __init__(self, cfg: SyntheticAnomalyConfig, pool: np.ndarray | None = None):
        self.cfg = cfg
        self.pool = pool
        names = [s for s in SOURCES if cfg.sources.get(s, 0.0) > 0]
        weights = np.array([cfg.sources[s] for s in names], np.float64)
        self.source_names = names
        self.source_p = weights / weights.sum()

    def mask(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """A Perlin mask (intersected with the foreground when configured) with at least
        min_mask_fraction of the image set, redrawn up to max_tries times; (mask, angle)."""
        c = self.cfg
        h, w = image.shape[:2]
        fg = otsu_foreground(image, c.foreground_min_fraction) if c.foreground == "otsu" else None
        best, best_angle = np.zeros((h, w), bool), 0.0
        for _ in range(c.max_tries):
            pm = perlin_mask((h, w), rng, c.perlin_min_scale, c.perlin_max_scale, c.perlin_threshold, c.max_rotation)
            m = pm.mask if fg is None else pm.mask & fg
            if m.sum() > best.sum():
                best, best_angle = m, pm.angle
            if m.mean() >= c.min_mask_fraction:
                break
        return best, best_angle

    def source(self, name: str, image: np.ndarray, rng: np.random.Generator, index: int | None) -> np.ndarray:
        h, w = image.shape[:2]
        if name == "image" and self.pool is not None and len(self.pool) > 1:
            choices = len(self.pool) - (1 if index is not None else 0)
            j = int(rng.integers(choices))
            if index is not None and j >= index:
                j += 1  # any image but this one
            other = self.pool[j]
            if other.shape[:2] != (h, w):
                other = cv2.resize(other, (w, h), interpolation=cv2.INTER_AREA)
            k = int(rng.integers(4))
            return np.ascontiguousarray(np.rot90(other, k) if h == w else (other[::-1, ::-1] if k % 2 else other))
        if name == "shuffle":
            return shuffle_grid(image, self.cfg.shuffle_grid, rng)
        return procedural_texture((h, w), rng)

    def __call__(self, image: np.ndarray, rng: np.random.Generator, index: int | None = None,
                 force: bool = False) -> SyntheticAnomaly:
        """One sample: clean with probability clean_ratio (unless `force`), else anomalous.
        `index` is the image's position in the pool, so the "other image" source never picks it."""
        c = self.cfg
        if not force and rng.random() < c.clean_ratio:
            return SyntheticAnomaly(image.copy(), np.zeros(image.shape[:2], bool), clean=True)
        mask, angle = self.mask(image, rng)
        name = self.source_names[int(rng.choice(len(self.source_names), p=self.source_p))]
        src = self.source(name, image, rng, index)
        beta = float(rng.uniform(c.beta_low, c.beta_high)) if c.beta_high > c.beta_low else c.beta_low
        return SyntheticAnomaly(blend(image, src, mask, beta), mask, clean=not mask.any(), source=name, beta=beta,
                                angle=angle)
