"""benchmarks/serve.py end to end on the tiny bundle, into a temporary results folder (short runs: the
numbers are not the point here, the script's correctness and its files are)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

try:
    from tests.test_serve import serve_bundle
except ImportError:
    from test_serve import serve_bundle

REPO = Path(__file__).resolve().parents[1]
KEYS = ("daemon_overhead_ms_p50", "daemon_overhead_ms_p99", "daemon_overhead_4cam_ms_p50",
        "daemon_overhead_4cam_ms_p99", "fps_1cam", "fps_4cam", "latency_ms_p50", "latency_ms_p99", "rss_mb_idle",
        "rss_mb_overload_max")


def test_serve_benchmark_writes_its_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--bundle", str(serve_bundle()), "--frames", "8",
           "--warmup", "2", "--overload-s", "2", "--threads", "1", "--max-frames", "8", "--results", str(tmp_path),
           "--machine", "test", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((tmp_path / "serve_test.json").read_text())
    md = (tmp_path / "serve_test.md").read_text()
    for k in KEYS:
        assert isinstance(res[k], (int, float)), k
    assert res["fps_1cam"] > 0 and res["fps_4cam"] > 0 and res["rss_mb_idle"] > 100
    assert res["rss_mb_overload_max"] == max(res["rss_mb_samples"]) and len(res["rss_mb_samples"]) >= 2
    assert res["latency_ms_p99"] >= res["latency_ms_p50"] > 0
    b = res["backends"]["onnxruntime"]
    one = b["runs"]["1cam"]
    assert res["daemon_overhead_ms_p50"] == b["daemon_overhead_ms_p50"] == one["overhead_ms"]["p50"]
    # the overhead is what the round trip has beyond the daemon's own compute and queue wait: a part of it
    assert 0 < one["overhead_ms"]["p50"] < one["latency_ms"]["p50"] and one["overhead_ms"]["n"] == 8
    assert one["results"] == 8 and b["runs"]["4cam"]["results"] == 8
    assert b["runs"]["overload"]["results"] > 0 and b["daemon"]["exit_code"] == 0
    assert b["daemon"]["stats"]["errors"].get("dropped", 0) == sum(b["daemon"]["stats"]["errors"].values())
    steps = b["rss_breakdown"]["arena_off"]["steps"]
    assert list(steps)[0] == "interpreter start" and steps["+ torch"] > steps["+ numpy"] > steps["interpreter start"]
    # one session per role the pipeline runs (a reconstruction bundle: no bank search), all in the breakdown
    roles = b["rss_breakdown"]["arena_off"]["roles"]
    assert "bank_distance" not in roles and all(f"+ session {r}" in steps for r in roles)
    assert res["rss_breakdown_mb"] == steps and res["settings"]["daemon_python"] == sys.executable
    assert "python benchmarks/serve.py" in res["command"] and "| onnxruntime |" in md and "serve_test.json" in md
    assert "Where the memory goes" in md
