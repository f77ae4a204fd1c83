"""The benchmarks still run end to end (tiny settings) and write the JSON they promise."""

from __future__ import annotations

import json
import math
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


def measured(value) -> bool:
    """A real measurement: a finite number (json writes NaN and ±inf as-is, so they come back as floats)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def timing(value) -> bool:
    return measured(value) and value > 0


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-9, abs=1e-12)


def test_moe_layer_benchmark_smoke(tmp_path):
    out = tmp_path / "moe.json"
    done = run("moe_layer.py", "--tokens", "8", "--dtypes", "float32", "--min-runs", "1", "--min-seconds", "0",
               "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"ours grouped_mm", "ours loop (default)", "hf grouped_mm (default)", "hf eager"}
    base = rows["hf grouped_mm (default)"]["median_ms"]
    for impl, r in rows.items():
        assert (r["dtype"], r["tokens"]) == ("float32", 8) and r["runs"] >= 1, r
        assert timing(r["median_ms"]) and r["speedup_vs_hf_grouped_mm"] == approx(base / r["median_ms"]), r
        assert measured(r["max_rel_diff_vs_hf_eager"]) and r["max_rel_diff_vs_hf_eager"] < 1e-5, r
        assert 1 <= r["experts_hit"] <= 8 * 6, r  # 8 tokens, top-6 of 64 experts
        assert impl in done.stdout  # every row is in the printed table
    assert rows["hf eager"]["max_rel_diff_vs_hf_eager"] == 0.0
    assert len({r["experts_hit"] for r in rows.values()}) == 1  # every implementation ran the same routing


@pytest.mark.slow
def test_dispatch_benchmark_smoke(tmp_path, model_dirs):
    out = tmp_path / "dispatch.json"
    done = run("dispatch.py", "--model", str(model_dirs["tiny-v3"]), "--devices", "2", "--dtype", "float32",
               "--quick", "--deployments", "local", "ray", "ray-dag", "ray-rdt", "grpc", "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    # Ray and gRPC run twice: reading the layer batch from shared memory (their default), and each call sent its
    # rows; the in-process engine with 1 group is the baseline.
    distributed = ["ray (2 actors)", "ray (2 actors), rows per call", "ray-dag (2 actors)", "ray-rdt (2 actors)",
                   "grpc (2 actors)", "grpc (2 actors), rows per call"]
    sizes = (8, 2048)
    layer = {(r["tokens"], r["deployment"]): r for r in data["layer"]}
    assert len(layer) == len(data["layer"])
    assert set(layer) == {(t, d) for t in sizes for d in ["in-process (1 group)", "in-process (2 groups)",
                                                           *distributed]}
    for t in sizes:
        rows = [r for (tokens, _), r in layer.items() if tokens == t]
        assert len({r["memcpy_ms_per_mb"] for r in rows}) == 1 and timing(rows[0]["memcpy_ms_per_mb"])
        two_groups = [r for r in rows if r["deployment"] != "in-process (1 group)"]
        assert len({r["bytes_per_layer"] for r in two_groups}) == 1  # the same batches, whatever carries them
        assert layer[t, "in-process (1 group)"]["calls_per_layer"] == 1
        assert len({r["calls_per_layer"] for r in two_groups}) == 1  # one call per group the tokens reach
        assert two_groups[0]["calls_per_layer"] in ((2,) if t == 2048 else (1, 2))
    for r in layer.values():
        assert timing(r["round_trip_ms"]) and measured(r["compute_ms"]) and r["compute_ms"] >= 0, r
        assert r["bytes_per_layer"] > 0 and r["overhead_ms"] == approx(r["round_trip_ms"] - r["compute_ms"]), r
        assert r["overhead_ms_per_mb"] == approx(r["overhead_ms"] / (r["bytes_per_layer"] / 1e6)), r

    alone = {(r["tokens"], r["deployment"]): r for r in data["transport_only"]}
    assert len(alone) == len(data["transport_only"])
    assert set(alone) == {(t, d) for t in sizes for d in [*distributed, "ray floor (no-op actors)"]}
    for t in sizes:
        rows = [r for (tokens, _), r in alone.items() if tokens == t]
        floor = alone[t, "ray floor (no-op actors)"]["round_trip_ms"]
        assert len({(r["bytes_per_layer"], r["calls_per_layer"]) for r in rows}) == 1
        for r in rows:
            assert timing(r["round_trip_ms"]) and r["bytes_per_layer"] > 0 and r["calls_per_layer"] in (1, 2), r
            assert r["ms_per_mb"] == approx(r["round_trip_ms"] / (r["bytes_per_layer"] / 1e6)), r
            assert r["vs_ray_floor"] == approx(r["round_trip_ms"] / floor), r

    e2e = {r["deployment"]: r for r in data["end_to_end"]}
    assert len(e2e) == len(data["end_to_end"]) and data["end_to_end"][0]["deployment"] == "in-process (1 group)"
    two_micro = ["ray (2 actors)", "ray-rdt (2 actors)", "grpc (2 actors)"]  # in-process and ray-dag: one only
    assert set(e2e) == {"in-process (1 group)", "in-process (2 groups)", "ray (2 actors)", "ray-dag (2 actors)",
                        "ray-rdt (2 actors)", "grpc (2 actors)", *(f"{d}, 2 micro-batches" for d in two_micro)}
    base = e2e["in-process (1 group)"]
    for name, r in e2e.items():
        assert r["micro_batches"] == (2 if name.endswith(", 2 micro-batches") else 1), r
        assert r["tokens_equal_to_1_micro_batch"] is True, r  # float32: halving the batch changes no token
        assert timing(r["prefill_tokens_per_s"]), r
        assert r["prefill_vs_in_process"] == approx(r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]), r
        # --quick times 4 decode steps once: the step time is a difference of two noisy runs (any sign).
        assert measured(r["decode_step_ms"]) and r["decode_tokens_per_s"] == approx(8e3 / r["decode_step_ms"]), r
        assert r["decode_vs_in_process"] == approx(r["decode_tokens_per_s"] / base["decode_tokens_per_s"]), r
        assert all(measured(r[k]) and r[k] >= 0 for k in ("prefill_idle_ms_per_layer", "decode_idle_ms_per_layer"))


def test_kernels_benchmark_runs_in_the_interpreter(tmp_path):
    out = tmp_path / "kernels.json"
    done = run("kernel_bench.py", "--interpret", "--tokens", "1", "5", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["device"].startswith("CPU interpreter") and data["ceilings"] == {}  # no roofline without a GPU
    rows = {(r["shape"], r["dtype"], r["tokens"], r["impl"]): r for r in data["rows"]}
    assert len(rows) == len(data["rows"])
    assert set(rows) == {("tiny", dtype, t, impl) for dtype in ("float32", "float16") for t in (1, 5)
                         for impl in ("triton", "torch loop")}  # the interpreter's defaults: tiny, fp32 and fp16
    for (shape, dtype, t, _), r in rows.items():
        assert r["finite"] is True and timing(r["ms"]), r
        assert measured(r["rel_err_vs_fp64"]) and r["rel_err_vs_fp64"] < 2e-3, r
        assert 2 <= r["experts_hit"] <= min(8, 2 * t), r  # tiny: 8 experts, 2 distinct per token
        assert r["experts_hit"] == rows[shape, dtype, t, "torch loop"]["experts_hit"]  # one case for both
        assert "floor_ms" not in r


@pytest.mark.slow
def test_balance_benchmark_smoke(tmp_path, model_dirs):
    out = tmp_path / "balance.json"
    done = run("balance.py", "--model", str(model_dirs["tiny-v3"]), "--backend", "local", "--devices", "2",
               "--dtype", "float32", "--window-tokens", "512", "--max-windows", "3", "--topic-size", "8",
               "--redundant-slots", "4", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    modes = json.loads(out.read_text())["modes"]
    assert list(modes) == ["exact", "adapt", "eplb", "eplb+bias"]
    for mode, m in modes.items():
        windows = m["windows"]
        assert [w["window"] for w in windows] == list(range(1, len(windows) + 1)) and 1 <= len(windows) <= 3
        for w in windows:  # max/mean of a load is at least 1; shares are shares
            assert measured(w["expert_max_over_mean"]) and w["expert_max_over_mean"] >= 1, (mode, w)
            assert measured(w["device_max_over_mean"]) and w["device_max_over_mean"] >= 1, (mode, w)
            assert 0 <= w["changed_share"] <= 1 and 0 <= w["changed_slot_share"] <= 1, (mode, w)
            assert w["placement_version"] == w["rearrangements"], (mode, w)  # one version per rearrangement
        assert m["changed_tokens_max"] == max(w["changed_share"] for w in windows)
        assert m["changed_slots_max"] == max(w["changed_slot_share"] for w in windows)
        assert m["failed_requests"] == 0 and m["rearrangement_failures"] == 0 and timing(m["tokens_per_s"]), mode
        assert m["converged_at"] in (None, len(windows)), mode  # a mode stops at the window it converged in
    exact = modes["exact"]  # observe mode: the model's own routing, on the placement it started with
    assert all(r["changed_share"] == 0 for r in exact["after"]) and exact["changed_tokens_max"] == 0
    assert all(w["bias_version"] == 0 and w["placement_version"] == 0 for w in exact["windows"])
    adapt = modes["adapt"]  # the bias moves, the placement does not
    assert adapt["windows"][-1]["bias_version"] >= 1 and adapt["rearrangements"] == 0
    eplb = modes["eplb"]  # placements move, the routing does not
    assert eplb["changed_tokens_max"] == 0 and all(w["bias_version"] == 0 for w in eplb["windows"])
    assert eplb["rearrangements"] >= 1 and eplb["redundant_slots"] == 4
    start, end = exact["windows"][0]["device_max_over_mean"], eplb["windows"][-1]["device_max_over_mean"]
    assert done.stdout.strip().splitlines()[-1].startswith(f"EPLB: device max/mean {start:.2f} -> {end:.2f}")


@pytest.mark.slow
def test_serve_load_benchmark_smoke(tmp_path, model_dirs):
    out = tmp_path / "serve.json"
    done = run("serve_load.py", "--model", str(model_dirs["tiny-v3"]), "--dtype", "float32", "--backend", "local",
               "--devices", "1", "--clients", "2", "--seconds", "3", "--max-tokens", "4", "--prompt-len", "8",
               "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["errors"] == 0 and data["error_samples"] == [] and data["requests"] >= 2 and data["clients"] == 2
    assert timing(data["seconds"]) and 0 < data["mean_tokens"] <= 4
    assert data["requests_per_s"] == approx(data["requests"] / data["seconds"])
    assert data["tokens_per_s"] == pytest.approx(data["mean_tokens"] * data["requests"] / data["seconds"])
    assert all(timing(data[k]) for k in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"))
    assert data["latency_p50_s"] <= data["latency_p99_s"] and data["ttft_p50_s"] <= data["ttft_p99_s"]


def assert_paired_with_the_in_process_engine(rows: list[dict], metrics: list[str]) -> None:
    """gpu_e2e rows come in pairs measured in one phase: the in-process baseline, then the deployment, whose
    ratios are its own numbers over the baseline's."""
    assert len(rows) % 2 == 0
    for base, row in zip(rows[::2], rows[1::2], strict=True):
        assert base["deployment"] == "in-process, 1 group" and base["phase"] == row["phase"], (base, row)
        for m in metrics:
            assert base[f"{m}_vs_in_process"] == 1.0
            assert row[f"{m}_vs_in_process"] == approx(row[m] / base[m]), (m, row)
        for r in (base, row):
            assert timing(r["prefill_tokens_per_s"]), r
            # One noisy run of two decode steps on a shared CPU: the step time is a difference of two runs.
            assert measured(r["decode2_step_ms"]) and r["decode2_tokens_per_s"] == approx(2e3 / r["decode2_step_ms"])


