"""Tests for edgeinspect.models.features (CPU only, no network, small inputs)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from edgeinspect.models.features import (
    EFFICIENTNET_LITE0_TIMM_ARCH,
    FeatureExtractor,
    build_feature_extractor,
    efficientnet_lite0_imagenet_state_dict,
    shipped_efficientnet_lite0_weights_path,
)

TINY_VIT = dict(depth=4, embed_dim=64, num_heads=2)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Structured images in [-1, 1]: smooth gradients + a bright square."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([xx, yy, xx * yy], 0)[None].repeat(b, 1, 1, 1)
    base = base + 0.1 * torch.randn(b, 3, h, w, generator=g)
    base[:, :, h // 4 : h // 2, w // 4 : w // 2] = 0.9
    return base.clamp(-1, 1)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return build_feature_extractor()


@pytest.fixture(scope="module")
def lite0_random() -> FeatureExtractor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build_feature_extractor(weights=None, allow_random=True)


# ------------------------------------------------------------------ shipped weights
def test_shipped_weights_all_296_tensors_mapped():
    path = shipped_efficientnet_lite0_weights_path()
    assert path.is_file() and path.suffix == ".pth"
    src = torch.load(path, map_location="cpu", weights_only=True)
    sd = efficientnet_lite0_imagenet_state_dict()
    assert len(src) == len(sd) == 296
    full = timm.create_model(EFFICIENTNET_LITE0_TIMM_ARCH, pretrained=False)
    assert list(sd.keys()) == list(full.state_dict().keys())
    for (sk, sv), (tk, tv) in zip(src.items(), sd.items()):
        assert sv.shape == tv.shape and torch.equal(sv, tv), (sk, tk)
    full.load_state_dict(sd, strict=True)  # every tensor of the full model comes from the file
    # same tensor layout as timm's efficientnet_lite0
    assert list(timm.create_model("efficientnet_lite0").state_dict().keys()) == list(sd.keys())


def test_default_extractor_structure(lite0):
    assert isinstance(lite0, FeatureExtractor)
    assert lite0.name == "efficientnet_lite0"
    assert lite0.arch == EFFICIENTNET_LITE0_TIMM_ARCH
    assert lite0.kind == "cnn"
    assert lite0.channels == [24, 40, 112]
    assert lite0.strides == [4, 8, 16]
    assert lite0.weights_source.startswith("default")
    # every tensor of the file is either used or belongs to the unused tail/head
    assert len(lite0.loaded_keys) + len(lite0.unused_keys) == 296
    assert lite0.unused_keys and all(
        k.startswith(("blocks.5.", "blocks.6.", "conv_head.", "bn2.", "classifier.")) for k in lite0.unused_keys
    )
    assert not lite0.training and not lite0.model.training
    assert all(not p.requires_grad for p in lite0.parameters())
    # TF-Lite normalisation: [-1, 1] images go in unchanged
    assert torch.allclose(lite0.mean.flatten(), torch.full((3,), 0.5))
    assert torch.allclose(lite0.std.flatten(), torch.full((3,), 0.5))


@pytest.mark.parametrize("hw", [(128, 128), (96, 160)])
def test_default_extractor_shapes(lite0, hw):
    h, w = hw
    with torch.no_grad():
        feats = lite0(_images(2, h, w))
    assert isinstance(feats, list) and len(feats) == 3
    for f, c, s in zip(feats, lite0.channels, lite0.strides):
        assert f.shape == (2, c, h // s, w // s)
        assert torch.isfinite(f).all()


def test_weights_are_not_random(lite0, lite0_random):
    # BN running statistics come from ImageNet training, not the init values (0 / 1)
    bn = lite0.model.blocks[2][0].bn1
    assert bn.running_mean.abs().mean() > 1e-2
    assert (bn.running_var - 1).abs().mean() > 1e-2
    x = _images(2, 64, 64)
    with torch.no_grad():
        a, b = lite0(x), lite0_random(x)
    for fa, fb in zip(a, b):
        rel = (fa - fb).norm() / (fa.norm() + fb.norm())
        assert rel > 0.3


def _real_photos() -> list[tuple[np.ndarray, int]]:
    """(image, ImageNet class) pairs from sample images shipped by installed packages."""
    from PIL import Image

    out = []
    candidates = []
    try:
        import sklearn

        candidates.append((Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg", 985))  # daisy
    except ImportError:
        pass
    try:
        import matplotlib

        candidates.append(
            (Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg", 652)
        )  # military uniform
    except ImportError:
        pass
    for p, cls in candidates:
        if p.is_file():
            im = Image.open(p).convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            out.append((np.asarray(im.resize((224, 224), Image.BICUBIC)), cls))
    return out


def test_pretrained_classifier_is_sensible(lite0):
    model = timm.create_model(EFFICIENTNET_LITE0_TIMM_ARCH, pretrained=False).eval()
    model.load_state_dict(efficientnet_lite0_imagenet_state_dict(), strict=True)
    random_model = timm.create_model(EFFICIENTNET_LITE0_TIMM_ARCH, pretrained=False).eval()

    photos = _real_photos()
    if photos:
        x = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1 for a, _ in photos])
        with torch.no_grad():
            probs = model(lite0.normalize(x)).softmax(-1)
        for p, (_, cls) in zip(probs, photos):
            assert cls in p.topk(5).indices.tolist()
            assert p.max() > 0.1  # confident compared to uniform 1/1000
    # synthetic structured images: pretrained softmax is far from uniform, random init is not
    x = _images(4, 160, 160)
    with torch.no_grad():
        p_pre = model(lite0.normalize(x)).softmax(-1)
        p_rnd = random_model(lite0.normalize(x)).softmax(-1)
    ent_pre = -(p_pre * p_pre.clamp_min(1e-12).log()).sum(-1).mean()
    ent_rnd = -(p_rnd * p_rnd.clamp_min(1e-12).log()).sum(-1).mean()
    assert ent_pre < 0.8 * np.log(1000)
    assert ent_pre < ent_rnd - 0.5


# ------------------------------------------------------------------ frozen / gradients
def test_gradient_flows_to_input_parameters_frozen(lite0):
    x = _images(1, 64, 64).requires_grad_(True)
    feats = lite0(x)
    loss = sum(f.pow(2).mean() for f in feats)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lite0.parameters())


def test_parent_train_keeps_backbone_eval(lite0):
    parent = torch.nn.ModuleDict({"fe": lite0})
    bn = lite0.model.bn1
    before = bn.running_mean.clone()
    parent.train()
    try:
        assert not lite0.model.training
        with torch.no_grad():
            lite0(_images(2, 32, 32))
        assert torch.equal(bn.running_mean, before)
    finally:
        parent.eval()


# ------------------------------------------------------------------ local weights
def _resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = timm.create_model("resnet18", pretrained=False)
    # make BN stats distinguishable from a fresh init
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return {k: v.contiguous() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_resnet18(tmp_path, suffix):
    sd = _resnet18_state()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    fe = build_feature_extractor("resnet18", weights=str(path))
    assert fe.channels == [64, 128, 256] and fe.strides == [4, 8, 16]
    loaded = fe.model.state_dict()
    assert loaded and set(loaded) <= set(sd)
    for k, v in loaded.items():
        assert torch.equal(v, sd[k]), k
    assert set(fe.loaded_keys) == set(loaded)
    assert all(k.startswith(("layer4.", "fc.")) for k in fe.unused_keys)
    with torch.no_grad():
        feats = fe(_images(1, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6)]
    # the classifier may be absent from the file
    no_head = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    save_file(no_head, str(tmp_path / "nohead.safetensors"))
    build_feature_extractor("resnet18", weights=tmp_path / "nohead.safetensors")


def test_local_weights_mismatch_errors(tmp_path):
    sd = _resnet18_state()
    bad = dict(sd)
    del bad["layer1.0.conv1.weight"]
    bad["extra.weight"] = torch.zeros(3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as ei:
        build_feature_extractor("resnet18", weights=str(tmp_path / "bad.safetensors"))
    msg = str(ei.value)
    assert "missing keys" in msg and "layer1.0.conv1.weight" in msg
    assert "unexpected keys" in msg and "extra.weight" in msg

    shape = dict(sd)
    shape["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    save_file(shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch"):
        build_feature_extractor("resnet18", weights=str(tmp_path / "shape.safetensors"))

    # a file for another architecture
    save_file(dict(efficientnet_lite0_imagenet_state_dict()), str(tmp_path / "lite0.safetensors"))
    with pytest.raises(ValueError, match="do not match timm model 'resnet18'"):
        build_feature_extractor("resnet18", weights=str(tmp_path / "lite0.safetensors"))

    with pytest.raises(FileNotFoundError):
        build_feature_extractor("resnet18", weights=str(tmp_path / "nope.safetensors"))


def test_default_weights_only_for_lite0():
    with pytest.raises(ValueError, match="only available for efficientnet_lite0"):
        build_feature_extractor("resnet18")


def test_random_weights_need_allow_random():
    with pytest.raises(ValueError, match="allow_random"):
        build_feature_extractor("resnet18", weights=None)
    with pytest.warns(UserWarning, match="RANDOM"):
        fe = build_feature_extractor("resnet18", weights=None, allow_random=True)
    assert fe.weights_source == "random" and fe.loaded_keys == []


def test_missing_stride_raises():
    with pytest.raises(ValueError, match=r"available strides: \[2, 4, 8, 16, 32\]"):
        build_feature_extractor(strides=(4, 64))


# ------------------------------------------------------------------ ViT
def test_vit_local_weights(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    path = tmp_path / "vit.safetensors"
    save_file(sd, str(path))

    fe = build_feature_extractor("vit_tiny_patch16_224", weights=str(path), **TINY_VIT)
    assert fe.kind == "vit"
    assert fe.vit_indices == [0, 2, 3]
    assert fe.channels == [64, 64, 64] and fe.strides == [16, 16, 16]
    assert torch.equal(fe.model.blocks[2].attn.qkv.weight, sd["blocks.2.attn.qkv.weight"])
    assert torch.equal(fe.model.pos_embed, sd["pos_embed"])
    assert all(k.startswith("head.") or k.startswith("norm.") for k in fe.unused_keys)

    x = _images(2, 64, 64).requires_grad_(True)
    feats = fe(x)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 4, 4)] * 3
    sum(f.mean() for f in feats).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in fe.parameters())

    with torch.no_grad():
        assert [tuple(f.shape) for f in fe(_images(1, 48, 80))] == [(1, 64, 3, 5)] * 3
        with pytest.raises(ValueError, match="multiple of the patch size"):
            fe(_images(1, 70, 64))

    two = build_feature_extractor("vit_tiny_patch16_224", weights=str(path), strides=(16, 16), **TINY_VIT)
    assert two.strides == [16, 16] and two.vit_indices == [1, 3]
    with pytest.raises(ValueError, match="patch size"):
        build_feature_extractor("vit_tiny_patch16_224", weights=str(path), strides=(8, 16), **TINY_VIT)


def test_vit_register_tokens_dropped():
    with pytest.warns(UserWarning):
        fe = build_feature_extractor(
            "vit_tiny_patch16_224", weights=None, allow_random=True, reg_tokens=2, **TINY_VIT
        )
    with torch.no_grad():
        feats = fe(_images(1, 32, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 2, 4)] * 3
