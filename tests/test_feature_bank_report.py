"""benchmarks/feature_bank_mtd.py: GLAD's scoring against a bank of normal features, on known inputs."""

from __future__ import annotations

import pytest
import torch

from edgeinspect.models.features import build_feature_extractor
from tests.conftest import load_benchmark


def test_bank_is_seeded_subset_of_all_positions():
    fb = load_benchmark("feature_bank_mtd")
    feats = [torch.randn(3, 5, 4, 4), torch.randn(3, 7, 2, 2)]
    a, b = fb.sample_bank(feats, 20, seed=1), fb.sample_bank(feats, 20, seed=1)
    assert [t.shape for t in a] == [(1, 5, 1, 20), (1, 7, 1, 12)]  # layer 2 has only 12 positions: all
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    pool = feats[0].permute(1, 0, 2, 3).flatten(1)  # every bank vector is one of the image positions
    assert all(((pool - a[0][0, :, 0, j:j + 1]).abs().sum(0) == 0).any() for j in range(20))
    assert not torch.equal(fb.sample_bank(feats, 20, seed=2)[0], a[0])


def test_bank_maps_known_distances():
    fb = load_benchmark("feature_bank_mtd")
    e = torch.eye(4)
    bank = [e[:, :2].reshape(1, 4, 1, 2), e[:, :1].reshape(1, 4, 1, 1)]   # layer 1: e0, e1; layer 2: e0
    # one test frame, 2x1 positions: (e1, e2) on layer 1, (e0, e3) on layer 2
    test = [torch.stack([e[1], e[2]], 1).reshape(1, 4, 2, 1), torch.stack([e[0], e[3]], 1).reshape(1, 4, 2, 1)]
    maps = fb.bank_maps(test, bank, size=2)
    # rows keep their size (exact), columns are replicated: each layer gives [[0, 0], [1, 1]]
    torch.testing.assert_close(maps[0], torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
    torch.testing.assert_close(fb.bank_maps([test[0]], [bank[0]], size=2)[0], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    flat = fb.bank_maps([test[0]], [bank[0]], size=1)[0, 0, 0]
    torch.testing.assert_close(flat, torch.tensor(0.5))          # bilinear average of 0 and 1


def test_run_size_on_the_sample_scores_defects_higher(sample_root):
    fb = load_benchmark("feature_bank_mtd")
    row, maps = fb.run_size(sample_root, 64, build_feature_extractor(), per_layer=5000, seed=0)
    assert maps.shape == (20, 64, 64)
    assert row["size"] == 64 and row["top_k"] == 25 and row["blur_sigma"] == 1.5
    assert row["test_images"] == 20 and set(row["image_auroc_by_type"]) == {"blowhole", "break", "crack"}
    for key in ("image_auroc", "pixel_auroc", "pixel_ap", "pro"):
        assert 0.0 <= row[key] <= 1.0
    assert row["pixel_auroc"] > 0.6   # pretrained features against real normals do localise MTD defects



def test_roundtrip_row_scores_each_frame_against_its_own_round_trip(sample_root, tmp_path):
    """A tiny GLAD run: the row is the run's own scoring of each frame against its autoencoder round trip."""
    import numpy as np

    from edgeinspect.data.mvtec import MVTecFolder, uint8_to_model
    from edgeinspect.runtime.run_detector import run_pipeline
    from edgeinspect.runtime.scoring import topk_mean_score
    from edgeinspect.core.timing import StageTimer
    from tests.test_export_glad import make_tiny_glad_run, sample_frames

    fb = load_benchmark("feature_bank_mtd")
    run = make_tiny_glad_run(tmp_path / "run", sample_frames())
    torch.manual_seed(0)  # the tiny preset's extractor has random weights: the same seed, the same extractor
    row, maps = fb.roundtrip_row(sample_root, run, batch=7)
    torch.manual_seed(0)
    cfg, pipe, _ = run_pipeline(run, None)
    data = MVTecFolder(sample_root, "test", cfg.model.image_size)
    u8, _, labels = data.load_all()
    x = uint8_to_model(u8)
    with torch.no_grad():
        rt = pipe.nets["vae_decoder"](latent=pipe.nets["vae_encoder"](image=x)["latent"])["image"].clamp(-1, 1)
        scores = topk_mean_score(pipe.anomaly_maps(x, rt, StageTimer(pipe.nets.device)), pipe.inference.top_k)
    assert row["bank"] is None and row["size"] == 64 and row["test_images"] == 20
    assert row["normal_score_median"] == pytest.approx(float(np.median(scores[labels == 0])), abs=1e-4)
    assert row["defect_score_median"] == pytest.approx(float(np.median(scores[labels == 1])), abs=1e-4)
    assert set(row["image_auroc_by_type"]) == {"blowhole", "break", "crack"}
    torch.testing.assert_close(topk_mean_score(maps, pipe.inference.top_k), scores, rtol=0, atol=1e-4)
    png = tmp_path / "fig.png"
    fb.figure(sample_root, [row, row], [maps, maps], png, size=32)
    import cv2

    # one row per type (good + 3 defect types), each: the frame + one map per reference, 18-px labels, 4-px pads
    assert cv2.imread(str(png)).shape == (4 * (32 + 18 + 4) + 4, 3 * (32 + 4) + 4, 3)
