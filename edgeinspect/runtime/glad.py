"""GLAD inference: adaptive denoising steps (ADP) with spatial-adaptive feature fusion (SAFF), then
multi-layer min-over-positions feature scoring.

Written against named networks (`vae_encoder`, `unet_plain`, `vae_decoder`, `features`, and `bank_distance`
for the bank and hybrid references), so the same loop runs on torch, onnxruntime or TensorRT networks.
scoring.reference "bank" skips ADP, SAFF and the reconstruction (no diffusion: the firing record reads
"never fired"); "hybrid" adds the bank's map of the input to the final map (runtime/bank.py).

`unet_plain` is its own role (sample, timestep, encoder_hidden_states) -> noise_pred rather than
the `unet` role with an optional hint: one role, one fixed signature, so export, manifests and
backends never need method-dependent graph inputs, and a GLAD loop handed a DiAD bundle (or the
reverse) fails at construction by role name instead of mid-frame on a missing input.

Per frame (every frame of a batch independently):
  z0 = encoder(x); eps = seeded noise (the same for every frame); z = q(z0, T0, eps)
  for t in DDIM timesteps from T0 down:
    trajectory clean estimate c_traj = clean(z, unet(z, t))
    until the frame has fired:
      input-derived estimate c_in = clean(q(z0, t, eps), unet(q(z0, t, eps), t))
      decode both; m = min over positions of the trajectory's image of (1 - cos) of extractor
      features at each position of the input-derived image (summed over layers, blurred)
      (inference.adp_space "latent": m = RMS over channels of c_in - c_traj per latent position,
      upsampled; no decode, no extractor)
      score = mean of the top-K of m
      fire if score > threshold or t < min_step:
        fused = w(m) c_traj + (1 - w(m)) c_in     (w: monotone map of m to [0, 1], latent size)
        z = q(fused, t, eps)                      (SAFF: same noise, so the noise is consistent)
    z = DDIM step from t with unet(z, t)
  reconstruction = decode(z); final map/score as above between the input (or, with
  scoring.reference = vae_roundtrip, decode(z0)) and the reconstruction.
With `inference.draws` = n > 1 the loop runs n times from the same z0 with the noise of seeds seed,
seed + 1, ..., and the final map is the mean of the n maps (the image score: its top-K mean): a frame's
score then depends less on one noise draw, at n times the ADP compute. The draws run as one batch of
n x B rows (rows never interact), so they cost the network calls of one draw: on a GPU, where a step of
a small model is bound by kernel launches, far less than n separate runs; memory grows n-fold. The
input's features for the final maps are extracted once for all draws.

At the first step the trajectory *is* the input noised with eps, so both estimates are identical;
the check is skipped there unless t0 < min_step forces firing. With `inference.check_every` = k only
every k-th step is checked (and any step below min_step); `scoring.adp_feature_size` sets the
extractor input size for the checks. Both trade firing resolution for latency.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from edgeinspect.config import GLADInferenceConfig, GLADScoringConfig
from edgeinspect.core.ddim import DDIM, seeded_noise
from edgeinspect.core.networks import Networks
from edgeinspect.runtime.bank import NormalBank, hybrid_maps
from edgeinspect.runtime.scoring import gaussian_blur, topk_mean_score
from edgeinspect.core.timing import StageTimer
from edgeinspect.runtime.pipeline import DetectorLoop
from edgeinspect.runtime.postprocess import attach_verdicts

STAGES = ("encode", "denoise", "adp_unet", "adp_decode", "adp_features", "adp_scoring", "saff", "decode",
          "features", "scoring")
ADP_STAGES = ("adp_unet", "adp_decode", "adp_features", "adp_scoring", "saff")

ROLES = ("vae_encoder", "unet_plain", "vae_decoder", "features")


# --------------------------------------------------------------------------- scoring


def min_cosine_distance_map(a: torch.Tensor, b: torch.Tensor, chunk_mb: float = 64.0) -> torch.Tensor:
    """For each position of `a` (B, C, h, w): min over every position of `b` (B, C, h', w') of
    1 - cos over channels. (B, h, w). The (hw x h'w') similarity is built in row chunks of at most
    `chunk_mb` MiB, so large feature maps never need it whole."""
    bsz, c, h, w = a.shape
    an = F.normalize(a.float().flatten(2), dim=1, eps=1e-6)  # (B, C, N)
    bn = F.normalize(b.float().flatten(2), dim=1, eps=1e-6)  # (B, C, M)
    n, m = an.shape[-1], bn.shape[-1]
    rows = max(1, int(chunk_mb * 2**20 // (4 * m)))
    out = an.new_empty(bsz, n)
    for i in range(bsz):
        bt = bn[i]
        for s in range(0, n, rows):
            sim = an[i, :, s:s + rows].transpose(0, 1) @ bt  # (rows, M)
            out[i, s:s + rows] = 1 - sim.amax(dim=1)
    return out.view(bsz, h, w).clamp_(min=0)


def min_cosine_distance_maps(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor], size: tuple[int, int],
                             chunk_mb: float = 64.0) -> torch.Tensor:
    """Sum over layers of the min-over-positions (1 - cos) maps, each bilinearly upsampled: (B, H, W)."""
    total = None
    for a, b in zip(feats_a, feats_b, strict=True):
        d = min_cosine_distance_map(a, b, chunk_mb).unsqueeze(1)
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        total = d if total is None else total + d
    assert total is not None, "no feature levels"
    return total.squeeze(1)


def latent_difference_maps(a: torch.Tensor, b: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The latent ADP check's map: at each latent position the RMS over channels of a - b (latents
    (B, C, h, w)), upsampled bilinearly to `size`: (B, H, W). Both estimates come from the same noised
    input, so they are aligned and no search over positions is needed."""
    d = (a.float() - b.float()).pow(2).mean(dim=1, keepdim=True).sqrt()
    return F.interpolate(d, size=size, mode="bilinear", align_corners=False).squeeze(1)


