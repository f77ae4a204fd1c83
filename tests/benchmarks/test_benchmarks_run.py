"""The benchmarks still run end to end (tiny settings) and write the JSON they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks"


def run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}  # the CPU path, even on a GPU machine


def test_moe_layer_benchmark_smoke(tmp_path):
    out = tmp_path / "moe.json"
    done = run("moe_layer.py", "--tokens", "8", "--dtypes", "float32", "--min-runs", "1", "--min-seconds", "0",
               "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"ours grouped_mm", "ours loop (default)", "hf grouped_mm (default)",
                                         "hf eager"}
    assert all(r["max_rel_diff_vs_hf_eager"] < 1e-5 for r in rows)
    assert "× vs hf grouped_mm" in done.stdout


@pytest.mark.slow
def test_dispatch_benchmark_smoke(tmp_path, model_dirs):
    out = tmp_path / "dispatch.json"
    done = run("dispatch.py", "--model", str(model_dirs["tiny-v3"]), "--devices", "2", "--dtype", "float32",
               "--quick", "--deployments", "local", "ray", "ray-dag", "ray-rdt", "grpc", "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    # ray and grpc also with rows per call per layer; ray, ray-rdt and grpc also with 2 micro-batches end to end
    assert len(data["layer"]) == 16 and len(data["end_to_end"]) == 9
    assert data["end_to_end"][0]["prefill_vs_in_process"] == 1.0
    assert {r["micro_batches"] for r in data["end_to_end"]} == {1, 2}
    assert all(r["decode_idle_ms_per_layer"] >= 0 for r in data["end_to_end"])
    assert all(r["memcpy_ms_per_mb"] > 0 and r["overhead_ms_per_mb"] == r["overhead_ms_per_mb"] for r in data["layer"])
    alone = {(r["tokens"], r["deployment"]): r for r in data["transport_only"]}
    assert len(alone) == 14  # per size: ray and grpc shared and rows per call, ray-dag, ray-rdt, Ray's floor
    assert {(8, "ray (2 actors)"), (2048, "ray (2 actors), rows per call"), (2048, "grpc (2 actors), rows per call"),
            (2048, "ray floor (no-op actors)")} <= set(alone)
    assert all(r["round_trip_ms"] > 0 and r["calls_per_layer"] >= 1 for r in alone.values())
    distributed = [r for r in data["layer"] if not r["deployment"].startswith("in-process")]
    assert all(r["calls_per_layer"] >= 1 and r["bytes_per_layer"] > 0 for r in distributed)


def test_kernels_benchmark_runs_in_the_interpreter(tmp_path):
    out = tmp_path / "kernels.json"
    done = run("kernel_bench.py", "--interpret", "--tokens", "1", "5", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["device"].startswith("CPU interpreter")
    assert {(r["impl"], r["tokens"]) for r in data["rows"]} >= {("triton", 1), ("triton", 5), ("torch loop", 5)}
    assert all(r["finite"] and r["rel_err_vs_fp64"] < 2e-3 for r in data["rows"])


@pytest.mark.slow
def test_balance_benchmark_smoke(tmp_path, model_dirs):
    out = tmp_path / "balance.json"
    done = run("balance.py", "--model", str(model_dirs["tiny-v3"]), "--backend", "local", "--devices", "2",
               "--dtype", "float32", "--window-tokens", "512", "--max-windows", "3", "--topic-size", "8",
               "--redundant-slots", "4", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    modes = json.loads(out.read_text())["modes"]
    assert list(modes) == ["exact", "adapt", "eplb", "eplb+bias"]
    assert all(r["changed_share"] == 0 for r in modes["exact"]["after"])  # observe mode: the model's own routing
    assert modes["adapt"]["windows"][-1]["bias_version"] >= 1 and 1 <= len(modes["adapt"]["windows"]) <= 3
    eplb = modes["eplb"]
    assert eplb["changed_tokens_max"] == 0 and eplb["failed_requests"] == 0 and eplb["rearrangement_failures"] == 0
    assert eplb["rearrangements"] >= 1 and eplb["redundant_slots"] == 4
    assert done.stdout.strip().splitlines()[-1].startswith("EPLB: device max/mean ")


@pytest.mark.slow
def test_serve_load_benchmark_smoke(tmp_path, model_dirs):
    out = tmp_path / "serve.json"
    done = run("serve_load.py", "--model", str(model_dirs["tiny-v3"]), "--dtype", "float32", "--backend", "local",
               "--devices", "1", "--clients", "2", "--seconds", "3", "--max-tokens", "4", "--prompt-len", "8",
               "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["errors"] == 0 and data["requests"] >= 2 and data["tokens_per_s"] > 0


def test_gpu_e2e_benchmark_exits_2_without_cuda_and_runs_its_cpu_smoke_when_allowed(tmp_path, model_dirs):
    refused = run("gpu_e2e.py", "--json", str(tmp_path / "no.json"), env=NO_CUDA)
    assert refused.returncode == 2 and "no CUDA GPU" in refused.stderr and not (tmp_path / "no.json").exists()
    out = tmp_path / "gpu_e2e.json"
    done = run("gpu_e2e.py", "--allow-cpu-smoke", "--models-dir", str(model_dirs["tiny-v3"].parent),
               "--json", str(out), env=NO_CUDA)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["device"].startswith("CPU smoke") and data["torch"] and "triton" in data
    assert [(r["model"], r["deployment"]) for r in data["rows"]] == [("tiny-v3", "in-process, 1 group"),
                                                                    ("tiny-v3", "in-process, 4 groups")]
    assert data["rows"][0]["decode2_tokens_per_s_vs_in_process"] == 1.0
    # One noisy run of two decode steps on a shared CPU: the decode numbers exist, their values mean nothing.
    assert all(r["prefill_tokens_per_s"] > 0 and isinstance(r["decode2_tokens_per_s_vs_in_process"], float)
               for r in data["rows"])
    assert "× = ÷ the in-process engine" in done.stdout


@pytest.mark.slow
def test_gpu_e2e_benchmark_cpu_smoke_with_ray_groups(tmp_path, model_dirs):
    out = tmp_path / "gpu_e2e.json"
    done = run("gpu_e2e.py", "--allow-cpu-smoke", "--deployments", "ray-1", "ray-4", "ray-4-mb2", "--models-dir",
               str(model_dirs["tiny-v3"].parent), "--json", str(out), env=NO_CUDA)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["deployment"] for r in rows] == ["in-process, 1 group", "ray, 1 group (1 GPU)", "in-process, 1 group",
                                               "ray, 4 groups (0.25 GPU each)", "in-process, 1 group",
                                               "ray, 4 groups (0.25 GPU), 2 micro-b."]
