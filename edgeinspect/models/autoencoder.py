"""The anchored autoencoder: a resize that keeps as many values as the latent, plus learnt residuals.

A plain area downscale followed by a bicubic upscale is a strong code for industrial textures: on
MTD at 128 px it beat the from-scratch KL autoencoders holding the same number of values by 2.5-4.4
dB. So the autoencoder starts from it instead of competing with it (the space-to-channel shortcut of
residual autoencoding, as DC-AE does):

    encode(x) = pixel_unshuffle(area_downscale(x), k) + E(x) - shift
    decode(z) = bicubic_upscale(pixel_shuffle(z + shift, k)) + D(z + shift)

E and D are a diffusers `AutoencoderKL`'s encoder and decoder with their last convolutions
zero-initialised, so an untrained model *is* the equal-size resize and training can only add detail
to it. With `grey`, the image's channel mean is coded (industrial cameras are mostly monochrome;
three identical channels would spend three times the values) and the decoded grey image is repeated
to three channels, so every caller still sees 3-channel images in [-1, 1].

`shift` is the training latents' mean (set with the scaling factor after training): the anchored
part is a picture, not zero-mean, and the diffusion model should see centred latents. The class is
a subclass of `AutoencoderKL`, so checkpoints, `from_config`, ONNX export and decoder adaptation
(`post_quant_conv` + `decoder`, with `anchor_decode` added) treat it like any diffusers autoencoder.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput

from edgeinspect.config import anchor_layout


class ResizeAnchor(nn.Module):
    """The non-learnt half of the anchored autoencoder: the equal-size resize as a latent and back,
    the latent shift, and the grey <-> 3-channel conversion. A module of its own so that decoder
    adaptation (runtime/adaptation.py) can carry it beside the decoder it trains."""

    def __init__(self, k: int, r: int, grey: bool):
        super().__init__()
        self.k, self.r, self.grey = k, r, grey
        # A buffer, not a config entry, so that it travels with the weights in every checkpoint.
        self.register_buffer("latent_shift", torch.zeros(()))

    def image_in(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True) if self.grey else x

    def image_out(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 3, 1, 1) if self.grey else x

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


class AnchoredAutoencoderKL(AutoencoderKL):
    """A diffusers KL autoencoder whose code and output are residuals over an equal-size resize."""

    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        layers_per_block: int = 1,
        latent_channels: int = 4,
        norm_num_groups: int = 16,
        sample_size: int = 128,
        scaling_factor: float = 1.0,
        grey: bool = True,
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
        self.register_to_config(grey=grey, kind="anchored")
        self.anchor = ResizeAnchor(*anchor_layout(latent_channels, channels, 2 ** (n - 1)), grey)
        # Zero residuals: the untrained model is exactly the resize (its log-variance is 0 too, so a
        # posterior *sample* would add unit noise: this autoencoder is trained and used on the mean).
        for conv in (self.quant_conv, self.decoder.conv_out):
            torch.nn.init.zeros_(conv.weight)
            torch.nn.init.zeros_(conv.bias)

    @property
    def latent_shift(self) -> torch.Tensor:
        return self.anchor.latent_shift

    def set_latent_shift(self, value: float) -> None:
        self.anchor.latent_shift.fill_(float(value))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self.anchor.image_in(x)
        mean, logvar = super()._encode(x).chunk(2, dim=1)
        return torch.cat([mean + self.anchor.encode(x) - self.latent_shift, logvar], dim=1)

    def _decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        raw = z + self.latent_shift
        dec = self.anchor.image_out(self.decoder(self.post_quant_conv(raw)) + self.anchor.decode(raw))
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    def anchor_only_encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent mean without the learnt residual: the equal-size resize of `x`, folded and shifted
        (unscaled, as `encode` gives it)."""
        return self.anchor.encode(self.anchor.image_in(x)) - self.latent_shift

    def anchor_only_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoded image without the learnt residual: the bicubic upscale of the resize `z` holds."""
        return self.anchor.image_out(self.anchor.decode(z + self.latent_shift))


def autoencoder_from_config(config: dict) -> AutoencoderKL:
    """The autoencoder class a diffusers config (as saved in a bundle's manifest) was written by."""
    if config.get("kind") == "anchored":
        keys = inspect.signature(AnchoredAutoencoderKL.__init__).parameters
        return AnchoredAutoencoderKL(**{k: v for k, v in config.items() if k in keys})
    return AutoencoderKL.from_config(config)
