"""benchmarks/autoencoder_mtd.py's measure on known inputs."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load_benchmark


def test_psnr_of_a_known_error():
    ae = load_benchmark("autoencoder_mtd")
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.2          # MSE 0.04 on a peak-to-peak of 2: 10 log10(4 / 0.04) = 20 dB
    y[1] += 0.02         # 40 dB
    torch.testing.assert_close(ae.psnr(y, x), torch.tensor([20.0, 40.0]))


def test_masked_psnr_counts_only_the_mask():
    ae = load_benchmark("autoencoder_mtd")
    x = torch.zeros(1, 3, 8, 8)
    y = x.clone()
    y[..., :4, :] += 0.2           # error only in the top half
    top = torch.zeros(1, 8, 8, dtype=torch.bool)
    top[:, :4] = True
    torch.testing.assert_close(ae.psnr(y, x, top), torch.tensor([20.0]))
    assert float(ae.psnr(y, x, ~top)) > 100  # no error outside: the floor of the clamp


def test_ssim_of_an_image_with_itself_is_one_and_noise_lowers_it():
    ae = load_benchmark("autoencoder_mtd")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(ae.ssim(x, x), torch.ones(2))
    assert float(ae.ssim(x + 0.3 * torch.randn(x.shape, generator=g), x).max()) < 0.9


def test_resize_baseline_keeps_as_many_values_as_the_latent():
    ae = load_benchmark("autoencoder_mtd")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)   # grey, as MTD
    # 256 values = the whole 16 x 16 grey image: bicubic at the same size is the identity
    torch.testing.assert_close(ae.resize_baseline(x, 256), x)
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(ae.resize_baseline(flat, 16), flat)  # 4 x 4 of a flat image is exact
    with pytest.raises(ValueError, match="no square resize"):
        ae.resize_baseline(x, 8)


def test_dilate_grows_a_mask_by_the_given_pixels():
    ae = load_benchmark("autoencoder_mtd")
    m = torch.zeros(1, 9, 9, dtype=torch.bool)
    m[0, 4, 4] = True
    assert int(ae.dilate(m, 2).sum()) == 25 and int(ae.dilate(m, 0).sum()) == 1


def test_the_anchor_alone_is_the_round_trip_without_residuals():
    from diffusers import AutoencoderKL

    from edgeinspect.models.autoencoder import AnchoredAutoencoderKL

    ae = load_benchmark("autoencoder_mtd")
    anchored = AnchoredAutoencoderKL(block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=4,
                                     anchor_kind="pca").eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    anchored.fit_anchor([x])
    rec, shape = ae.roundtrip(anchored, x)
    assert shape == (4, 4, 4)
    torch.testing.assert_close(ae.anchor_roundtrip(anchored, x), rec)  # zero residuals: the same
    torch.nn.init.normal_(anchored.decoder.conv_out.weight, std=0.05)
    assert float((ae.anchor_roundtrip(anchored, x) - ae.roundtrip(anchored, x)[0]).abs().max()) > 1e-3
    kl = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    assert ae.anchor_roundtrip(kl, x) is None


def test_training_time_and_a_wall_time_that_cannot_be_read(tmp_path):
    import json
    import os

    ae = load_benchmark("autoencoder_mtd")
    ck = tmp_path / "checkpoints" / "autoencoder-final"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"train_seconds": 600.0}))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"train": {"threads": 1, "autoencoder_steps": 100}}))
    t = (ck / "state.json").stat().st_mtime
    os.utime(cfg, (t - 720, t - 720))  # started 12 min before the final checkpoint
    got = ae.autoencoder_stage(tmp_path)
    assert got == {"train_minutes": 10.0, "train_wall_minutes": 12.0, "train_device": "cpu (1 threads)",
                   "train_steps": 100}
    os.utime(cfg, (t + 60, t + 60))  # config.json rewritten after training: no wall time, not a negative one
    assert ae.autoencoder_stage(tmp_path)["train_wall_minutes"] is None
