"""Benchmark: FP8-resident expert groups against bf16 ones on the same checkpoint (resident memory, CPU tokens/s).

Loads one expert group holding every routed expert of an FP8 preset (small-v3-fp8: DeepSeek-V3's 128 × 128 tiles)
three ways: FP8-resident (`quantization: fp8`: float8_e4m3fn + scale tiles, the torch path widening only the
experts a call hits, one at a time), bf16 dequantized on read and held as this CPU serves bf16 (`half_matmul:
auto`: float32 weights where the CPU lacks bf16 instructions), and bf16 held natively (the bf16 bytes a GPU holds).
Reports the resident bytes of each, then times all MoE layers' routed experts for decode-sized (1-64 tokens) and
prefill-sized (512+) batches, routed by the checkpoint's own gates, round-robin in one process: median ms, tokens/s,
and FP8 ÷ bf16 (served) time. Outputs are compared too (FP8 widened to the model's dtype equals dequantize-on-read).

    python benchmarks/fp8_experts.py [--preset small-v3-fp8] [--tokens 1 8 64 512 2048] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine_info import machine  # noqa: E402
from benchmarks.moe_layer import time_round_robin  # noqa: E402
from expert_workers.expert_group import ExpertGroup  # noqa: E402
from model_core.checkpoint import CheckpointReader  # noqa: E402
from model_core.make_model import make_model  # noqa: E402
from model_core.spec import ModelSpec  # noqa: E402
from router_service.routing import route_tokens  # noqa: E402

WAYS = {  # name -> ExpertGroup settings
    "fp8 resident": {"quantization": "fp8"},
    "bf16 served": {"quantization": "none", "half_matmul": "auto"},
    "bf16 native": {"quantization": "none", "half_matmul": "native"},
}
BASE = "bf16 served"


def routings(path: Path, spec: ModelSpec, t: int, gen: torch.Generator) -> dict[int, tuple]:
    """Per MoE layer: (hidden [t, H] bf16, ids [t, K], weights [t, K]) routed by the layer's own gate."""
    reader = CheckpointReader.for_model(path, spec)
    out = {}
    for layer in spec.moe_layers:
        gate = reader.get(f"model.layers.{layer}.mlp.gate.weight", dtype=torch.float32)
        bias_name = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        bias = reader.get(bias_name, dtype=torch.float32) if bias_name in reader else None
        hidden = torch.randn(t, spec.hidden_size, generator=gen)
        routing = route_tokens(hidden, gate, spec.router, bias=bias)
        out[layer] = (hidden.to(torch.bfloat16), routing.ids, routing.weights)
    return out


@torch.inference_mode()
def run(path: Path, tokens: list[int], min_runs: int, min_seconds: float) -> tuple[list[dict], list[dict]]:
    spec = ModelSpec.from_dir(path)
    everything = list(range(spec.n_routed_experts))
    groups = {name: ExpertGroup(path, everything, dtype=torch.bfloat16, spec=spec, **kw) for name, kw in WAYS.items()}
    if groups[BASE].matmul_dtype == torch.bfloat16:  # this CPU serves bf16 natively: the same group twice
        del groups["bf16 native"]
    native = groups.get("bf16 native", groups[BASE])
    memory = [{"way": name, "weight_dtype": g.weight_dtype, "bytes": g.weight_bytes,
               "ratio_vs_bf16_native": g.weight_bytes / native.weight_bytes,
               "ratio_vs_bf16_served": g.weight_bytes / groups[BASE].weight_bytes} for name, g in groups.items()]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for t in tokens:
        calls = routings(path, spec, t, gen)

        def step(group: ExpertGroup, calls: dict = calls) -> list[torch.Tensor]:
            return [group.run(layer, *call).output for layer, call in calls.items()]

        fns = {name: (lambda g=g: step(g)) for name, g in groups.items()}
        outs = {name: fn() for name, fn in fns.items()}
        ref = outs[BASE]
        times = time_round_robin(fns, min_runs if t <= 64 else max(1, min_runs // 3), min_seconds)
        base = statistics.median(times[BASE])
        for name, ts in times.items():
            ms = statistics.median(ts) * 1e3
            diff = max(((o.float() - r.float()).abs().max() / r.float().abs().max()).item()
                       for o, r in zip(outs[name], ref, strict=True))
            rows.append({"tokens": t, "kind": "decode" if t <= 64 else "prefill", "way": name, "median_ms": ms,
                         "runs": len(ts), "tokens_per_s": t / (ms / 1e3), "time_vs_bf16_served": ms / (base * 1e3),
                         "max_rel_diff_vs_bf16_served": diff})
    return memory, rows


def print_tables(memory: list[dict], rows: list[dict]) -> None:
    print(f"{'expert group (all experts)':<16} {'held as':<30} {'MB':>9} {'÷ bf16 native':>14} {'÷ bf16 served':>14}")
    for m in memory:
        print(f"{m['way']:<16} {m['weight_dtype']:<30} {m['bytes'] / 1e6:>9.1f} {m['ratio_vs_bf16_native']:>14.3f} "
              f"{m['ratio_vs_bf16_served']:>14.3f}")
    print(f"\n{'tokens':>6} {'kind':<8} {'way':<14} {'median ms':>10} {'runs':>5} {'tokens/s':>10} "
          f"{'time ÷ bf16 served':>19} {'rel diff':>9}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['kind']:<8} {r['way']:<14} {r['median_ms']:>10.2f} {r['runs']:>5} "
              f"{r['tokens_per_s']:>10.0f} {r['time_vs_bf16_served']:>19.2f} {r['max_rel_diff_vs_bf16_served']:>9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-v3-fp8", help="an FP8 generator preset")
    parser.add_argument("--model", type=Path, help="an FP8 checkpoint directory instead of a generated preset")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 2048])
    parser.add_argument("--min-runs", type=int, default=9)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "fp8_experts.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or make_model(args.preset, Path(tmp) / args.preset, seed=0)
        if ModelSpec.from_dir(path).fp8_block is None:
            raise SystemExit(f"--model {path}: not a block-wise FP8 checkpoint (no quantization_config)")
        memory, rows = run(path, args.tokens, args.min_runs, args.min_seconds)
    print_tables(memory, rows)
    meta = {"benchmark": "fp8_experts", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "threads": torch.get_num_threads(), "model": str(args.model or args.preset)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**meta, "memory": memory, "rows": rows}, indent=1))
    print(f"\nwrote {args.json}  (time ÷ bf16 served < 1: the FP8 path is faster than bf16 as this CPU serves it)")


if __name__ == "__main__":
    main()
