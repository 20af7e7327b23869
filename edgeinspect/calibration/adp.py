"""GLAD's ADP settings from normal frames: the firing threshold (a high percentile of each frame's largest
ADP check score above min_step) and the linear SAFF weight's bounds (from the check maps at the fire).
Proposed at the end of training (stored in the checkpoint's state) and by `edgeinspect glad-threshold`."""

from __future__ import annotations

import numpy as np
import torch

from edgeinspect.runtime.glad import GLADPipeline


@torch.no_grad()
def adp_check_maxima(pipe: GLADPipeline, images: torch.Tensor, batch_size: int = 8
                     ) -> tuple[np.ndarray, np.ndarray]:
    """With firing by threshold switched off (what a normal frame shows before it is forced to fire):
    each frame's largest ADP check score over the steps at or above min_step (N,), and its check map
    at the forced fire at latent size (N, h, w), the map SAFF's weight is made from."""
    saved = pipe.threshold
    pipe.threshold = float("inf")
    out, fire_maps = [], []
    try:
        for s in range(0, len(images), batch_size):
            r = pipe.adp_record(images[s:s + batch_size].to(pipe.nets.device))
            checked = [i for i, t in enumerate(pipe.timesteps) if t >= pipe.inference.min_step]
            sc = r["adp_scores"][:, checked]
            out.append(torch.nan_to_num(sc, nan=float("-inf")).amax(dim=1) if checked else
                       torch.full((sc.shape[0],), float("nan")))
            fire_maps.append(r["fire_maps"])
    finally:
        pipe.threshold = saved
    return (torch.cat(out).cpu().numpy().astype(np.float64),
            torch.cat(fire_maps).cpu().numpy().astype(np.float64))


def propose_threshold(maxima: np.ndarray, percentile: float, margin: float) -> float:
    finite = maxima[np.isfinite(maxima)]
    if finite.size == 0:
        raise ValueError("no ADP check ran above min_step (t0 <= min_step, or one step only): nothing to calibrate")
    return float(np.percentile(finite, percentile) * margin)


def propose_weight_bounds(fire_maps: np.ndarray, percentile: float, margin: float) -> tuple[float, float]:
    """Linear SAFF weight bounds from normal frames' check maps at their fire (N, h, w): weight_low = the
    `percentile` of all their values, weight_high = weight_low x `margin`; so a normal frame keeps its
    input-derived estimate nearly everywhere and a region scoring `margin` times above it the trajectory's."""
    finite = fire_maps[np.isfinite(fire_maps)]
    if finite.size == 0:
        raise ValueError("no frame fired (min_step 0 and no threshold crossed): no check map to calibrate on")
    low = float(np.percentile(finite, percentile))
    if low <= 0:
        raise ValueError(f"the normals' check maps are {low} at the {percentile}th percentile: nothing to scale")
    return low, low * margin
