"""benchmarks/autoencoder_mtd.py's measure on known inputs."""

from __future__ import annotations

import torch

from tests.conftest import load_benchmark


def test_psnr_of_a_known_error():
    ae = load_benchmark("autoencoder_mtd")
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.2          # MSE 0.04 on a peak-to-peak of 2: 10 log10(4 / 0.04) = 20 dB
    y[1] += 0.02         # 40 dB
    torch.testing.assert_close(ae.psnr(y, x), torch.tensor([20.0, 40.0]))
