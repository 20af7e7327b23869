"""The anchored autoencoder: a fixed linear code of the image plus learnt residuals.

A linear code that keeps as many values as the latent is a strong start for industrial textures: on
MTD at 128 px a plain area downscale + bicubic upscale beat the from-scratch KL autoencoders holding
the same number of values by 2.5-4.4 dB, and the block PCA of the training images beats that resize
by another 3.7 dB (benchmarks/results/autoencoder_mtd.md). So the autoencoder starts from such a
code instead of competing with it (the shortcut of residual autoencoding, as DC-AE does):

    encode(x) = A(x) + E(x) - shift
    decode(z) = A*(z + shift) + D(z + shift)

A (`anchor`) is one of two linear codes, each holding exactly the latent's number of values:
- "pca" (the default): every f x f block of the image (f = the autoencoder's downsampling factor)
  is coded by its `latent_channels` leading principal components, fitted once on the training
  images before the residuals train (`fit_anchor`); A* is the transpose (the PCA reconstruction).
  Orthonormal, so the latent keeps the image's Euclidean geometry, as the resize does.
- "resize": the area downscale folded into channels (pixel_unshuffle); A* is the bicubic upscale.
  Needs no fitting; what checkpoints written before the PCA anchor hold.

E and D are a diffusers `AutoencoderKL`'s encoder and decoder with their last convolutions
zero-initialised, so an untrained model *is* the anchor's code and training can only add detail
to it. With `grey`, the image's channel mean is coded (industrial cameras are mostly monochrome;
three identical channels would spend three times the values) and the decoded grey image is repeated
to three channels, so every caller still sees 3-channel images in [-1, 1].

`shift` is the training latents' mean (set with the scaling factor after training): the resize
anchor's code is a picture, not zero-mean, and the diffusion model should see centred latents. The
class is a subclass of `AutoencoderKL`, so checkpoints, `from_config`, ONNX export and decoder
adaptation (`post_quant_conv` + `decoder`, with the anchor's decode added) treat it like any
diffusers autoencoder.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput

from edgeinspect.config import anchor_layout


class Anchor(nn.Module):
    """The non-learnt half of the anchored autoencoder: a linear code of the image as a latent and
    back, the latent shift, and the grey <-> 3-channel conversion. A module of its own so that decoder
    adaptation (runtime/adaptation.py) can carry it beside the decoder it trains."""

    def __init__(self, grey: bool):
        super().__init__()
        self.grey = grey
        # A buffer, not a config entry, so that it travels with the weights in every checkpoint.
        self.register_buffer("latent_shift", torch.zeros(()))

    def image_in(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True) if self.grey else x

    def image_out(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 3, 1, 1) if self.grey else x

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Fit the code to coded images (grey or colour, [-1, 1]); codes that need no fitting ignore it."""


class ResizeAnchor(Anchor):
    """The equal-size resize: area downscale by r, folded k x k into channels; bicubic upscale back."""

    def __init__(self, k: int, r: int, grey: bool):
        super().__init__(grey)
        self.k, self.r = k, r

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Coded image (grey or colour) -> the resize folded into latent channels (unshifted)."""
        small = F.avg_pool2d(x, self.r) if self.r > 1 else x
        return F.pixel_unshuffle(small, self.k) if self.k > 1 else small

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Unshifted latent -> the bicubic upscale of the resize it holds (coded channels)."""
        small = F.pixel_shuffle(raw, self.k) if self.k > 1 else raw
        if self.r > 1:
            small = F.interpolate(small, scale_factor=self.r, mode="bicubic", align_corners=False)
        return small


def block_dct_basis(f: int, channels: int, components: int) -> torch.Tensor:
    """The orthonormal 2-D DCT-II kernels of f x f blocks, lowest frequency (u + v, then u) first,
    each frequency for every channel in turn: (components, channels, f, f)."""
    n = torch.arange(f, dtype=torch.float64)
    cos = torch.cos(torch.pi * (2 * n[None] + 1) * n[:, None] / (2 * f)) * (2 / f) ** 0.5  # (u, x)
    cos[0] /= 2 ** 0.5
    order = sorted(((u, v) for u in range(f) for v in range(f)), key=lambda uv: (uv[0] + uv[1], uv[0]))
    kernels = []
    for u, v in order:
        for c in range(channels):
            k = torch.zeros(channels, f, f, dtype=torch.float64)
            k[c] = torch.outer(cos[u], cos[v])
            kernels.append(k)
    return torch.stack(kernels[:components]).float()


