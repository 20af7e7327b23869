"""benchmarks/latency.py end to end on tiny DiAD and GLAD runs (random weights): every backend this
machine has, the JSON keys and positive numbers, the markdown table. The timings themselves mean nothing
here (tiny models, a loaded test machine)."""

from __future__ import annotations

import json

import pytest
import torch

try:
    from tests.conftest import SAMPLE, load_benchmark
    from tests.test_export import make_tiny_run
    from tests.test_export_glad import make_tiny_glad_run, sample_frames
except ImportError:
    from conftest import SAMPLE, load_benchmark
    from test_export import make_tiny_run
    from test_export_glad import make_tiny_glad_run, sample_frames



def _latency_module():
    return load_benchmark("latency")


def _positive(x) -> bool:
    return isinstance(x, float) and x > 0


def test_latency_script_end_to_end(tmp_path, capsys):
    latency = _latency_module()
    diad = make_tiny_run(tmp_path / "diad")
    glad = make_tiny_glad_run(tmp_path / "glad", sample_frames()[:8])
    results = tmp_path / "results"
    argv = ["--diad", str(diad), "--glad", str(glad), "--threads", "1", "--warmup", "1", "--repeats", "3",
            "--num-frames", "2", "--frames", str(SAMPLE / "test"), "--fp16", "--cache", str(tmp_path / "cache"),
            "--results", str(results), "--machine", "testbox", "--peak-size", "256",
            "--glad-set", "inference.draws=2", "--glad-set", "inference.steps=4"]
    res = latency.main(argv)
    assert torch.get_num_threads() == 1
    out = capsys.readouterr().out
    assert "[diad] torch" in out and "[glad] torch" in out and "latency_testbox.json" in out
    saved = json.loads((results / "latency_testbox.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["command"].startswith("python benchmarks/latency.py --diad ")
    assert _positive(saved["measured_peak"]["gflops"]) and saved["measured_peak"]["threads"] == 1
    assert saved["machine"]["threads"] == 1 and saved["machine"]["slug"] == "testbox"
    # the GLAD overrides reach every backend alike (parity below is against torch with the same settings)
    g = saved["methods"]["glad"]
    assert g["overrides"] == ["inference.draws=2", "inference.steps=4"] and saved["methods"]["diad"]["overrides"] == []
    assert g["settings"]["draws"] == 2 and g["settings"]["steps"] == 4
    assert "overrides inference.draws=2, inference.steps=4" in (results / "latency_testbox.md").read_text()
    stages = {"diad": {"encode", "denoise", "decode", "features", "scoring"},
              "glad": {"encode", "denoise", "adp_unet", "adp_decode", "adp_features", "adp_scoring", "saff",
                       "decode", "features", "scoring"}}
    for method in ("diad", "glad"):
        r = saved["methods"][method]
        for key in ("torch_ms", "ort_ms", "ort_vs_torch_speedup", "gflop_per_frame", "peak_fraction"):
            assert _positive(r[key]), (method, key, r[key])
        assert r["ort_vs_torch_speedup"] == pytest.approx(r["torch_ms"] / r["ort_ms"])
        assert {"torch", "onnxruntime_fp32", "onnxruntime_fp16"} <= set(r["backends"]) == set(r["stage_ms"])
        for b, v in r["backends"].items():
            assert v["ms"]["p10"] <= v["ms"]["median"] <= v["ms"]["p90"] and v["ms"]["n"] == 3
            assert _positive(v["gflops_achieved"]) and _positive(r["peak_fraction_by_backend"][b])
            assert set(r["stage_ms"][b]) == stages[method], (method, b)
            assert all(ms >= 0 for ms in r["stage_ms"][b].values()) and r["stage_ms"][b]["denoise"] > 0
        assert r["peak_fraction"] == r["peak_fraction_by_backend"]["onnxruntime_fp32"]
        assert r["backend_errors"] == {}
        for b, v in r["backends"].items():
            assert v["fps"] == pytest.approx(1e3 / v["ms"]["median"])
        # every backend against onnxruntime fp32 on the CPU, the reference of the GPU check
        vs_ort = r["parity"]["max_abs_score_diff_vs_onnxruntime_cpu"]
        assert set(vs_ort) == set(r["backends"]) - {"onnxruntime_fp32"}
        assert vs_ort["torch"] == r["parity"]["max_abs_score_diff_vs_torch"]["onnxruntime_fp32"]
        assert r["parity"]["max_rel_score_diff_vs_onnxruntime_cpu"]["onnxruntime_fp16"] < 5e-2
        assert any(k.startswith("aten.convolution") for k in r["gflop_by_op"])
        par = r["parity"]["max_abs_score_diff_vs_torch"]
        assert par["onnxruntime_fp32"] < 1e-4  # the same networks (the extractor shared with the bundle)
        assert par["onnxruntime_fp16"] < 5e-2
    assert saved["methods"]["glad"]["settings"]["adp_threshold"] is not None
    md = (results / "latency_testbox.md").read_text()
    assert "# Latency per frame: testbox" in md and "python benchmarks/latency.py --diad" in md
    assert "| onnxruntime_fp32 |" in md and "onnxruntime fp32 vs torch eager" in md and "## GLAD" in md
    assert "Measured peak (CPU):" in md and "| adp_unet |" in md and "| torch | CPU, 1 thr |" in md
    assert not [p for p in results.iterdir() if p.name.startswith(".")]
    # a GPU backend's row says so and gets no fraction of the CPU's measured peak
    assert all(v["runs_on"] == "cpu" for r in saved["methods"].values() for v in r["backends"].values())
    gpu = json.loads(json.dumps(saved))
    r = gpu["methods"]["diad"]
    r["backends"]["torch_cuda"] = {**r["backends"].pop("torch"), "runs_on": "gpu", "peak_fraction": None}
    r["stage_ms"]["torch_cuda"] = r["stage_ms"].pop("torch")
    gpu["note"] = "How the runs were made."
    md = latency.markdown(gpu)
    row = next(ln for ln in md.splitlines() if ln.startswith("| torch_cuda |"))
    assert row.startswith("| torch_cuda | GPU |") and row.split("|")[8].strip() == "-"
    assert "How the runs were made." in md


class _Result:
    def __init__(self, score: float):
        self.scores = torch.tensor([score])
        self.timings_ms = {"denoise": 1.0}


def test_a_failing_gpu_backend_is_dropped_and_reported():
    latency = _latency_module()

    def broken(x):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    pipes = {"torch_cuda": lambda x: _Result(1.0), "onnxruntime_fp32": lambda x: _Result(1.0 + 1e-6),
             "tensorrt_fp16": broken, "onnxruntime_cuda_fp32": lambda x: _Result(1.5)}
    frames = torch.zeros(2, 3, 8, 8)
    timed, scores, failed = latency.time_backends(pipes, frames, warmup=1, repeats=3,
                                                  required=("torch_cuda", "onnxruntime_fp32"))
    assert set(timed) == set(scores) == {"torch_cuda", "onnxruntime_fp32", "onnxruntime_cuda_fp32"}
    assert failed == {"tensorrt_fp16": "RuntimeError: CUDA error: no kernel image is available for execution on "
                                       "the device"}
    assert all(t["ms"]["n"] == 3 for t in timed.values()) and "tensorrt_fp16" in pipes  # the caller's dict kept
    absolute, relative = latency.max_score_diffs(scores, "onnxruntime_fp32")
    assert absolute["onnxruntime_cuda_fp32"] == pytest.approx(0.5 - 1e-6, abs=1e-6)
    assert relative["onnxruntime_cuda_fp32"] == pytest.approx((0.5 - 1e-6) / (1.0 + 1e-6), abs=1e-6)
    assert absolute["torch_cuda"] == pytest.approx(1e-6, abs=1e-7)
    # a reference that fails stops the run: there would be nothing to compare with
    with pytest.raises(RuntimeError, match="no kernel image"):
        latency.time_backends({"torch_cuda": broken, "onnxruntime_fp32": lambda x: _Result(1.0)}, frames, 1, 1,
                              required=("torch_cuda", "onnxruntime_fp32"))


def test_latency_script_needs_a_run():
    latency = _latency_module()
    with pytest.raises(SystemExit):
        latency.parse_args([])
    assert latency.parse_args(["--diad", "x"]).threads >= 1
    assert latency.parse_args(["--diad", "x"]).backends is None
    args = latency.parse_args(["--diad", "x", "--device", "cuda", "--backends",
                               "torch_cuda, onnxruntime_fp32,tensorrt_fp16"])
    assert args.backends == {"torch_cuda", "onnxruntime_fp32", "tensorrt_fp16"}
    for refs in ("torch,onnxruntime_fp32", "torch_cuda,tensorrt_fp16"):  # the references must be timed
        with pytest.raises(SystemExit):
            latency.parse_args(["--diad", "x", "--device", "cuda", "--backends", refs])
    assert latency.slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-r-xeon-r-cpu-2-20ghz"


def test_speed_levers_are_timed_against_the_baseline_and_scored(tmp_path):
    latency = _latency_module()
    glad = make_tiny_glad_run(tmp_path / "glad", sample_frames()[:8])
    levers = tmp_path / "levers.yaml"
    levers.write_text(
        "glad:\n"
        "  baseline: {backend: torch, set: {inference.draws: 2, inference.steps: 4}}\n"
        "  default: {backend: onnxruntime_fp32, set: {inference.steps: 4, inference.adp_space: latent}}\n"
        "  levers:\n"
        "    one draw: {backend: torch, set: {inference.steps: 4}}\n")
    results = tmp_path / "results"
    res = latency.main(["--glad", str(glad), "--threads", "1", "--warmup", "1", "--repeats", "2", "--num-frames", "2",
                        "--frames", str(SAMPLE / "test"), "--cache", str(tmp_path / "cache"), "--results",
                        str(results), "--machine", "testbox", "--peak-size", "128", "--levers", str(levers),
                        "--accuracy", "--accuracy-data", str(SAMPLE), "--accuracy-every", "2"])
    g = res["methods"]["glad"]
    assert list(g["levers"]) == ["baseline", "default", "one draw"]
    assert g["levers"]["baseline"]["speedup_vs_baseline"] == 1.0
    assert g["speedup_vs_baseline"] == pytest.approx(g["baseline_ms"] / g["default_ms"])
    # the latent check: no decode or extractor call inside the ADP checks of the default
    assert "adp_decode" in g["levers"]["baseline"]["stage_ms"] and "adp_decode" not in g["levers"]["default"]["stage_ms"]
    for name, row in g["levers"].items():
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0, name
        assert row["accuracy_backend"] == "onnxruntime_fp32"
    assert g["image_auroc_accurate"] == g["levers"]["baseline"]["image_auroc"]
    assert g["image_auroc_fast"] == g["levers"]["default"]["image_auroc"]
    md = (results / "latency_testbox.md").read_text()
    assert "**Speed levers**" in md and "| one draw | torch | inference.steps=4 |" in md


def test_a_levers_file_names_its_backends(tmp_path):
    latency = _latency_module()
    bad = tmp_path / "levers.yaml"
    bad.write_text("diad:\n  baseline: {backend: torch}\n  default: {backend: tensorrt}\n")
    with pytest.raises(SystemExit, match="default: backend 'tensorrt'"):
        latency.parse_args(["--diad", "x", "--levers", str(bad)])
    bad.write_text("diad:\n  baseline: {backend: torch}\n")
    with pytest.raises(SystemExit, match="diad.default needs a backend"):
        latency.parse_args(["--diad", "x", "--levers", str(bad)])
