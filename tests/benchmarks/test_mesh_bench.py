"""benchmarks/mesh.py runs end to end (tiny-v3, 2 gateway processes on one mesh, merge on and off) and writes the
JSON it promises, with counters that agree with what the gateways decoded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_core.spec import ModelSpec

BENCH = Path(__file__).parents[2] / "benchmarks" / "mesh.py"
NEW_TOKENS = 6
SEQUENCES = 32


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_mesh_benchmark_smoke(tmp_path, model_dirs):
    out, model = tmp_path / "mesh.json", model_dirs["tiny-v3"]
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--model", str(model), "--dtype", "float32", "--gateways", "2",
         "--micro-batches", "1",
         "--new-tokens", str(NEW_TOKENS), "--rounds", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    spec = ModelSpec.from_dir(model)
    assert data["benchmark"] == "mesh" and data["groups"] == 2 and data["new_tokens"] == NEW_TOKENS
    assert data["machine"]["cpus"] == os.cpu_count() and data["machine"]["arch"] and data["date"]

    rows = {(r["gateways"], r["micro_batches"], r["merge"]): r for r in data["rows"]}
    assert set(rows) == {(2, 1, True), (2, 1, False)} and len(rows) == len(data["rows"])
    steps = NEW_TOKENS - 1  # the first token comes from the prefill, before the counters are reset
    for (gateways, _, merge), row in rows.items():
        assert len(row["rounds"]) == 2, row
        for r in row["rounds"]:
            assert r["steps_per_gateway"] == [steps] * gateways, r
            assert r["output_tokens"] == gateways * SEQUENCES * steps, r
            assert positive(r["tokens_per_s"]) and r["tokens_per_s"] == pytest.approx(r["output_tokens"] /
                                                                                      r["decode_wall_s"]), r
            assert len(r["step_ms"]) == gateways and all(positive(ms) for ms in r["step_ms"]), r
            # Every decode step of every gateway calls both groups in each MoE layer (32 tokens, top-4 of 16 experts).
            assert r["calls"] == gateways * steps * len(spec.moe_layers) * 2, r
            assert len(r["replicas"]) == 2 and sum(s["calls"] for s in r["replicas"]) == r["calls"], r
            assert r["passes"] <= r["calls"] and r["calls"] <= r["rows"] <= r["calls"] * SEQUENCES, r
            assert 1 <= r["max_calls_per_pass"] <= gateways and 0 <= r["merged_calls"] <= r["calls"], r
            assert positive(r["compute_s"]) and r["compute_ms_per_token"] == pytest.approx(
                1e3 * r["compute_s"] / r["output_tokens"]), r
            if not merge:  # a replica with mesh.merge false computes each call alone
                assert r["passes"] == r["calls"] and r["merged_calls"] == 0 and r["max_calls_per_pass"] == 1, r
        rounds = row["rounds"]
        assert row["rows_per_pass"] == pytest.approx(sum(r["rows"] for r in rounds) / sum(r["passes"] for r in rounds))
        assert row["merged_share"] == pytest.approx(sum(r["merged_calls"] for r in rounds) /
                                                    sum(r["calls"] for r in rounds))
        assert row["tokens_per_s"] == max(r["tokens_per_s"] for r in rounds)  # the best round's
        assert row["compute_ms_per_token"] == min(r["compute_ms_per_token"] for r in rounds)
        assert row["step_ms_mean"] == min(sum(r["step_ms"]) / gateways for r in rounds)
        # the planner's rows per pass: the tokens of all gateways that reach one of the 2 devices
        assert SEQUENCES <= row["planned_rows_per_pass"] <= gateways * SEQUENCES, row

    (c,) = data["comparisons"]
    on, off = rows[2, 1, True], rows[2, 1, False]
    assert (c["gateways"], c["micro_batches"], c["issue_target"]) == (2, 1, True)
    assert c["rows_per_pass_ratio"] == pytest.approx(on["rows_per_pass"] / off["rows_per_pass"])
    assert c["compute_per_token_fall"] == pytest.approx(1 - on["compute_ms_per_token"] / off["compute_ms_per_token"])
    targets = data["targets"]
    assert c["rows_per_pass_target_met"] == (c["rows_per_pass_ratio"] >= targets["rows_per_pass_ratio"])
    assert c["compute_per_token_target_met"] == (c["compute_per_token_fall"] >= targets["compute_per_token_fall"])
    assert c["same_tokens_share"] == 1.0  # float32: merged rows agree with unmerged ones to ~1e-6, tokens exactly
    assert "target >= x1.6" in done.stdout  # the verdict is printed