class BlockPCAAnchor(Anchor):
    """Each f x f block's leading principal components (centred): a stride-f convolution whose
    kernels are the components, and its transpose back. Until `fit`, the basis is the block DCT's
    lowest frequencies (JPEG's transform, data-independent), so an unfitted anchor still codes."""

    def __init__(self, f: int, image_channels: int, components: int, grey: bool):
        super().__init__(grey)
        self.f = f
        dim = image_channels * f * f
        if components > dim:
            raise ValueError(f"a block PCA of {image_channels}-channel {f}x{f} blocks has at most {dim} "
                             f"components, not {components}")
        self.register_buffer("basis", block_dct_basis(f, image_channels, components))
        self.register_buffer("block_mean", torch.zeros(1, image_channels, f, f))

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """The blocks' mean and the leading eigenvectors of their covariance (float64 sums). Each
        eigenvector's sign is fixed (largest entry positive), so the same images give the same basis."""
        k, c, f = self.basis.shape[0], self.basis.shape[1], self.f
        dim = c * f * f
        total, outer, n = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64), 0
        for x in batches:
            if x.shape[1] != c or x.shape[-1] % f or x.shape[-2] % f:
                raise ValueError(f"block PCA fit: images must have {c} channels and sides divisible by {f}, "
                                 f"got {tuple(x.shape)}")
            p = F.unfold(x.double().cpu(), f, stride=f).transpose(1, 2).reshape(-1, dim)
            total += p.sum(0)
            outer += p.T @ p
            n += len(p)
        if n < k:
            raise ValueError(f"block PCA fit: {n} blocks cannot give {k} components")
        mean = total / n
        _, vectors = torch.linalg.eigh(outer / n - torch.outer(mean, mean))
        basis = vectors[:, -k:].flip(1).T  # (k, dim), largest variance first
        sign = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
        basis = basis * sign
        self.basis.copy_(basis.reshape(k, c, f, f).to(self.basis))
        self.block_mean.copy_(mean.reshape(1, c, f, f).to(self.block_mean))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Coded image -> each block's components (unshifted): the block mean's components as a bias."""
        bias = self.basis.flatten(1) @ self.block_mean.flatten()
        return F.conv2d(x, self.basis, -bias.to(x.dtype), stride=self.f)

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Unshifted latent -> the blocks its components reconstruct (coded channels)."""
        mean = self.block_mean.to(raw.dtype).repeat(1, 1, *raw.shape[-2:])
        return F.conv_transpose2d(raw, self.basis, stride=self.f) + mean


class AnchoredAutoencoderKL(AutoencoderKL):
    """A diffusers KL autoencoder whose code and output are residuals over a linear code of equal size."""

    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        layers_per_block: int = 1,
        latent_channels: int = 4,
        norm_num_groups: int = 16,
        sample_size: int = 128,
        scaling_factor: float = 1.0,
        grey: bool = True,
        # "pca" or "resize"; a config written before the PCA anchor has none: resize. (Not named
        # `anchor`: diffusers would answer `self.anchor` from the config instead of the module.)
        anchor_kind: str = "resize",
    ):
        channels = 1 if grey else 3
        n = len(block_out_channels)
        super().__init__(
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
        )
        self.register_to_config(grey=grey, kind="anchored", anchor_kind=anchor_kind)
        f = 2 ** (n - 1)
        if anchor_kind == "pca":
            self.anchor: Anchor = BlockPCAAnchor(f, channels, latent_channels, grey)
        elif anchor_kind == "resize":
            self.anchor = ResizeAnchor(*anchor_layout(latent_channels, channels, f), grey)
        else:
            raise ValueError(f"anchor_kind must be 'pca' or 'resize', not {anchor_kind!r}")
        # Zero residuals: the untrained model is exactly the anchor's code (its log-variance is 0 too, so a
        # posterior *sample* would add unit noise: this autoencoder is trained and used on the mean).
        for conv in (self.quant_conv, self.decoder.conv_out):
            torch.nn.init.zeros_(conv.weight)
            torch.nn.init.zeros_(conv.bias)

    @property
    def latent_shift(self) -> torch.Tensor:
        return self.anchor.latent_shift

    def set_latent_shift(self, value: float) -> None:
        self.anchor.latent_shift.fill_(float(value))

    def fit_anchor(self, images: Iterable[torch.Tensor]) -> None:
        """Fit the anchor's code (block PCA) to batches of training images (3-channel, [-1, 1]),
        before the residuals train; the resize anchor needs none."""
        self.anchor.fit(self.anchor.image_in(x) for x in images)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self.anchor.image_in(x)
        mean, logvar = super()._encode(x).chunk(2, dim=1)
        return torch.cat([mean + self.anchor.encode(x) - self.latent_shift, logvar], dim=1)

    def _decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        raw = z + self.latent_shift
        dec = self.anchor.image_out(self.decoder(self.post_quant_conv(raw)) + self.anchor.decode(raw))
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    def anchor_only_encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent mean without the learnt residual: the anchor's code of `x`, shifted (unscaled, as
        `encode` gives it)."""
        return self.anchor.encode(self.anchor.image_in(x)) - self.latent_shift

    def anchor_only_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoded image without the learnt residual: the anchor's reconstruction from `z`."""
        return self.anchor.image_out(self.anchor.decode(z + self.latent_shift))


def autoencoder_from_config(config: dict) -> AutoencoderKL:
    """The autoencoder class a diffusers config (as saved in a bundle's manifest) was written by."""
    if config.get("kind") == "anchored":
        keys = inspect.signature(AnchoredAutoencoderKL.__init__).parameters
        return AnchoredAutoencoderKL(**{k: v for k, v in config.items() if k in keys})
    return AutoencoderKL.from_config(config)
