"""ONNX export of the DiAD roles: graphs check, load in onnxruntime and match torch; fp16 variants;
external data; the export verb.

Measured on the tiny preset (random weights with a non-trivial SG network; CPU, onnxruntime 1.31.1,
torch 2.14.1; max abs error over the export inputs and the probe inputs at another batch and size;
scale = max |torch output|):

    role          output        fp32 vs torch   fp16 vs fp32   scale
    vae_encoder   latent        1.3e-7          (fp32 graph)   0.16
    hint_encoder  hint          6.0e-8          9.1e-5         0.29
    unet          noise_pred    1.5e-6          9.1e-3         2.0
    vae_decoder   image         2.0e-6          (fp32 graph)   2.0
    features      feature_0/1/2 1.1e-6/2.0e-6/2.2e-5   1.7e-3/3.1e-3/2.8e-2   2.8/3.0/19.6
    guidance      down_2/3, mid 6.0e-7/1.2e-6/1.5e-6   2.6e-3/9.8e-3/1.6e-2   2.0/3.0/2.7
                  (down_0/down_1 are exact zeros: "mid" injection)

The tests bound fp32 by 1e-4 + 1e-3 x scale and fp16 by 1e-2 + 5e-2 x scale (the export's own bounds).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeinspect.config import build_config, dump_config
from edgeinspect.models.diad import DiADModel
from edgeinspect.core.roles import ROLE_SIGNATURES
from edgeinspect.core.roles import feature_signature
from edgeinspect.core.runs import TrainState
from edgeinspect.training.checkpoint import save_checkpoint


FP32_BOUND = (1e-4, 1e-3)


FP16_BOUND = (1e-2, 5e-2)


def make_tiny_run(root: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """A tiny DiAD run folder (config + checkpoint) with random weights and a non-trivial SG network."""

    torch.manual_seed(seed)
    cfg = build_config("diad", "tiny", overrides)
    model = DiADModel(cfg).eval()
    with torch.no_grad():  # zero-initialised injection convs would make the SG network a no-op
        g = model.guidance
        for p in [*g.zero_convs.parameters(), *g.mid_zero_conv.parameters(), *g.hint_encoder.net[-1].parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(dump_config(cfg)))
    save_checkpoint(root, "done", model, TrainState("done", 0))
    return root


def tiny_features(seed: int = 1):
    from edgeinspect.models.features import build_feature_extractor

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        return build_feature_extractor("efficientnet_lite0", None, (4, 8, 16), allow_random=True)


@functools.cache
def tiny_bundle() -> tuple[Path, Path]:
    """(run folder, bundle folder with fp32 + fp16), built once per test session and shared by the
    export, bundle and TensorRT tests (read-only: tests that tamper copy it first)."""
    from edgeinspect.export.bundle import export_bundle

    root = Path(tempfile.mkdtemp(prefix="edgeinspect-export-"))
    atexit.register(shutil.rmtree, root, True)
    run = make_tiny_run(root / "run")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        bundle = export_bundle(run, root / "bundle", ("fp32", "fp16"), features=tiny_features(), threads=1)
    return run, bundle


@pytest.fixture(scope="module")
def bundle():
    from edgeinspect.runtime.bundle_loading import load_bundle

    return load_bundle(tiny_bundle()[1])


@pytest.fixture(scope="module")
def role_specs():
    """The export roles of the same model (same weights as the bundle), for parity against torch."""
    from edgeinspect.export.roles import ExportContext
    from edgeinspect.export.methods import build_role_exports
    from edgeinspect.runtime.torch_backend import load_diad

    cfg, model = load_diad(tiny_bundle()[0])
    with torch.no_grad():
        ctx = model.context(cfg.train.prompt)
    return build_role_exports("diad", ExportContext(cfg, model, tiny_features(), ctx))


def test_every_role_exported_with_the_interface_names(bundle):
    nets = bundle.networks
    assert set(nets) == {"vae_encoder", "hint_encoder", "unet", "vae_decoder", "features", "bank_distance", "guidance"}
    for role in ("vae_encoder", "hint_encoder", "unet", "vae_decoder"):
        assert (nets[role].input_names, nets[role].output_names) == ROLE_SIGNATURES[role]
    assert (nets["features"].input_names, nets["features"].output_names) == feature_signature(3)
    g = nets["guidance"]
    assert g.input_names == ROLE_SIGNATURES["unet"][0] and not g.pipeline
    assert g.output_names == ("down_0", "down_1", "down_2", "down_3", "mid")
    assert nets["features"].batch_multiplier == 2
    assert bundle.manifest["opset"] >= 17


def test_graphs_check_and_have_named_dynamic_axes(bundle):
    for role, entry in bundle.networks.items():
        for precision in bundle.precisions:
            path = bundle.onnx_path(role, precision)
            onnx.checker.check_model(str(path))
            graph = onnx.load(str(path)).graph
            assert [i.name for i in graph.input] == list(entry.input_names)
            assert [o.name for o in graph.output] == list(entry.output_names)
            for vi in (*graph.input, *graph.output):  # fp16 variants keep float32 IO
                assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                # a bank (bank_distance's bank_i inputs) has one row per vector, not per frame
                assert vi.type.tensor_type.shape.dim[0].dim_param == ("bank" if vi.name.startswith("bank_") else "batch")
    unet = bundle.network("unet")
    assert unet.inputs[0].shape == ("batch", 4, "latent_height", "latent_width")
    assert unet.inputs[0].deploy_shape == (1, 4, 32, 32)
    assert unet.inputs[2].shape[1:] == tuple(bundle.context.shape[1:])  # prompt length/width static
    assert bundle.network("vae_encoder").inputs[0].shape == ("batch", 3, "height", "width")
    assert bundle.network("vae_decoder").outputs[0].shape == ("batch", 3, "image_height", "image_width")


@pytest.mark.parametrize("role", ["vae_encoder", "hint_encoder", "unet", "vae_decoder", "features", "bank_distance", "guidance"])
def test_onnxruntime_matches_torch(bundle, role_specs, role):
    from edgeinspect.export.onnx import parity_report

    spec = role_specs[role]
    # export size and probe size (another batch and height/width): the dynamic axes really are dynamic
    err, scale = parity_report(spec.module, bundle.onnx_path(role, "fp32"), [spec.inputs, spec.probe],
                               spec.output_names, threads=1)
    for name in spec.output_names:
        assert err[name] <= FP32_BOUND[0] + FP32_BOUND[1] * scale[name], (role, name, err[name], scale[name])
    assert err == pytest.approx(bundle.manifest["parity"]["max_abs_error"][role]["fp32"], abs=1e-6)
    if role != "guidance":  # guidance's down_0/down_1 are exact zeros in "mid" injection mode
        assert all(s > 0.01 for s in scale.values()), scale  # the parity is not vacuous

    if "fp16" in bundle.network(role).files and bundle.network(role).precision["fp16"] == "fp16":
        err16, _ = parity_report(spec.module, bundle.onnx_path(role, "fp16"), [spec.inputs, spec.probe],
                                 spec.output_names, threads=1)
        for name in spec.output_names:
            assert np.isfinite(err16[name])
            assert err16[name] <= FP16_BOUND[0] + FP16_BOUND[1] * scale[name], (role, name, err16[name])


def test_vae_stays_fp32_in_the_fp16_variant(bundle):
    for role in ("vae_encoder", "vae_decoder"):
        e = bundle.network(role)
        assert e.files["fp16"] == e.files["fp32"] and e.precision["fp16"] == "fp32"
    unet16 = onnx.load(str(bundle.onnx_path("unet", "fp16")))
    kinds = {i.data_type for i in unet16.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds
    fp32_norms = [n for n in unet16.graph.node if n.op_type in ("InstanceNormalization", "LayerNormalization", "Softmax")]
    assert fp32_norms  # present and kept: their inputs are cast back to float32
    produced = {o: n for n in unet16.graph.node for o in n.output}
    for n in fp32_norms:
        src = produced.get(n.input[0])
        assert src is not None and src.op_type == "Cast" and src.attribute[0].i == onnx.TensorProto.FLOAT


def test_fp16_refuses_a_variant_that_overflows(tmp_path):
    from edgeinspect.export.fp16 import Fp16ConversionError, convert_onnx_fp16
    from edgeinspect.export.onnx import export_onnx

    class Overflow(torch.nn.Module):
        def forward(self, x):
            return (x * 3e4) * (x * 3e4) * 1e-8 + x  # fine in fp32, inf in fp16

    x = torch.full((2, 4), 2.0)
    g = export_onnx(Overflow(), {"x": x}, tmp_path / "o.onnx", ("y",), {"x": {0: "batch"}})
    dst = tmp_path / "o.fp16.onnx"
    with pytest.raises(Fp16ConversionError, match="exceed the fp16 range"):
        convert_onnx_fp16(g.path, dst, [{"x": x.numpy()}])
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_timestep_path_stays_fp32(role_specs, tmp_path):
    """fp16 t * freq for t near 999 would scramble the sinusoidal embedding: that subgraph stays fp32."""
    from edgeinspect.export.fp16 import nodes_fed_only_by

    unet = tiny_bundle()[1] / "onnx" / "unet.onnx"
    graph = onnx.load(str(unet)).graph
    names = set(nodes_fed_only_by(graph, ["timestep"]))
    ops = {n.op_type for n in graph.node if n.name in names}
    assert {"Sin", "Cos", "Mul", "Gemm"} <= ops
    assert not any(n.op_type == "Conv" for n in graph.node if n.name in names)


def test_external_data_when_over_the_limit(role_specs, tmp_path, monkeypatch):
    import edgeinspect.export.onnx as onnx_export
    from edgeinspect.export.onnx import export_onnx, onnx_parity

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)  # pretend every graph is over 2 GB
    spec = role_specs["vae_decoder"]
    g = export_onnx(spec.module, spec.inputs, tmp_path / "vae_decoder.onnx", spec.output_names, spec.dynamic_axes,
                    probe=spec.probe)
    assert g.external_data and [p.name for p in g.files] == ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    assert g.files[1].stat().st_size > g.files[0].stat().st_size
    m = onnx.load(str(g.path), load_external_data=False)
    big = [t for t in m.graph.initializer if int(np.prod(t.dims)) * 4 > 1024]  # the size_threshold
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    err = onnx_parity(spec.module, g.path, spec.probe, threads=1)
    assert err["image"] < 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_dynamo_exporter_when_available(role_specs, tmp_path):
    pytest.importorskip("onnxscript")
    from edgeinspect.export.onnx import export_onnx, onnx_parity

    spec = role_specs["hint_encoder"]
    g = export_onnx(spec.module, spec.inputs, tmp_path / "h.onnx", spec.output_names, spec.dynamic_axes,
                    probe=spec.probe, exporter="dynamo")
    assert onnx_parity(spec.module, g.path, [spec.inputs, spec.probe], threads=1)["hint"] < 1e-4


def test_export_verb(tmp_path, capsys):
    import argparse

    from edgeinspect.export.cli import add_export_parser

    ap = argparse.ArgumentParser(prog="edgeinspect")
    add_export_parser(ap.add_subparsers(dest="verb", required=True))
    run = tiny_bundle()[0]
    args = ap.parse_args(["export", "--model", str(run), "--out", str(tmp_path / "b"), "--quiet", "--threads", "1"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "bundle:" in out and "unet" in out and "max |torch - onnxruntime|" in out
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["precisions"] == ["fp32"] and manifest["source"]["checkpoint"] == "done"
    # an existing bundle is not replaced without --overwrite
    args = ap.parse_args(["export", "--model", str(run), "--out", str(tmp_path / "b"), "--quiet"])
    assert args.func(args) == 2
    assert "already exists" in capsys.readouterr().err
