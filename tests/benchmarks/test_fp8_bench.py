"""benchmarks/fp8_experts.py runs end to end on the tiny FP8 preset and writes what it promises."""

from __future__ import annotations

import json

from tests.benchmarks.test_benchmarks_run import NO_CUDA, run, timing


def test_fp8_experts_benchmark_smoke(tmp_path):
    out = tmp_path / "fp8.json"
    done = run("fp8_experts.py", "--preset", "tiny-v3-fp8", "--tokens", "1", "16", "--min-runs", "1",
               "--min-seconds", "0", "--json", str(out), env=NO_CUDA)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    memory = {m["way"]: m for m in report["memory"]}
    assert memory["fp8 resident"]["weight_dtype"] == "float8_e4m3fn+scales[24x16]"
    assert memory["fp8 resident"]["ratio_vs_bf16_native"] < 0.6  # 1 byte + a float32 per 24 x 16 tile, against 2
    assert {(r["tokens"], r["way"]) for r in report["rows"]} == {(t, w) for t in (1, 16) for w in memory}
    for r in report["rows"]:
        assert timing(r["median_ms"]) and timing(r["tokens_per_s"])
        assert r["max_rel_diff_vs_bf16_served"] < 1e-2  # the same bf16-rounded weights; only the summation order
    assert "fp8 resident" in done.stdout and "÷ bf16 served" in done.stdout