GPU_E2E_METRICS = ["prefill_tokens_per_s", "decode2_tokens_per_s"]  # the CPU smoke's workload: decode batch 2


def test_gpu_e2e_benchmark_exits_2_without_cuda_and_runs_its_cpu_smoke_when_allowed(tmp_path, model_dirs):
    refused = run("gpu_e2e.py", "--json", str(tmp_path / "no.json"), env=NO_CUDA)
    assert refused.returncode == 2 and "no CUDA GPU" in refused.stderr and not (tmp_path / "no.json").exists()
    out = tmp_path / "gpu_e2e.json"
    done = run("gpu_e2e.py", "--allow-cpu-smoke", "--models-dir", str(model_dirs["tiny-v3"].parent),
               "--json", str(out), env=NO_CUDA)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["device"].startswith("CPU smoke") and data["torch"] and "triton" in data
    assert data["workload"]["decode_batches"] == [2]
    assert [(r["model"], r["deployment"], r["phase"]) for r in data["rows"]] == [
        ("tiny-v3", "in-process, 1 group", "local-4"), ("tiny-v3", "in-process, 4 groups", "local-4")]
    assert_paired_with_the_in_process_engine(data["rows"], GPU_E2E_METRICS)


@pytest.mark.slow
def test_gpu_e2e_benchmark_cpu_smoke_with_ray_groups(tmp_path, model_dirs):
    out = tmp_path / "gpu_e2e.json"
    done = run("gpu_e2e.py", "--allow-cpu-smoke", "--deployments", "ray-1", "ray-4", "ray-4-mb2", "--models-dir",
               str(model_dirs["tiny-v3"].parent), "--json", str(out), env=NO_CUDA)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["deployment"], r["phase"]) for r in rows[1::2]] == [
        ("ray, 1 group (1 GPU)", "ray-1"), ("ray, 4 groups (0.25 GPU each)", "ray-4"),
        ("ray, 4 groups (0.25 GPU), 2 micro-b.", "ray-4-mb2")]
    assert_paired_with_the_in_process_engine(rows, GPU_E2E_METRICS)
