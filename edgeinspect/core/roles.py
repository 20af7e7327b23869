"""The role table: the input and output names of every network role, in one place.

Loops call networks by these names, `torch_networks` wraps modules with them, export names graph
inputs/outputs after them and the bundle manifest records them. Two roles' outputs depend on the model:
`features` has one output per feature level (and `bank_distance` one input pair and output per level), and the residual networks exported on their own (DiAD's
`guidance`, AdaBLDM's `control`) one per UNet skip plus the middle block.
"""

from __future__ import annotations

Signature = tuple[tuple[str, ...], tuple[str, ...]]  # (input names, output names)

# Input/output names of every role. Export names graph inputs/outputs the same way.
ROLE_SIGNATURES: dict[str, Signature] = {
    "vae_encoder": (("image",), ("latent",)),
    # The anchored autoencoder's encoder without its learnt residual (scoring.encoder anchor).
    "vae_anchor_encoder": (("image",), ("latent",)),
    "vae_decoder": (("latent",), ("image",)),
    # The anchored autoencoder's decoder without its learnt residual (scoring.decoder anchor).
    "vae_anchor_decoder": (("latent",), ("image",)),
    "hint_encoder": (("image",), ("hint",)),
    # AdaBLDM: the trimap (B,1,H,W) in {0, 0.5, 1} to its control hint, once per sample
    "trimap_encoder": (("trimap",), ("hint",)),
    "unet": (("sample", "timestep", "encoder_hidden_states", "hint"), ("noise_pred",)),
    # A UNet without guidance (GLAD): its own role so each role keeps one fixed signature.
    "unet_plain": (("sample", "timestep", "encoder_hidden_states"), ("noise_pred",)),
    # DualAnoDiff: both LoRA branches (and the BCM background, noised to the same timestep) in one call.
    "dual_unet": (("sample_whole", "sample_part", "background", "timestep", "ctx_whole", "ctx_part"),
                  ("noise_whole", "noise_part")),
    "dual_unet_plain": (("sample_whole", "sample_part", "timestep", "ctx_whole", "ctx_part"),
                        ("noise_whole", "noise_part")),
}

# The networks that run at image resolution, one output row per input row: on a CPU their cost per frame
# does not fall with the batch while their activations grow with it (the UNet's does fall), so a memory-lean
# runtime may run them a few rows at a time (onnxruntime's `image_rows`).
IMAGE_ROLES = ("vae_encoder", "vae_anchor_encoder", "vae_decoder", "vae_anchor_decoder", "hint_encoder",
               "trimap_encoder", "features")


def feature_signature(levels: int) -> Signature:
    return ("image",), tuple(f"feature_{i}" for i in range(levels))


def bank_distance_signature(levels: int) -> Signature:
    """The `bank_distance` role: per feature level, the frames' features (B, C, h, w) and that level's bank
    (M, C) of unit training-normal vectors in; per position the cosine distance to the nearest bank vector
    (B, h, w) out."""
    return ((*(f"feature_{i}" for i in range(levels)), *(f"bank_{i}" for i in range(levels))),
            tuple(f"distance_{i}" for i in range(levels)))


def residual_outputs(n_down: int) -> tuple[str, ...]:
    """The outputs of a ControlNet-style residual network: down_0..down_{n-1}, mid."""
    return (*(f"down_{i}" for i in range(n_down)), "mid")