# --------------------------------------------------------------------------- SAFF


def latent_map(maps: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Anomaly maps (B, H, W) area-averaged to latent size: (B, 1, h, w), what SAFF's weight maps."""
    return F.adaptive_avg_pool2d(maps.unsqueeze(1).float(), latent_size)


def fusion_weight(maps: torch.Tensor, latent_size: tuple[int, int], mode: str = "minmax", low: float = 0.0,
                  high: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """w(m): the anomaly maps (B, H, W) area-averaged to latent size and mapped monotonically to
    [0, 1]: per frame min-max ("minmax") or [low, high] -> [0, 1] ("linear"); then ** gamma. (B,1,h,w)."""
    m = latent_map(maps, latent_size)
    if mode == "minmax":
        lo = m.amin(dim=(1, 2, 3), keepdim=True)
        hi = m.amax(dim=(1, 2, 3), keepdim=True)
        w = (m - lo) / (hi - lo).clamp(min=1e-12)
    elif mode == "linear":
        w = (m - low) / (high - low)
    else:
        raise ValueError(f"unknown fusion weight mode {mode!r}")
    w = w.clamp(0, 1)
    return w.pow(gamma) if gamma != 1.0 else w


def resolve_weight_bounds(inference: GLADInferenceConfig, calibrated: tuple[float | None, float | None] | None
                          ) -> tuple[float | None, float | None]:
    """The linear SAFF weight's (low, high): inference.weight_low/high where set, else the calibrated
    ones (checkpoint or bundle). A linear weight without both, or with high <= low, is an error."""
    calibrated = calibrated if calibrated is not None else (None, None)
    low, high = (float(v) if v is not None else (None if c is None else float(c))
                 for v, c in zip((inference.weight_low, inference.weight_high), calibrated))
    if inference.weight_mode == "linear":
        if low is None or high is None:
            raise ValueError("inference.weight_mode 'linear' needs its bounds (without its bounds in the config "
                             "or calibrated in the checkpoint): set inference.weight_low and weight_high, or propose "
                             "them from normal images with `edgeinspect glad-threshold`")
        if high <= low:
            raise ValueError(f"SAFF weight bounds: weight_high {high} must exceed weight_low {low}")
    return low, high


def calibrated_space(calibration: dict | None) -> str:
    """The ADP check space a calibrated threshold / weight bounds were proposed in (checkpoint state or bundle
    manifest `adp_calibration`; calibrations from before the latent check have none: the features)."""
    return (calibration or {}).get("adp_space", "features")


def usable_calibration(inference: GLADInferenceConfig, calibration: dict | None, threshold: float | None,
                       bounds: tuple[float | None, float | None] | None
                       ) -> tuple[float | None, tuple[float | None, float | None] | None]:
    """The calibrated (threshold, weight bounds) if they were proposed in inference.adp_space, else
    (None, None) with a warning: a threshold on one check's scores means nothing on the other's."""
    space = calibrated_space(calibration)
    if space == inference.adp_space or (threshold is None and bounds is None):
        return threshold, bounds
    warnings.warn(f"the calibrated ADP threshold and SAFF weight bounds were proposed for adp_space {space!r}, "
                  f"not {inference.adp_space!r}: not used (frames fire only below min_step unless "
                  f"inference.threshold is set); propose them with `edgeinspect glad-threshold "
                  f"--set inference.adp_space={inference.adp_space}`", stacklevel=3)
    return None, None


def saff_fuse(trajectory_clean: torch.Tensor, input_clean: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The fused clean latent: the trajectory's where w = 1, the input-derived where w = 0."""
    return weight * trajectory_clean + (1 - weight) * input_clean


# --------------------------------------------------------------------------- the loop


@dataclass
class GLADResult:
    scores: torch.Tensor  # (B,)
    maps: torch.Tensor  # (B, H, W) at the input size
    reconstructions: torch.Tensor | None  # (B, 3, H, W) in [-1, 1]; None with the bank reference (none made)
    fire_step: torch.Tensor  # (B,) long: the timestep at which each frame fired, -1 if it never did
    fire_index: torch.Tensor  # (B,) long: its index in `timesteps`, -1 if never
    fire_score: torch.Tensor  # (B,) the ADP check score that fired it (NaN if never)
    fired_by_threshold: torch.Tensor  # (B,) bool: the score crossed the threshold (not only t < min_step)
    adp_scores: torch.Tensor  # (B, steps) ADP check score at each step, NaN where not checked
    fire_maps: torch.Tensor  # (B, h, w) the check map at the fire, at latent size (SAFF's input); NaN if never
    # With inference.draws > 1 the maps (and so the scores) are the mean over the draws' maps; the fields
    # above from `reconstructions` on describe the first draw (noise seed `inference.seed`). Per draw:
    draw_scores: torch.Tensor  # (B, draws) each draw's own image score
    draw_fire_steps: torch.Tensor  # (B, draws) long: the timestep at which each draw fired, -1 if never
    timesteps: list[int] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)  # per batch, by stage
    # from the pipeline's post-processor (`verdict`), None without one: "OK"/"NG" per frame, normalised scores
    verdicts: list[str] | None = None
    normalized_scores: torch.Tensor | None = None


class GLADPipeline(DetectorLoop):
    """ADP + SAFF reconstruction and feature scoring for a batch of frames (float (B,3,H,W) in [-1, 1])."""

    def __init__(self, networks: Networks, context: torch.Tensor, schedule: DDIM, inference: GLADInferenceConfig,
                 scoring: GLADScoringConfig, feature_size: int | None = None, threshold: float | None = None,
                 weight_bounds: tuple[float | None, float | None] | None = None, bank: NormalBank | None = None,
                 image_size: int | None = None, image_levels: Sequence[int] | None = None):
        super().__init__(networks, ROLES, context, schedule, inference, scoring, feature_size, bank, image_size,
                         image_levels)
        # inference.threshold wins; else the one given (calibrated); else only min_step fires.
        thr = inference.threshold if inference.threshold is not None else threshold
        self.threshold = math.inf if thr is None else float(thr)
        low, high = resolve_weight_bounds(inference, weight_bounds)
        self.weight_bounds = None if low is None or high is None else (low, high)
        self.timesteps = schedule.timesteps(inference.t0, inference.steps)

    # -- pieces
    def _unet(self, z: torch.Tensor, t: int) -> torch.Tensor:
        b = z.shape[0]
        tt = torch.full((b,), float(t), device=z.device)
        ctx = self.context.expand(b, *self.context.shape[1:])
        return self.nets["unet_plain"](sample=z, timestep=tt, encoder_hidden_states=ctx)["noise_pred"]

    def anomaly_maps(self, test: torch.Tensor, reference: torch.Tensor, timer: StageTimer, prefix: str = "",
                     feature_size: int | None = None) -> torch.Tensor:
        """Blurred multi-layer min-over-positions maps of `test` against `reference` (images), (B, H, W).
        One of the two may hold B / k rows: it stands for each of the other's k row groups (its features
        are extracted once)."""
        size = tuple(test.shape[-2:])
        nt, nr = test.shape[0], reference.shape[0]
        b = max(nt, nr)
        if b % nt or b % nr:
            raise ValueError(f"{nt} test and {nr} reference rows: one must divide the other")
        with timer(prefix + "features"):
            feats = self.features_of(torch.cat([test, reference]), feature_size or self.feature_size)
            fa = [f[:nt].repeat(b // nt, *(1,) * (f.dim() - 1)) for f in feats]
            fb = [f[nt:].repeat(b // nr, *(1,) * (f.dim() - 1)) for f in feats]
        with timer(prefix + "scoring"):
            maps = min_cosine_distance_maps(fa, fb, size, self.scoring.similarity_chunk_mb)
            maps = gaussian_blur(maps, self.scoring.blur_sigma)
        return maps

    # -- ADP + SAFF
    def encode(self, images: torch.Tensor, draws: int, timer: StageTimer) -> tuple[torch.Tensor, torch.Tensor]:
        """The input latents (B, ...) and the noise of `draws` draws stacked: draw k's rows k*B .. (k+1)*B - 1
        carry the noise of seed + k (the same for every frame)."""
        with timer("encode"):
            z0 = self.nets[self.encoder_role](image=images)["latent"]
        with timer("denoise"):
            eps = torch.cat([seeded_noise(tuple(z0.shape[1:]), self.inference.seed + k, z0.shape[0], z0.device,
                                          z0.dtype) for k in range(draws)])
        return z0, eps

    def adp_record(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The firing record of one ADP + SAFF draw (noise seed `inference.seed`) of a batch, without the
        final decode (threshold and weight calibration read only this)."""
        timer = StageTimer(self.nets.device)
        z0, eps = self.encode(images, 1, timer)
        return self.denoise(z0, eps, timer, tuple(images.shape[-2:]))

    def denoise(self, z0: torch.Tensor, eps: torch.Tensor, timer: StageTimer, size: tuple[int, int]
                ) -> dict[str, torch.Tensor]:
        """ADP + SAFF from the input latents `z0` with the noise `eps` (one per row; rows are independent) of
        frames of `size` (H, W): the final latents and the firing record (fire step/index/score, by threshold
        or not, the check score at each step, the map at the fire)."""
        inf = self.inference
        b = z0.shape[0]
        ts = self.timesteps
        dev = z0.device
        fired = torch.zeros(b, dtype=torch.bool, device=dev)
        fire_step = torch.full((b,), -1, dtype=torch.long)
        fire_index = torch.full((b,), -1, dtype=torch.long)
        fire_score = torch.full((b,), float("nan"))
        by_threshold = torch.zeros(b, dtype=torch.bool)
        adp_scores = torch.full((b, len(ts)), float("nan"))
        fire_maps = torch.full((b, *z0.shape[-2:]), float("nan"))
        with timer("denoise"):
            z = self.schedule.add_noise(z0, eps, ts[0])
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            forced = t < inf.min_step
            with timer("denoise"):
                eps_pred = self._unet(z, t)
            check = ~fired
            if not forced and (i == 0 or i % inf.check_every):
                # i == 0: the trajectory is the input noised with eps, nothing to compare
                check = torch.zeros_like(fired)
            if bool(check.any()):
                idx = check.nonzero().squeeze(1)
                with timer("adp_unet"):
                    traj_clean = self.schedule.pred_clean(z[idx], eps_pred[idx], t)
                    z_in = self.schedule.add_noise(z0[idx], eps[idx], t)
                    in_clean = self.schedule.pred_clean(z_in, self._unet(z_in, t), t)
                if inf.adp_space == "latent":
                    with timer("adp_scoring"):
                        maps = latent_difference_maps(in_clean, traj_clean, size)
                else:
                    with timer("adp_decode"):
                        dec = self.nets[self.decoder_role](latent=torch.cat([in_clean, traj_clean]))["image"].clamp(-1, 1)
                    n = idx.numel()
                    maps = self.anomaly_maps(dec[:n], dec[n:], timer, prefix="adp_",
                                             feature_size=self.scoring.adp_feature_size)
                with timer("adp_scoring"):
                    score = topk_mean_score(maps, inf.adp_top_k)
                adp_scores[idx.cpu(), i] = score.float().cpu()
                over = score > self.threshold
                fire = over | forced
                if bool(fire.any()):
                    sel = fire.nonzero().squeeze(1)
                    f = idx[sel]
                    with timer("saff"):
                        low, high = self.weight_bounds or (0.0, 1.0)
                        w = fusion_weight(maps[sel], tuple(z0.shape[-2:]), inf.weight_mode, low, high,
                                          inf.weight_gamma).to(z.dtype)
                        fused = saff_fuse(traj_clean[sel], in_clean[sel], w)
                        z_f = self.schedule.add_noise(fused, eps[f], t)
                        eps_f = self._unet(z_f, t)
                    z = z.clone()
                    z[f] = z_f
                    eps_pred = eps_pred.clone()
                    eps_pred[f] = eps_f
                    fired[f] = True
                    fc = f.cpu()
                    fire_maps[fc] = latent_map(maps[sel], tuple(z0.shape[-2:]))[:, 0].float().cpu()
                    fire_step[fc] = t
                    fire_index[fc] = i
                    fire_score[fc] = score[sel].float().cpu()
                    by_threshold[fc] = over[sel].cpu()
            with timer("denoise"):
                z, _ = self.schedule.step(z, eps_pred, t, t_prev)
        return {"latent": z, "fire_step": fire_step, "fire_index": fire_index, "fire_score": fire_score,
                "fired_by_threshold": by_threshold, "adp_scores": adp_scores, "fire_maps": fire_maps}

    def score(self, images: torch.Tensor, recon: torch.Tensor, timer: StageTimer | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores and maps of reconstructions `recon` against `images` (which may hold a divisor of
        recon's rows: the same frames for every draw's block of rows)."""
        timer = timer or StageTimer(self.nets.device)
        maps = self.anomaly_maps(images, recon, timer)
        with timer("scoring"):
            scores = topk_mean_score(maps, self.inference.top_k)
        return scores, maps

    def bank_only(self, frames: torch.Tensor, timer: StageTimer) -> GLADResult:
        """The bank reference: the frame's features against the bank, no diffusion (every draw's score is the
        frame's score; the firing record reads "never fired", with no fire maps: (B, 0, 0))."""
        b, draws, n = frames.shape[0], self.inference.draws, len(self.timesteps)
        with timer("features"):
            feats = self.bank_features(frames)
        with timer("scoring"):  # the bank search makes the map
            maps, image_maps = self.bank_maps(feats, self.map_size(frames))
        with timer("scoring"):
            scores = topk_mean_score(image_maps, self.inference.top_k).float().cpu()
        never = torch.full((b,), -1, dtype=torch.long)
        nan = torch.full((b,), float("nan"))
        return attach_verdicts(GLADResult(scores, maps.float().cpu(), None, never, never.clone(), nan,
                                          torch.zeros(b, dtype=torch.bool), torch.full((b, n), float("nan")),
                                          torch.empty(b, 0, 0), scores[:, None].repeat(1, draws),
                                          torch.full((b, draws), -1, dtype=torch.long), list(self.timesteps),
                                          timer.ms), self.verdict)

    def __call__(self, images: torch.Tensor) -> GLADResult:
        frames, timer = self.frames(images)
        if self.reference == "bank":
            return self.bank_only(frames, timer)
        images = self.model_images(frames)
        b, draws = images.shape[0], self.inference.draws
        z0, eps = self.encode(images, draws, timer)
        r = self.denoise(z0.repeat(draws, 1, 1, 1), eps, timer, tuple(images.shape[-2:]))  # all draws as one batch
        with timer("decode"):
            roundtrip = self.scoring.reference == "vae_roundtrip"
            latents = torch.cat([r["latent"], self.roundtrip_latents(images, z0)]) if roundtrip else r["latent"]
            decoded = self.nets[self.decoder_role](latent=latents)["image"].clamp(-1, 1)
            recon = decoded[:draws * b]
            reference = decoded[draws * b:] if roundtrip else images
        row_scores, maps_all = self.score(reference, recon, timer)  # the input vs each draw's reconstruction
        with timer("scoring"):
            draw_scores = row_scores.view(draws, b).T
            maps = maps_all.view(draws, b, *maps_all.shape[1:]).mean(0)
            scores = draw_scores[:, 0] if draws == 1 else topk_mean_score(maps, self.inference.top_k)
        if self.reference == "hybrid":
            with timer("features"):
                feats = self.bank_features(frames)
            with timer("scoring"):  # the bank search makes the map
                bank, _ = self.bank_maps(feats, tuple(images.shape[-2:]), image=False)  # the hybrid pools its own map
            assert self.bank is not None and self.bank.scales is not None
            with timer("scoring"):
                maps = hybrid_maps(maps, bank, self.bank.scales)
                draw_scores = topk_mean_score(hybrid_maps(maps_all, bank.repeat(draws, 1, 1), self.bank.scales),
                                              self.inference.top_k).view(draws, b).T
                scores = topk_mean_score(maps, self.inference.top_k)
        first = slice(0, b)  # the first draw's rows (noise seed inference.seed) describe the frame's firing
        return attach_verdicts(GLADResult(scores.float().cpu(), maps.float().cpu(), recon[first].float().cpu(),
                                          r["fire_step"][first], r["fire_index"][first], r["fire_score"][first],
                                          r["fired_by_threshold"][first], r["adp_scores"][first],
                                          r["fire_maps"][first], draw_scores.float().cpu(),
                                          r["fire_step"].view(draws, b).T.contiguous(), list(self.timesteps),
                                          timer.ms), self.verdict)
