"""The benchmark scripts still run end to end (smallest settings) and print parseable JSON lines.

They are measurement scripts, not tests; this only guards them against bit rot (a bench that
broke silently would leave the README's numbers unreproducible).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host

BENCH = ce.TESTS_DIR / "bench"


def run_script(name, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(ce.TESTS_DIR.parent))
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_step_speed_script(comfy):
    import torch

    rows = run_script("step_speed.py", "--models", "sd3-medium", "flux-dev", "--depth", "2", "--flux-width", "128", "--res", "256",
                      "--repeats", "1", "--keep", "1.0", "0.3", "--execution", "eager", "graph", "--sampler-run", "--steps", "4",
                      "--warmup-steps", "2")
    for model in ("sd3-medium", "flux-dev"):
        steps = [r for r in rows if r["bench"] == "step" and r["model"] == model and r["execution"] == "eager"]
        runs = [r for r in rows if r["bench"] == "sampler_run" and r["model"] == model and r["execution"] == "eager"]
        graphs = [r for r in rows if r["bench"] == "step" and r["model"] == model and r["execution"] == "graph"]
        assert [r["keep"] for r in steps] == [1.0, 0.3] and [r["keep"] for r in runs] == [0.3]
        assert steps[0]["macs_saved_per_pruned_step"] == 0.0 and steps[1]["macs_saved_per_pruned_step"] > 0.15
        assert all(0 < r["pruned_host_ms"] <= r["pruned_ms"] and r["full_host_ms"] > 0 for r in steps)
        assert runs[0]["cooldown_steps"] == 1 and runs[0]["macs_saved"] > 0  # 4 steps: 2 warm-up, 1 pruned, 1 cool-down
        assert [r["keep"] for r in graphs] == [1.0, 0.3]
        if not torch.cuda.is_available():  # said, not silently timed eager
            assert all("needs a CUDA device" in r["skipped"] for r in graphs)
        else:
            assert all(r["replayed_calls"] > 0 for r in graphs if r["keep"] < 1.0)
    assert {r["batch"] for r in rows if r.get("model") == "flux-dev" and "batch" in r} == {1}


def test_quality_script(comfy, tmp_path):
    out = tmp_path / "grid.png"
    rows = run_script("quality.py", "--prompts", "1", "--steps", "6", "--warmup", "2", "--keep", "1.0", "0.3",
                      "--selection", "cat", "random", "--out", str(out))
    cat = {(r["keep_ratio"], r["selection"]): r for r in rows if r.get("method") == "cat"}
    assert set(cat) == {(1.0, "cat"), (1.0, "random"), (0.3, "cat"), (0.3, "random")}
    assert cat[(1.0, "cat")]["psnr_mean"] == 100.0  # identical images count as 100 dB
    assert cat[(0.3, "cat")]["macs_saved"] > 0 and out.is_file()
    # one batched call per step: warm-up 2 (the second captures), 3 pruned, 1 full cool-down step
    assert cat[(0.3, "cat")]["modes_of_last_run"] == "dcpppd"


def test_host_cost_script(comfy):
    rows = run_script("host_cost.py", "--tokens", "16", "--txt-tokens", "4", "--repeats", "1", "--warmup", "0", "--threads", "1")
    calls = {(r["model"], r["case"]): r for r in rows if r["bench"] == "host_cost"}
    cases = ("unpatched", "pruned_modules", "pruned_lean", "dense", "dense_hooked")
    assert set(calls) == {(m, c) for m in ("sd3-medium", "flux-dev") for c in cases}
    assert {r["depth"] for r in calls.values() if r["model"] == "sd3-medium"} == {24}
    assert {r["depth"] for r in calls.values() if r["model"] == "flux-dev"} == {19 + 38}
    for (model, case), row in calls.items():
        assert row["aten_ops"] > 0 and row["host_ms"] > 0
        if case == "unpatched":
            assert row["call_mode"] is None and row["vs_unpatched"] == 1.0
        elif case.startswith("dense"):  # the model's own blocks: the unpatched call's ops, plus CAT's merge
            assert row["call_mode"] == "dense" and row["macs_saved"] is None
            assert 0 < row["aten_ops"] - calls[(model, "unpatched")]["aten_ops"] < 20
        else:  # the script itself raises unless every timed call of the run was a pruned call
            assert row["call_mode"] == "pruned" and row["keep"] == 0.3 and row["macs_saved"] > 0.2
            assert row["aten_ops"] != calls[(model, "unpatched")]["aten_ops"]  # the pack's blocks ran, not ComfyUI's
    summary = [r for r in rows if r["bench"] == "host_cost_summary"]
    assert len(summary) == 1 and set(summary[0]["ratios_to_unpatched"]) == {"sd3-medium", "flux-dev"}
