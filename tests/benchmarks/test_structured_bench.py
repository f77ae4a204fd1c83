"""benchmarks/structured.py still runs end to end (--quick on tiny-v3) and writes the JSON it promises: both step
settings timed, the constrained rows' bitmask fill timed, the mask walk's per-token times, the constrained texts
following the schema's start."""

from __future__ import annotations

import json

from tests.benchmarks.test_benchmarks_run import run, timing


def test_structured_benchmark_smoke(tmp_path, model_dirs):
    out = tmp_path / "structured.json"
    done = run("structured.py", "--model", str(model_dirs["tiny-v3"]), "--quick", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    steps = {r["setting"]: r for r in result["steps"]}
    assert set(steps) == {"free", "half"} and steps["half"]["constrained"] == 4 and steps["free"]["constrained"] == 0
    for row in steps.values():
        assert row["sequences"] == 8 and row["steps"] == 4 and timing(row["step_p50_ms"]), row
    assert timing(result["fill_ms"]["p50"]) and result["fill_ms"]["rows"] == 4
    [walk] = result["mask_walks"]
    assert walk["vocab"] == 272 and walk["tokens"] == 200, walk
    assert all(timing(walk[k]) for k in ("compile_ms", "mean_us", "p50_us", "p99_us"))
    assert walk["p99_us"] >= walk["p50_us"]
    start = '{"members":[{"name":"'  # what the schema forces first, whatever the model
    for text in result["sample_texts"]:
        assert len(text) >= 5 and text[: len(start)] == start[: len(text)], text
    assert "with a JSON schema" in done.stdout and "mask time per token" in done.stdout
