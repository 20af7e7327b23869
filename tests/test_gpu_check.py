"""benchmarks/gpu_check.py without a GPU: the stage plan and its time boxes (real subprocesses killed when
their box runs out), the commands and the backends each stage gets, the environment (carried wheels, no
package index, the venv recipe), the probe and the report when CUDA and TensorRT are missing, the engine
build through latency.py's TensorRT pipeline (against a stand-in TensorRT backend), and the CPU-only
rehearsal (--dry-run) end to end. What only a GPU can show (engines that build and run, CUDA timings) is
not tested here: the next session with a lent GPU runs the check itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

try:
    from tests.conftest import REPO, SAMPLE, load_benchmark
    from tests.test_export import tiny_bundle
    from tests.test_export_glad import tiny_glad_bundle
except ImportError:
    from conftest import REPO, SAMPLE, load_benchmark
    from test_export import tiny_bundle
    from test_export_glad import tiny_glad_bundle


@pytest.fixture(scope="module")
def gc():
    return load_benchmark("gpu_check")


def _ctx(gc, tmp_path, dry_run=False, facts=None, threads=16):
    env = gc.Env("system", sys.executable, [str(REPO)], "test")
    return gc.Context(env, tmp_path, dry_run, threads, steps=2, warmup=2, repeats=12, num_frames=8,
                      cpu_slots=2, facts=dict(facts or {}))


# --------------------------------------------------------------------------- plan and time boxes


def test_plan_orders_and_links_the_stages(gc):
    stages = gc.plan_stages()
    names = [s.name for s in stages]
    assert names == ["probe", "train_diad", "train_glad", "export_diad", "export_glad", "int8_diad", "int8_glad",
                     "engines_diad_fp16", "engines_glad_fp16", "engines_diad_int8", "engines_glad_int8",
                     "latency_diad", "latency_glad"]
    by = {s.name: s for s in stages}
    assert by["train_glad"].after == ("train_diad",)  # GLAD starts from the DiAD run
    assert by["engines_glad_int8"].after == ("int8_glad",) and by["engines_glad_fp16"].after == ("export_glad",)
    # measuring needs only the bundle: failed engines leave their backend out, not the measurement
    assert by["latency_glad"].after == ("export_glad",) and by["latency_glad"].resource == "alone"
    assert {by[n].resource for n in names if n.startswith(("train", "engines"))} == {"gpu"}
    assert [s.name for s in stages if s.measures] == ["latency_diad", "latency_glad"]
    assert by["latency_glad"].box_s == gc.DEFAULT_BOXES["latency_glad"]


def test_plan_for_glad_alone_without_int8(gc):
    stages = gc.plan_stages(("glad",), ("fp16",), {"engines": 33.0})
    assert [s.name for s in stages] == ["probe", "train_glad", "export_glad", "engines_glad_fp16", "latency_glad"]
    assert stages[1].after == ("probe",)  # no DiAD run to start from: GLAD trains its own base
    assert stages[3].box_s == 33.0


def test_time_box_leaves_the_measuring_stages_their_time(gc):
    prep = gc.Stage("export_diad", "export", 120.0)
    measure = gc.Stage("latency_diad", "latency", 75.0, resource="alone")
    # 480 s budget, report reserve 15 s, 175 s of measuring still to come: preparing ends at 290 s
    assert gc.time_box(prep, now=100.0, start=0.0, budget_s=480.0, measure_reserve_s=175.0) == 120.0
    assert gc.time_box(prep, now=250.0, start=0.0, budget_s=480.0, measure_reserve_s=175.0) == pytest.approx(40.0)
    assert gc.time_box(prep, now=400.0, start=0.0, budget_s=480.0, measure_reserve_s=175.0) == 0.0
    # a measuring stage is cut only by the report's reserve
    assert gc.time_box(measure, now=400.0, start=0.0, budget_s=480.0, measure_reserve_s=175.0) == pytest.approx(65.0)


def _sleeper(seconds: float, pid_file: Path) -> list[str]:
    """A command whose child process sleeps (its pid written down): a time box must end both."""
    code = (f"import subprocess, sys, time; c = subprocess.Popen(['sleep', '{seconds}']); "
            f"open(r'{pid_file}', 'w').write(str(c.pid)); print('started', flush=True); c.wait()")
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by init) is dead too
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


def test_run_stages_boxes_kills_and_skips(gc, tmp_path):
    S = gc.Stage
    stages = [S("probe", "probe", 30.0),
              S("train_diad", "train", 1.0, ("probe",), "gpu", "diad"),          # runs past its box
              S("export_diad", "export", 30.0, ("train_diad",), "cpu", "diad"),  # so never starts
              S("train_glad", "train", 30.0, ("probe",), "gpu", "glad"),         # fails
              S("engines_glad_fp16", "engines", 30.0, ("probe",), "gpu", "glad", "fp16"),  # refused by command_for
              S("latency_glad", "latency", 10.0, ("probe",), "alone", "glad")]
    pid_file = tmp_path / "child.pid"
    order = []
    commands = {
        "probe": [sys.executable, "-c", "print('probing')"],
        "train_diad": _sleeper(60, pid_file),
        "train_glad": [sys.executable, "-c", "import sys; print('step 1'); "
                                             "sys.exit('RuntimeError: CUDA error: out of memory')"],
        "latency_glad": [sys.executable, "-c", "print('timing')"],
    }

    def command_for(stage):
        if stage.name == "engines_glad_fp16":
            return gc.Outcome("skipped", reason="tensorrt: import failed: No module named 'tensorrt'")
        return commands[stage.name]

    log = gc.Log(tmp_path / "check.log", time.monotonic())
    t0 = time.monotonic()
    outcomes = gc.run_stages(stages, start=t0, budget_s=60.0, log=log, command_for=command_for,
                             on_done=lambda s, o: order.append(s.name), cpu_slots=2)
    log.close()
    took = time.monotonic() - t0
    st = {n: o.status for n, o in outcomes.items()}
    assert st == {"probe": "ok", "train_diad": "timeout", "export_diad": "skipped", "train_glad": "failed",
                  "engines_glad_fp16": "skipped", "latency_glad": "ok"}
    # 60 s budget - 15 s for the report - 10 s for measuring: the preparing stages had at most 35 s
    assert outcomes["train_glad"].box_s <= 35.0 and outcomes["latency_glad"].box_s == 10.0
    assert outcomes["train_diad"].reason == "time box of 1 s ran out" and outcomes["train_diad"].seconds < 15
    assert not _alive(int(pid_file.read_text()))  # the whole process group was ended, the child too
    assert outcomes["export_diad"].reason == "needs train_diad (timeout)"
    assert outcomes["train_glad"].reason == "RuntimeError: CUDA error: out of memory" and outcomes["train_glad"].rc == 1
    assert outcomes["engines_glad_fp16"].reason.startswith("tensorrt: import failed")
    # the measuring stage ran after every preparing one
    assert order.index("latency_glad") > max(order.index(n) for n in ("train_diad", "train_glad", "export_diad"))
    assert took < 40
    text = (tmp_path / "check.log").read_text()
    assert re.search(r"^\[\d\d:\d\d:\d\d \+\s*\d+\.\ds\] train_glad: step 1$", text, re.M)
    assert "train_diad: time box of 1 s ran out: stopped" in text


def test_a_stage_that_no_longer_fits_is_not_started(gc, tmp_path):
    log = gc.Log(tmp_path / "check.log", time.monotonic())
    ran = []
    # 19 s budget - 15 s for the report: 4 s are left, under the 5 s a stage needs to be started
    outcomes = gc.run_stages([gc.Stage("latency_diad", "latency", 30.0, (), "alone", "diad")], start=time.monotonic(),
                             budget_s=19.0, log=log, command_for=lambda s: ran.append(s) or ["true"],
                             on_done=lambda s, o: None)
    log.close()
    assert ran == [] and outcomes["latency_diad"].status == "skipped"
    assert outcomes["latency_diad"].reason == "out of time (4 s left of the 19 s budget for it)"


def test_run_stages_refuses_an_unplanned_dependency(gc, tmp_path):
    log = gc.Log(tmp_path / "check.log", time.monotonic())
    with pytest.raises(ValueError, match="needs \\['train_diad'\\]"):
        gc.run_stages([gc.Stage("export_diad", "export", 1.0, ("train_diad",))], start=time.monotonic(),
                      budget_s=10.0, log=log, command_for=lambda s: [], on_done=lambda s, o: None)
    log.close()


def test_failure_reason_picks_the_error_line(gc):
    tb = ["Traceback (most recent call last):\n", '  File "x.py", line 3, in <module>\n',
          "edgeinspect.runtime.tensorrt_engines.TensorRTUnavailableError: cannot build or run TensorRT engines here\n", "\n"]
    assert gc.failure_reason(tb) == ("edgeinspect.runtime.tensorrt_engines.TensorRTUnavailableError: cannot build or run "
                                     "TensorRT engines here")
    assert gc.failure_reason(["edgeinspect calibrate: bundle x: not a folder\n"]) == \
        "edgeinspect calibrate: bundle x: not a folder"
    assert gc.failure_reason(["just some\n", "last line\n"]) == "last line"
    assert gc.failure_reason([]) == "no output"


# --------------------------------------------------------------------------- arguments and commands


def test_arguments(gc, tmp_path):
    a = gc.parse_args(["check"])
    assert (a.steps, a.warmup, a.repeats, a.num_frames, a.env) == (2, 2, 12, 8, "auto")
    assert a.results == gc.RESULTS and a.budget == 480.0 and a.methods == ("diad", "glad")
    d = gc.parse_args(["check", "--dry-run", "--work", str(tmp_path), "--methods", "glad,diad",
                       "--precisions", "int8", "--box", "engines=30"])
    assert (d.steps, d.warmup, d.repeats, d.num_frames) == (1, 1, 2, 2)
    assert d.results == tmp_path / "results"  # a rehearsal never writes into benchmarks/results
    assert (d.env, d.wheels) == ("system", None) and a.wheels == gc.WHEELS  # nor installs the GPU extra
    assert d.methods == ("diad", "glad") and d.precisions == ("int8",) and d.box == [("engines", 30.0)]
    for bad in (["--methods", "patchcore"], ["--box", "warp=3"], ["--box", "engines=-1"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            gc.parse_args(["check", *bad])
    with pytest.raises(SystemExit):
        gc.parse_args([])


def test_train_commands(gc, tmp_path):
    ctx = _ctx(gc, tmp_path)
    diad = ctx.train_args("diad", 8)
    assert diad[:2] == ["train", "diad"] and "--resume" in diad
    assert diad[diad.index("--config") + 1] == str(REPO / "configs" / "diad_mtd_edge.yaml")
    sets = [diad[i + 1] for i, a in enumerate(diad) if a == "--set"] + [a[6:] for a in diad if a.startswith("--set=")]
    assert {f"train.data_root={SAMPLE}", "train.device=cuda", "train.threads=8", "train.autoencoder_steps=2",
            "train.unet_steps=2", "train.guidance_steps=2"} <= set(sets)
    glad = ctx.train_args("glad", 8)
    assert "train.autoencoder_steps=2" in " ".join(glad) and "train.init_from=null" in glad  # no DiAD run: its own base
    ctx.facts["trained_diad"] = True
    glad = ctx.train_args("glad", 8)
    assert f"train.init_from={tmp_path / 'runs' / 'diad'}" in glad and "calibration.images=8" in glad
    assert "autoencoder_steps" not in " ".join(glad)
    dry = _ctx(gc, tmp_path, dry_run=True).train_args("diad", 1)
    assert dry[dry.index("--preset") + 1] == "tiny" and "--config" not in dry
    assert "train.device=cpu" in dry and "features.weights=default" in dry


def test_commands_and_skips_follow_what_the_probe_found(gc, tmp_path):
    no_gpu = {"probe": {"cuda": False, "cuda_problem": "torch.cuda.is_available() is False",
                        "tensorrt_problems": ["import failed: ModuleNotFoundError: No module named 'tensorrt'"],
                        "onnxruntime_cuda": False},
              "bundle_diad": "/b/diad", "bundle_glad": "/b/glad"}
    ctx = _ctx(gc, tmp_path, facts=no_gpu)
    by = {s.name: s for s in gc.plan_stages()}
    train = ctx.command_for(by["train_diad"])
    assert isinstance(train, gc.Outcome) and train.reason == "no CUDA GPU: torch.cuda.is_available() is False"
    eng = ctx.command_for(by["engines_glad_fp16"])
    assert isinstance(eng, gc.Outcome) and eng.reason == ("tensorrt: import failed: ModuleNotFoundError: No module "
                                                          "named 'tensorrt'")
    assert ctx.latency_backends("diad") == ["torch_cuda", "onnxruntime_fp32"]
    # the rehearsal trains on the CPU without a GPU
    assert not isinstance(_ctx(gc, tmp_path, dry_run=True, facts=no_gpu).command_for(by["train_diad"]), gc.Outcome)

    gpu = {"probe": {"cuda": True, "tensorrt_problems": [], "onnxruntime_cuda": True},
           "bundle_diad": "/b/diad", "bundle_glad": "/b/glad", "engines_glad_fp16": {"build_s": 1.0}}
    ctx = _ctx(gc, tmp_path, facts=gpu)
    eng = ctx.command_for(by["engines_glad_fp16"])
    assert eng[2:4] == ["worker-engines", "--bundle"] and eng[4] == "/b/glad"
    assert eng[eng.index("--precision") + 1] == "fp16"
    assert eng[eng.index("--timing-cache-from") + 1] == "/b/diad/engines/timing.cache"
    assert "--timing-cache-from" not in ctx.command_for(by["engines_diad_fp16"])
    int8 = ctx.command_for(by["int8_glad"])
    assert int8[1:4] == ["-m", "edgeinspect.cli", "calibrate"] and "--int8" in int8
    assert int8[int8.index("--bundle") + 1] == "/b/glad"
    assert ctx.latency_backends("glad") == ["torch_cuda", "onnxruntime_fp32", "onnxruntime_cuda_fp32",
                                            "onnxruntime_cuda_fp16", "tensorrt_fp16"]
    lat = ctx.command_for(by["latency_glad"])
    assert lat[1] == str(REPO / "benchmarks" / "latency.py") and lat[lat.index("--device") + 1] == "cuda"
    assert lat[lat.index("--backends") + 1] == ("torch_cuda,onnxruntime_fp32,onnxruntime_cuda_fp32,"
                                                "onnxruntime_cuda_fp16,tensorrt_fp16")
    assert lat[lat.index("--threads") + 1] == "16"  # measuring runs alone, on every core
    assert ctx.command_for(by["export_glad"])[ctx.command_for(by["export_glad"]).index("--threads") + 1] == "8"


# --------------------------------------------------------------------------- environment


def _wheel(folder: Path, name: str = "gcprobe_pkg", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel whose module says it came from the carried wheel."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "CARRIED = True\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_system_env_installs_the_carried_wheels(gc, tmp_path):
    _wheel(tmp_path / "whl")
    log = gc.Log(tmp_path / "check.log", time.monotonic())
    env = gc.prepare_env("auto", tmp_path / "work", log, 60.0, tmp_path / "whl")
    log.close()
    assert env.mode == "system" and env.why == f"1 carried wheel(s) in {tmp_path / 'whl'}"
    assert env.outcome.status == "ok" and env.wheels == ["gcprobe_pkg-0.1-py3-none-any.whl"]
    assert env.pythonpath == [str(REPO), str(tmp_path / "work" / "site")]
    out = subprocess.run([env.python, "-c", "import gcprobe_pkg, edgeinspect; print(gcprobe_pkg.CARRIED)"],
                         env=env.environ(), capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "True", out.stderr
    assert env.report()["wheels"] == env.wheels


def test_auto_env_without_an_index_uses_the_system_python(gc, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    log = gc.Log(tmp_path / "check.log", time.monotonic())
    env = gc.prepare_env("auto", tmp_path / "work", log, 60.0, tmp_path / "no-wheels")
    log.close()
    assert env.mode == "system" and env.python == sys.executable
    assert env.why.startswith("the package index did not answer")
    assert env.outcome.status == "ok" and env.pythonpath == [str(REPO)]


def test_venv_env_recipe(gc, tmp_path, monkeypatch):
    ran = []

    def fake_run(argv, box_s, log, who, env=None, cwd=gc.REPO):
        ran.append(argv)
        if argv[1:3] == ["-m", "venv"]:
            Path(argv[3]).mkdir(parents=True, exist_ok=True)
        return gc.Outcome("ok", 0.1, box_s, "", " ".join(argv), 0)

    monkeypatch.setattr(gc, "run_command", fake_run)
    log = gc.Log(tmp_path / "check.log", time.monotonic())
    env = gc.prepare_env("venv", tmp_path, log, 200.0)
    log.close()
    py = str(tmp_path / "venv" / "bin" / "python")
    assert env.mode == "venv" and env.python == py and env.outcome.status == "ok"
    assert ran[0] == [sys.executable, "-m", "venv", str(tmp_path / "venv")]
    assert ran[1][-2:] == ["-e", f"{gc.REPO}[gpu]"] and ran[1][0] == py
    # both packages install the module onnxruntime: the CPU one goes, the GPU one is laid down whole again
    assert ran[2][0] == py and ran[2][-4:] == ["uninstall", "--quiet", "-y", "onnxruntime"]
    assert ran[3][-3:] == ["--no-deps", "--force-reinstall", "onnxruntime-gpu==1.31.1"]
    assert gc.pyproject_pin("onnxruntime-gpu", "gpu") == "1.31.1" and gc.pyproject_pin("torch") == "2.14.1"

    # the recipe done, a rerun reuses the venv while pyproject.toml is unchanged
    ran.clear()
    log = gc.Log(tmp_path / "check1.log", time.monotonic())
    again = gc.prepare_env("venv", tmp_path, log, 200.0)
    log.close()
    assert ran == [] and again.outcome.status == "ok" and again.why.endswith("reusing the venv installed for this "
                                                                             "pyproject.toml")
    (tmp_path / "venv" / ".gpu-check-installed").write_text("another pyproject")

    def failing(argv, box_s, log, who, env=None, cwd=gc.REPO):
        return gc.Outcome("failed", 1.0, box_s, "ERROR: No matching distribution found for tensorrt==11.4.0.106",
                          " ".join(argv), 1) if "-e" in argv else gc.Outcome("ok", 0.1, box_s)

    monkeypatch.setattr(gc, "run_command", failing)
    log = gc.Log(tmp_path / "check2.log", time.monotonic())
    env = gc.prepare_env("venv", tmp_path, log, 200.0)
    log.close()
    assert env.outcome.status == "failed" and "tensorrt==11.4.0.106" in env.outcome.reason


def test_a_failed_venv_falls_back_to_the_system_python(gc, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there: the install fails
    monkeypatch.setenv("PIP_RETRIES", "0")
    args = gc.parse_args(["check", "--env", "venv", "--work", str(tmp_path), "--wheels", str(tmp_path / "none")])
    log = gc.Log(tmp_path / "check.log", time.monotonic())
    env, outcomes = gc.choose_env(args, log, {}, 300.0)
    log.close()
    assert env.mode == "system" and env.python == sys.executable and env.why == "the venv failed, --env system"
    assert list(outcomes) == ["env_venv", "env"] and outcomes["env"].status == "ok"
    venv = outcomes["env_venv"]
    assert venv.status == "failed" and venv.box_s == pytest.approx(240.0, abs=1.0)
    assert venv.reason.startswith("ERROR: No matching distribution found for ") and venv.command.endswith("[gpu]'")
    lines = gc.failures(outcomes, {}, {}, env)
    assert lines == [f"env_venv: failed: {outcomes['env_venv'].reason}"]


def test_carried_requirements(gc):
    import importlib.metadata

    reqs = dict(r.split("==") for r in gc.carried_requirements())
    assert set(reqs) == set(gc.CARRIED_WHEELS)
    assert reqs["diffusers"] == gc.pyproject_pin("diffusers") == "0.42.1" and reqs["timm"] == "1.0.31"
    assert reqs["pydantic-core"] == importlib.metadata.version("pydantic-core")  # as pydantic pins it here


# --------------------------------------------------------------------------- probe, engines, report


def test_probe_here_reports_what_is_missing(gc):
    facts = gc.probe()
    assert facts["imports"]["torch"]["ok"] and facts["imports"]["diffusers"]["version"] == "0.42.1"
    assert facts["imports"]["onnxruntime"]["distributions"] == ["onnxruntime"]
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: this test is about its absence")
    assert facts["cuda"] is False and facts["onnxruntime_cuda"] is False
    assert facts["cuda_problem"].startswith("torch.cuda.is_available() is False")
    if not facts["imports"]["tensorrt"]["ok"]:
        assert facts["tensorrt_problems"][0] == facts["imports"]["tensorrt"]["error"]
        assert facts["tensorrt_problems"][0].startswith("import failed: ModuleNotFoundError")
    assert any("no CUDA GPU is visible" in p for p in facts["tensorrt_problems"])
    env = gc.Env("system", sys.executable, [], "test", gc.Outcome("ok"))
    lines = gc.failures({"train_diad": gc.Outcome("skipped", reason="no CUDA GPU: x")}, facts, {}, env)
    assert "train_diad: skipped: no CUDA GPU: x" in lines
    if not facts["imports"]["tensorrt"]["ok"]:
        assert lines[0].startswith("tensorrt: import failed: ")


def test_failures_name_a_mixed_onnxruntime_and_missing_dependencies(gc):
    facts = {"cuda": True, "onnxruntime_cuda": False, "onnxruntime_providers": ["CPUExecutionProvider"],
             "imports": {"diffusers": {"ok": False, "error": "import failed: ModuleNotFoundError: No module named "
                                                             "'diffusers'", "distributions": []},
                         "onnxruntime": {"ok": True, "version": "1.31.1",
                                         "distributions": ["onnxruntime", "onnxruntime-gpu"]}}}
    env = gc.Env("venv", "py", [], "x", gc.Outcome("failed", reason="pip broke"))
    methods = {"diad": {"backend_errors": {"tensorrt_int8": "RuntimeError: engine build failed"}}}
    assert gc.failures({}, facts, methods, env) == [
        "env (venv): failed: pip broke",
        "diffusers: import failed: ModuleNotFoundError: No module named 'diffusers' (a project dependency: "
        "`make gpu-wheels` to carry it)",
        "onnxruntime: the module comes from onnxruntime and onnxruntime-gpu at once (uninstall onnxruntime, "
        "reinstall onnxruntime-gpu)",
        "onnxruntime CUDA: CUDAExecutionProvider is not in this onnxruntime build (providers CPUExecutionProvider): "
        "onnxruntime-gpu is not installed",
        "latency_diad tensorrt_int8: RuntimeError: engine build failed"]


def _backend(ms: float, runs_on: str, vs_torch: float) -> dict:
    return {"ms": {"median": ms}, "runs_on": runs_on, "fps": 1e3 / ms, "vs_torch_speedup": vs_torch}


def test_targets(gc):
    methods = {"diad": {"backends": {"torch_cuda": _backend(200.0, "gpu", 1.0),
                                     "onnxruntime_fp32": _backend(210.0, "cpu", 0.95),
                                     "tensorrt_fp16": _backend(8.0, "gpu", 25.0),
                                     "tensorrt_int8": _backend(6.0, "gpu", 33.3)}},
               "glad": {"backends": {"torch_cuda": _backend(320.0, "gpu", 1.0),
                                     "onnxruntime_fp32": _backend(776.0, "cpu", 0.41)},
                        "backend_errors": {"tensorrt_fp16": "RuntimeError: could not deserialize"}}}
    t = gc.evaluate_targets(methods, ("diad", "glad"), {})
    assert t["diad"]["tensorrt_fp16_vs_torch_eager"] == {"target": 20.0, "value": 25.0, "backend": "tensorrt_fp16",
                                                         "met": True}
    assert t["diad"]["fps_batch1"]["backend"] == "tensorrt_int8" and t["diad"]["fps_batch1"]["met"] is True
    assert t["diad"]["fps_batch1"]["value"] == pytest.approx(1e3 / 6.0)
    g = t["glad"]
    assert g["tensorrt_fp16_vs_torch_eager"]["met"] is None
    assert g["tensorrt_fp16_vs_torch_eager"]["why"] == "RuntimeError: could not deserialize"
    assert g["fps_batch1"]["value"] == pytest.approx(1e3 / 320.0) and g["fps_batch1"]["met"] is False
    lat = {"latency_glad": gc.Outcome("timeout", reason="time box of 100 s ran out")}
    none = gc.evaluate_targets({}, ("glad",), lat)["glad"]
    assert none["fps_batch1"] == {"target": 30.0, "value": None, "backend": None, "met": None,
                                  "why": "latency_glad timeout: time box of 100 s ran out"}


def test_report_when_nothing_was_measured(gc, tmp_path):
    env = gc.Env("venv", "py", [], "the package index answered",
                 gc.Outcome("failed", 12.0, 240.0, "ERROR: No matching distribution found for tensorrt"))
    ctx = gc.Context(env, tmp_path, False, 16, 2, 2, 12, 8, 2)
    outcomes = {"env": env.outcome, **{s.name: gc.Outcome("skipped", reason="needs env (failed)")
                                       for s in gc.plan_stages()}}
    res = gc.build_report(ctx, ("diad", "glad"), outcomes, "python3 benchmarks/gpu_check.py check", 480.0, 20.0)
    assert res["methods"] == {} and res["machine"]["slug"] == "no-gpu"
    g = res["gpu_check"]
    assert g["failures"][0] == "env (venv): failed: ERROR: No matching distribution found for tensorrt"
    assert g["targets"]["diad"]["fps_batch1"]["why"] == "latency_diad skipped: needs env (failed)"
    assert g["within_budget"] and g["stages"]["probe"]["status"] == "skipped"
    md = gc.render_markdown(res)
    assert "No method was measured." in md and "## GPU check" in md
    assert "| DiAD | frames/s >= 100 | - | - | not measured: latency_diad skipped: needs env (failed) |" in md
    json.dumps(res)  # serialisable as it is


@pytest.mark.parametrize("method", ["diad", "glad"])
def test_engine_build_goes_through_latencys_tensorrt_pipeline(gc, tmp_path, monkeypatch, method):
    """worker-engines builds exactly what latency.py loads (batch-1 profiles: GLAD's one frame is 2 x draws
    rows), copies GLAD's timing cache from DiAD's, and runs a sample frame; TensorRT itself is stood in for
    by onnxruntime networks (no GPU here)."""
    import edgeinspect.runtime.backends as backends
    from edgeinspect.runtime.ort_backend import ort_networks

    src = (tiny_bundle() if method == "diad" else tiny_glad_bundle())[1]
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(src, bundle_dir)
    calls = []

    def stand_in(bundle, *, precision, max_batch, cache_dir, roles, device, **kw):
        calls.append({"precision": precision, "max_batch": max_batch, "cache_dir": cache_dir, "device": device})
        return ort_networks(bundle, precision="fp32", roles=roles, intra_op_threads=1)

    monkeypatch.setattr(backends, "trt_networks", stand_in)  # where bundle_networks looks it up
    timing = tmp_path / "diad-timing.cache"
    timing.write_bytes(b"timing cache of the DiAD build")
    res = gc.worker_engines(bundle_dir, "fp16", timing if method == "glad" else None)
    assert calls == [{"precision": "fp16", "max_batch": 1 if method == "diad" else 2, "cache_dir": None,
                      "device": "cuda"}]
    assert res["precision"] == "fp16" and res["build_s"] > 0 and res["first_frame_ms"] > 0
    assert isinstance(res["first_frame_score"], float) and res["first_frame_score"] == res["first_frame_score"]
    assert res["engines"] == []  # the stand-in builds none
    copied = bundle_dir / "engines" / "timing.cache"
    assert copied.is_file() == (method == "glad")
    if method == "glad":
        assert copied.read_bytes() == b"timing cache of the DiAD build"


def test_engine_worker_without_tensorrt_fails_with_the_reason(gc, tmp_path):
    from edgeinspect.runtime.tensorrt_engines import engine_support_problems

    if not engine_support_problems():
        pytest.skip("tensorrt and a GPU are present: engines would really be built")
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle()[1], bundle_dir)
    log = gc.Log(tmp_path / "check.log", time.monotonic())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = gc.run_command([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "worker-engines", "--bundle",
                          str(bundle_dir), "--precision", "fp16", "--result", str(tmp_path / "r.json")],
                         120.0, log, "engines_diad_fp16", env)
    log.close()
    assert out.status == "failed" and out.rc == 1 and not (tmp_path / "r.json").exists()
    assert out.reason.startswith("edgeinspect.runtime.tensorrt_engines.TensorRTUnavailableError: cannot build or run "
                                 "TensorRT engines here")


# --------------------------------------------------------------------------- the CPU rehearsal


def test_dry_run_end_to_end(gc, tmp_path):
    """The whole check on the CPU for DiAD (tiny preset): every stage runs but the engines, which are
    skipped with the reason; latency.py reuses the exported and int8-calibrated bundle and times only the
    backends it is given; the report and the log land in --results and --out."""
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["check", "--dry-run", "--work", str(work), "--out", str(out), "--methods", "diad", "--threads", "2"]
    rc = gc.main(argv)
    assert rc == 3  # a report with failures: no TensorRT, no GPU here
    res = json.loads((work / "results" / "latency_dry-run.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "latency_dry-run.json", "latency_dry-run.md"]
    assert json.loads((out / "latency_dry-run.json").read_text()) == res
    g = res["gpu_check"]
    status = {n: s["status"] for n, s in g["stages"].items()}
    assert status == {"env": "ok", "probe": "ok", "train_diad": "ok", "export_diad": "ok", "int8_diad": "ok",
                      "engines_diad_fp16": "skipped", "engines_diad_int8": "skipped", "latency_diad": "ok"}
    assert g["stages"]["engines_diad_fp16"]["reason"].startswith("tensorrt: ")
    assert all(s["seconds"] <= s["box_s"] + gc.KILL_GRACE_S for s in g["stages"].values() if s["box_s"])
    assert g["within_budget"] and g["elapsed_s"] < 480 and g["mode"] == "dry-run" and g["env"]["mode"] == "system"
    assert any(f.startswith("engines_diad_fp16: skipped: tensorrt: ") for f in g["failures"])
    trt = g["targets"]["diad"]["tensorrt_fp16_vs_torch_eager"]
    assert trt["met"] is None and trt["why"].startswith("engines_diad_fp16 skipped: tensorrt: ")
    assert g["targets"]["diad"]["fps_batch1"]["why"] == "no GPU backend was timed"
    d = res["methods"]["diad"]
    assert set(d["backends"]) == {"torch", "onnxruntime_fp32"}  # the bundle also has fp16 and int8: not asked for
    assert d["backend_errors"] == {}
    assert d["parity"]["max_abs_score_diff_vs_onnxruntime_cpu"]["torch"] < 1e-3
    ort = d["backends"]["onnxruntime_fp32"]
    assert ort["fps"] == pytest.approx(1e3 / ort["ms"]["median"])
    # latency.py timed the bundle the export stage wrote and int8_diad calibrated (not a re-export)
    bundle = Path(d["bundle"])
    assert str(bundle) == json.loads((work / "stages" / "export_diad.json").read_text())["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precisions"] == ["fp32", "fp16", "int8"] and manifest.get("calibration")
    assert g["latency_commands"]["diad"].startswith("python benchmarks/latency.py --diad ")
    assert "--backends torch,onnxruntime_fp32" in g["latency_commands"]["diad"]
    md = (work / "results" / "latency_dry-run.md").read_text()
    assert md.startswith("# Latency per frame: dry-run") and "## GPU check" in md and "| onnxruntime_fp32 |" in md
    assert "| engines_diad_fp16 | skipped |" in md and "| DiAD | TensorRT fp16 vs torch eager >= 20x | - |" in md
    assert re.search(r"^\| DiAD \| torch \| \d\.\de-\d\d \| \d\.\de-\d\d \|$", md, re.M)  # parity vs onnxruntime CPU
    log = (out / "gpu_check.log").read_text()
    assert re.search(r"^\[\d\d:\d\d:\d\d \+\s*\d+\.\ds\] report: wrote ", log, re.M)
    assert "latency_diad: [diad] backends: torch, onnxruntime_fp32" in log
