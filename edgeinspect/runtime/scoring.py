"""Feature-space anomaly maps and image scores (DiAD eqs. 9-10 and its pooled image score)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_distance_maps(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor], size: tuple[int, int]
                         ) -> torch.Tensor:
    """Sum over levels of (1 - cos) over channels, each bilinearly upsampled to `size`: (B, H, W)."""
    total = None
    for a, b in zip(feats_a, feats_b, strict=True):
        d = 1 - F.cosine_similarity(a.float(), b.float(), dim=1, eps=1e-6)
        d = F.interpolate(d.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        total = d if total is None else total + d
    assert total is not None, "no feature levels"
    return total.squeeze(1)


def gaussian_kernel1d(sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding (no dark border)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device)
    r = k.numel() // 2
    x = maps.unsqueeze(1)
    pad_h, pad_w = min(r, x.shape[-2] - 1), min(r, x.shape[-1] - 1)
    if pad_h < r or pad_w < r:  # map smaller than the kernel: replicate instead of reflect
        x = F.pad(x, (r, r, r, r), mode="replicate")
    else:
        x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.squeeze(1)


def pooled_max_score(maps: torch.Tensor, pool_size: int, iterations: int) -> torch.Tensor:
    """DiAD's image score: `iterations` x average-pool (pool_size, stride 1), then the max."""
    x = maps.unsqueeze(1)
    for _ in range(iterations):
        if min(x.shape[-2:]) < pool_size:
            break
        x = F.avg_pool2d(x, pool_size, stride=1)
    return x.flatten(1).amax(dim=1)


def topk_mean_score(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the K largest pixels per map (GLAD's image score)."""
    flat = maps.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)
