"""Export of the generators (AdaBLDM, DualAnoDiff) to bundles, and generation from a bundle.

Runs are built as the training tests' fixtures build them (a tiny base checkpoint, config.json, a
checkpoint of the method's weights), with random weights; the weights that training starts at zero
(control zero convs and hint output, LoRA B, SAIM out, BCM gate) are set to random values so that every branch the
graphs hold changes their outputs. Sampling is shortened (5 AdaBLDM steps with 2 adaptation steps,
3 DualAnoDiff steps), both with classifier-free guidance.
"""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import onnx
import pytest
import torch

from edgeinspect.config import build_config, dump_config
from edgeinspect.generation.writer import GenerationWriter, load_index
from edgeinspect.core.runs import TrainState
from edgeinspect.training.checkpoint import save_checkpoint
from edgeinspect.core.atomic import write_json_atomic

SEEDS = {"scratch": ["000.png", "001.png"], "crack": ["002.png"]}
FP32_BOUND = (1e-4, 1e-3)  # write_bundle's default parity bound: atol + rtol x max|torch output|


def _randomize_zeros(model: torch.nn.Module, wanted, seed: int) -> None:
    """Random values for the wanted parameters that are all zero (as training starts them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if wanted(name) and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.3 if name.endswith("gate") else 0.0))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from tests.conftest import make_mvtec

    return make_mvtec(tmp_path_factory.mktemp("gen") / "cat", n_train=4, n_good=1, n_defect=3)


@pytest.fixture(scope="module")
def ada_run(data_root, tmp_path_factory):
    """A tiny AdaBLDM run with two control branches (scratch, crack)."""
    from edgeinspect.models.adabldm import AdaBLDMModel

    cfg = build_config("adabldm", "tiny", {
        "train": {"data_root": str(data_root), "seeds": SEEDS, "object_name": "tile"},
        "sampling": {"free_steps": 2, "latent_steps": 2, "pixel_steps": 1, "adapt_steps": 2, "guidance_scale": 2.0,
                     "batch_size": 2}})
    torch.manual_seed(0)
    model = AdaBLDMModel(cfg, list(SEEDS))
    _randomize_zeros(model, lambda n: n.startswith("controls."), seed=1)
    run = tmp_path_factory.mktemp("ada") / "run"
    save_checkpoint(run, "done", model, TrainState("done", 0, extra={"defect_types": list(SEEDS),
                                                                     "scaling_factor": 0.8}))
    write_json_atomic(run / "config.json", dump_config(cfg))
    write_json_atomic(run / "seeds.json", SEEDS)
    return run


@pytest.fixture(scope="module")
def ada_bundle(ada_run, tmp_path_factory):
    from edgeinspect.export.bundle import export_bundle

    return export_bundle(ada_run, tmp_path_factory.mktemp("ada_bundle") / "bundle", ("fp32", "fp16"),
                         defect_type="scratch", threads=1)


@pytest.fixture(scope="module")
def dual_run(data_root, tmp_path_factory):
    """A tiny DualAnoDiff run (BCM on, LoRA on projections and convolutions) on a random base checkpoint."""
    from edgeinspect.models.diad import LatentDiffusionModel
    from edgeinspect.models.dualanodiff import TrainableWeights, is_trainable_key
    from edgeinspect.training.dualanodiff import build_dualanodiff

    root = tmp_path_factory.mktemp("dual")
    base_cfg = build_config("diad", "tiny")
    torch.manual_seed(0)
    base = save_checkpoint(root / "base", "unet-final", LatentDiffusionModel(base_cfg),
                           TrainState("unet", 0, extra={"scaling_factor": 0.7}))
    write_json_atomic(root / "base" / "config.json", dump_config(base_cfg))
    cfg = build_config("dualanodiff", "tiny", {
        "train": {"data_root": str(data_root), "init_from": str(root / "base"), "defect_type": "scratch"},
        # convolutions too: their per-block adapters must export for any batch size, as the projections'
        "lora": {"rank": 4, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv_out"]},
        # a mask threshold near the random part images' median: masks with much boundary to disagree on
        "sampling": {"steps": 3, "batch_size": 2, "mask": {"threshold": 0.4}}})
    model, _ = build_dualanodiff(cfg, base)
    _randomize_zeros(model, is_trainable_key, seed=2)
    run = root / "run"
    save_checkpoint(run, "done", TrainableWeights(model), TrainState("done", 0, extra={
        "base_checkpoint": str(base), "scaling_factor": 0.7, "defect_type": "scratch"}))
    write_json_atomic(run / "config.json", dump_config(cfg))
    return run


def _check_graphs(bundle, roles: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> None:
    """Every role: named IO as the loop calls it, dynamic batch, a checked graph at opset >= 17, and
    torch/onnxruntime parity recorded within the bound."""
    m = bundle.manifest
    atol, rtol = m["parity"]["bound"]["fp32"]
    assert (atol, rtol) == FP32_BOUND and m["opset"] >= 17
    for role, (inputs, outputs) in roles.items():
        entry = bundle.network(role)
        assert (entry.input_names, entry.output_names) == (inputs, outputs), role
        assert all(t.shape[0] == "batch" for t in (*entry.inputs, *entry.outputs)), role
        graph = bundle.onnx_path(role)
        onnx.checker.check_model(str(graph))
        assert onnx.load(str(graph)).opset_import[0].version >= 17
        parity = m["parity"]["max_abs_error"][role]
        for name, err in parity["fp32"].items():
            assert err <= atol + rtol * parity["scale"][name], (role, name, err)


def test_adabldm_bundle_holds_one_type_its_graphs_contexts_decoder_and_seed_masks(ada_run, ada_bundle, data_root):
    from edgeinspect.runtime.tensorrt_engines import bundle_profiles
    from edgeinspect.runtime.adaptation import LatentDecoder
    from edgeinspect.generation.adabldm_bundle import bundle_decoder
    from edgeinspect.runtime.bundle_loading import load_bundle
    from edgeinspect.core.roles import ROLE_SIGNATURES
    from edgeinspect.training.adabldm import load_adabldm, load_seeds

    bundle = load_bundle(ada_bundle)
    m = bundle.manifest
    assert m["method"] == "adabldm" and m["precisions"] == ["fp32", "fp16"]
    assert set(bundle.networks) == {"vae_encoder", "trimap_encoder", "unet", "vae_decoder", "control"}
    assert set(bundle.pipeline_roles()) == {"vae_encoder", "trimap_encoder", "unet", "vae_decoder"}
    control_outputs = bundle.network("control").output_names
    assert control_outputs[-1] == "mid" and control_outputs[0] == "down_0"
    _check_graphs(bundle, {**{r: ROLE_SIGNATURES[r] for r in ("vae_encoder", "unet", "vae_decoder", "trimap_encoder")},
                           "control": (("sample", "timestep", "hint"), control_outputs)})
    # height/width dynamic where the networks allow, fp16 for the UNet side only
    assert bundle.network("unet").inputs[0].shape == ("batch", 4, "latent_height", "latent_width")
    assert bundle.network("trimap_encoder").inputs[0].shape == ("batch", 1, "height", "width")
    assert bundle.network("unet").precision["fp16"] == "fp16" and bundle.network("vae_decoder").precision["fp16"] == "fp32"
    # classifier-free guidance (guidance_scale 2): the UNet's TensorRT profile covers 2 x the samples
    profiles = bundle_profiles(bundle)
    assert dict(profiles["unet"].shapes)["sample"].max == (4, 4, 32, 32)
    assert dict(profiles["trimap_encoder"].shapes)["trimap"].min == (1, 1, 64, 64)

    cfg, model, _ = load_adabldm(ada_run)
    settings = m["method_settings"]
    assert settings["defect_type"] == "scratch" and settings["prompts"]["defect"] == "a tile with a scratch"
    with torch.no_grad():
        torch.testing.assert_close(bundle.contexts["defect"], model.prompt_encoder(["a tile with a scratch"]))
        torch.testing.assert_close(bundle.contexts["empty"], model.prompt_encoder([""]))
    assert torch.equal(bundle.context, bundle.contexts["defect"])
    decoder = bundle_decoder(bundle)
    assert decoder.scaling_factor == pytest.approx(0.8) == settings["decoder"]["scaling_factor"]
    reference = LatentDecoder.from_vae(model.vae).state_dict()
    assert decoder.state_dict().keys() == reference.keys()
    assert all(torch.equal(decoder.state_dict()[k], v) for k, v in reference.items())
    seeds = load_seeds(data_root, {"scratch": SEEDS["scratch"]}, 64)["scratch"]
    assert settings["seed_defects"] == seeds.names
    assert torch.equal(bundle.payload("seed_masks")["masks"].bool(), seeds.masks)
    assert {"decoder.safetensors", "seed_masks.safetensors", "context.safetensors"} <= set(m["files"])


def test_adabldm_export_asks_for_a_type_when_the_run_has_several(ada_run, tmp_path):
    from edgeinspect.export.bundle import export_bundle
    from edgeinspect.export.onnx import ExportError

    with pytest.raises(ExportError, match=r"defect types \['scratch', 'crack'\].*--defect-type"):
        export_bundle(ada_run, tmp_path / "b", ("fp32",))
    with pytest.raises(ExportError, match="no control branch for 'hole'"):
        export_bundle(ada_run, tmp_path / "b", ("fp32",), defect_type="hole")
    assert not (tmp_path / "b").exists()


def _images(folder, index):
    return {k: (cv2.imread(str(folder / v["image"])).astype(int), cv2.imread(str(folder / v["mask"]), 0))
            for k, v in index["items"].items()}


def _same_items(a, b, max_pixel_diff: int, keys: tuple[str, ...]) -> None:
    """Same items, records (the given keys) and masks; images within max_pixel_diff grey levels."""
    ia, ib = load_index(a), load_index(b)
    assert sorted(ia["items"], key=int) == sorted(ib["items"], key=int)
    pa, pb = _images(a, ia), _images(b, ib)
    for k in ia["items"]:
        assert {f: ia["items"][k][f] for f in keys} == {f: ib["items"][k][f] for f in keys}, k
        assert np.abs(pa[k][0] - pb[k][0]).max() <= max_pixel_diff, k
        assert np.array_equal(pa[k][1], pb[k][1]), k


def test_adabldm_generation_from_the_bundle_matches_the_run_and_resumes(ada_run, ada_bundle, tmp_path, monkeypatch):
    from edgeinspect.generation.adabldm import generate_adabldm
    from edgeinspect.generation.adabldm_bundle import generate_adabldm_bundle

    monkeypatch.setenv("EDGEINSPECT_ORT_THREADS", "1")
    run_out = generate_adabldm(ada_run, tmp_path / "run", 3, defect_types=["scratch"], progress=False)
    bundle_out = generate_adabldm_bundle(ada_bundle, tmp_path / "bundle", 3, progress=False)
    settings = load_index(bundle_out)["settings"]
    assert settings["backend"] == "onnxruntime" and settings["defect_types"] == ["scratch"]
    keys = ("seed", "defect_type", "prompt", "source_image", "seed_defect", "placement")
    _same_items(run_out, bundle_out, 1, keys)

    real = GenerationWriter.write

    def killed_at_item_1(self, i, *args, **kwargs):
        if i == 1:
            raise KeyboardInterrupt
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(GenerationWriter, "write", killed_at_item_1)
    with pytest.raises(KeyboardInterrupt):
        generate_adabldm_bundle(ada_bundle, tmp_path / "cut", 3, progress=False)
    monkeypatch.setattr(GenerationWriter, "write", real)
    assert list(load_index(tmp_path / "cut")["items"]) == ["0"]
    generate_adabldm_bundle(ada_bundle, tmp_path / "cut", 3, progress=False)
    _same_items(bundle_out, tmp_path / "cut", 1, keys)
    with pytest.raises(ValueError, match="holds the defect type 'scratch' only"):
        generate_adabldm_bundle(ada_bundle, tmp_path / "other", 3, defect_types=["crack"], progress=False)


@pytest.fixture(scope="module")
def dual_bundle(dual_run, tmp_path_factory):
    """Exported through the CLI (fp32 only: the fp16 path is the AdaBLDM bundle's)."""
    from edgeinspect.cli import main

    out = tmp_path_factory.mktemp("dual_bundle") / "bundle"
    assert main(["export", "--model", str(dual_run), "--out", str(out), "--threads", "1", "--quiet"]) == 0
    return out


def test_dualanodiff_bundle_holds_the_dual_unet_and_the_three_contexts(dual_run, dual_bundle):
    from edgeinspect.export.onnx import parity_report
    from edgeinspect.runtime.bundle_loading import load_bundle
    from edgeinspect.core.roles import ROLE_SIGNATURES
    from edgeinspect.training.dualanodiff import load_dualanodiff

    bundle = load_bundle(dual_bundle)
    m = bundle.manifest
    assert m["method"] == "dualanodiff" and m["precisions"] == ["fp32"]
    assert set(bundle.networks) == set(bundle.pipeline_roles()) == {"vae_encoder", "dual_unet", "vae_decoder"}
    _check_graphs(bundle, {r: ROLE_SIGNATURES[r] for r in bundle.networks})
    assert bundle.network("dual_unet").inputs[2].shape == ("batch", 4, "latent_height", "latent_width")
    # guidance (2.5) doubles the pairs per UNet call; the decoder decodes whole + part together
    assert bundle.network("dual_unet").batch_multiplier == 2 and bundle.network("vae_decoder").batch_multiplier == 2
    cfg, model, _ = load_dualanodiff(dual_run)
    assert m["method_settings"]["defect_type"] == "scratch" and m["method_settings"]["bcm"] is True
    with torch.no_grad():
        for name, prompt in (("whole", "a vfx with sks"), ("part", "sks"), ("empty", "")):
            assert m["method_settings"]["prompts"][name] == prompt
            torch.testing.assert_close(bundle.contexts[name], model.prompt_encoder([prompt]))
    # one pair without guidance (batch 1) at a latent size of neither the export nor the probe: the
    # LoRA branches, SAIM and BCM (gate, MLP) all act on the output, and onnxruntime follows torch
    g = torch.Generator().manual_seed(5)
    c = bundle.contexts
    pair = {"sample_whole": torch.randn(1, 4, 24, 24, generator=g), "sample_part": torch.randn(1, 4, 24, 24, generator=g),
            "background": torch.randn(1, 4, 24, 24, generator=g), "timestep": torch.tensor([321.0]),
            "ctx_whole": c["whole"], "ctx_part": c["part"]}
    dual = model.role_modules()["dual_unet"]
    errors, scales = parity_report(dual, bundle.onnx_path("dual_unet"), pair, threads=1)
    assert max(errors.values()) <= 1e-4 + 1e-3 * max(scales.values())
    with torch.no_grad():
        changed = dual(**pair)[0]
        model.bcm[next(iter(model.bcm))].gate.zero_()
        assert not torch.allclose(dual(**pair)[0], changed, atol=1e-4)


def test_dualanodiff_generation_from_the_bundle_matches_the_run_and_resumes(dual_run, dual_bundle, data_root,
                                                                            tmp_path, monkeypatch):
    from edgeinspect.cli import main
    from edgeinspect.generation.dualanodiff import generate_dualanodiff

    monkeypatch.setenv("EDGEINSPECT_ORT_THREADS", "1")
    run_out = generate_dualanodiff(dual_run, tmp_path / "run", 3, progress=False)
    args = ["generate", "dualanodiff", "--bundle", str(dual_bundle), "--out", str(tmp_path / "bundle"),
            "--per-type", "3", "--data", str(data_root), "--quiet"]
    assert main(args) == 0
    settings = load_index(tmp_path / "bundle")["settings"]
    assert settings["backend"] == "onnxruntime" and settings["defect_type"] == "scratch"
    _same_items(run_out, tmp_path / "bundle", 1, ("seed", "background", "defect_type"))

    real = GenerationWriter.write

    def killed_at_item_2(self, i, *args, **kwargs):
        if i == 2:
            raise KeyboardInterrupt
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(GenerationWriter, "write", killed_at_item_2)
    cut = [*args[:5], str(tmp_path / "cut"), *args[6:]]
    assert main(cut) == 130  # the CLI's exit status after an interrupt
    monkeypatch.setattr(GenerationWriter, "write", real)
    assert sorted(load_index(tmp_path / "cut")["items"]) == ["0", "1"]
    assert main(cut) == 0
    _same_items(tmp_path / "bundle", tmp_path / "cut", 0, ("seed", "background", "defect_type"))


def test_generator_bundles_refuse_tampering(ada_bundle, dual_bundle, tmp_path):
    from edgeinspect.runtime.bundle_loading import MANIFEST, BundleError, load_bundle
    from edgeinspect.runtime.detector import bundle_pipeline

    copy = shutil.copytree(ada_bundle, tmp_path / "ada")
    with pytest.raises(BundleError, match="a generator, not an inspection pipeline"):
        bundle_pipeline(copy)
    data = bytearray((copy / "decoder.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "decoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.safetensors does not match its sha256"):
        load_bundle(copy)
    (copy / "seed_masks.safetensors").unlink()
    shutil.copy(ada_bundle / "decoder.safetensors", copy / "decoder.safetensors")
    with pytest.raises(BundleError, match="seed_masks.safetensors listed in manifest.json is missing"):
        load_bundle(copy)

    copy = shutil.copytree(dual_bundle, tmp_path / "dual")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["method_settings"]["prompts"]["whole"] = "a vfx"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="modified after export"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="cannot override \\['prompts'\\]"):
        load_bundle(dual_bundle, overrides={"prompts": {"whole": "a vfx"}})


def test_dualanodiff_without_bcm_exports_dual_unet_plain_with_an_fp16_variant(tmp_path):
    from edgeinspect.export.bundle import write_bundle
    from edgeinspect.export.dualanodiff import dualanodiff_bundle_parts
    from edgeinspect.models.dualanodiff import DualAnoDiffModel, is_trainable_key
    from edgeinspect.runtime.bundle_loading import load_bundle
    from edgeinspect.core.roles import ROLE_SIGNATURES

    cfg = build_config("dualanodiff", "tiny", {"bcm": {"enabled": False}, "train": {"defect_type": "scratch"}})
    torch.manual_seed(3)
    model = DualAnoDiffModel(cfg)
    _randomize_zeros(model, is_trainable_key, seed=4)
    parts = dualanodiff_bundle_parts(cfg, model, {"defect_type": "scratch"})
    with pytest.raises(KeyError, match="'dual_unet' does not apply"):
        write_bundle(cfg, model, tmp_path / "no", precision=("fp32",), roles=["dual_unet"], **parts)
    bundle = load_bundle(write_bundle(cfg, model, tmp_path / "b", precision=("fp32", "fp16"), threads=1, **parts))
    assert set(bundle.networks) == {"vae_encoder", "dual_unet_plain", "vae_decoder"}
    _check_graphs(bundle, {r: ROLE_SIGNATURES[r] for r in bundle.networks})
    assert bundle.network("dual_unet_plain").precision["fp16"] == "fp16"
    fp16 = bundle.manifest["parity"]["max_abs_error"]["dual_unet_plain"]["fp16_vs_fp32"]
    assert max(fp16.values()) <= 1e-2 + 5e-2 * max(bundle.manifest["parity"]["max_abs_error"]["dual_unet_plain"]["scale"].values())
