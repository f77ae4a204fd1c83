"""Benchmark: our grouped expert FFN vs transformers' DeepseekV3Experts on the same weights (small-v3 shapes).

Times one MoE layer's routed experts (64 experts, hidden 1024, intermediate 512, top-6) for a decode batch
(8 tokens) and a prefill batch (2048 tokens), in float32 and bfloat16. Implementations are run round-robin
in the same process and the table reports medians and the ratio to transformers' default experts kernel.

    python benchmarks/moe_layer.py [--tokens 8 2048] [--dtypes float32 bfloat16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expert_workers.grouped_ffn import grouped_expert_ffn  # noqa: E402
from model_core.make_model import preset_config  # noqa: E402
from model_core.spec import ModelSpec  # noqa: E402
from router_service.routing import route_tokens  # noqa: E402


def hf_experts(cfg: dict, w_gate_up: torch.Tensor, w_down: torch.Tensor, implementation: str):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    config = DeepseekV3Config(**cfg)
    config._experts_implementation = implementation
    module = DeepseekV3Experts(config)
    module.gate_up_proj.data = w_gate_up
    module.down_proj.data = w_down
    return module


def implementations(hidden, w_gate_up, w_down, ids, weights, modules) -> dict:
    """The four ways to compute one layer's routed experts, as zero-argument callables."""
    return {
        "ours grouped_mm": lambda: grouped_expert_ffn(hidden, w_gate_up, w_down, ids, weights, "grouped_mm"),
        "ours loop (default)": lambda: grouped_expert_ffn(hidden, w_gate_up, w_down, ids, weights, "loop"),
        "hf grouped_mm (default)": lambda: modules["grouped_mm"](hidden, ids, weights),
        "hf eager": lambda: modules["eager"](hidden, ids, weights),
    }


def time_round_robin(fns: dict, min_runs: int, min_seconds: float) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while min(len(t) for t in times.values()) < min_runs or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def run(tokens: list[int], dtypes: list[str], min_runs: int, min_seconds: float) -> list[dict]:
    cfg = preset_config("small-v3")
    spec = ModelSpec.from_dict(cfg)
    h, i, e = spec.hidden_size, spec.moe_intermediate_size, spec.n_routed_experts
    gen = torch.Generator().manual_seed(0)
    w_gate_up32 = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    w_down32 = torch.randn(e, h, i, generator=gen) / i**0.5
    gate = torch.randn(e, h, generator=gen) / h**0.5
    bias = 0.1 * torch.randn(e, generator=gen)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        w_gate_up, w_down = w_gate_up32.to(dtype), w_down32.to(dtype)
        modules = {impl: hf_experts(cfg, w_gate_up, w_down, impl) for impl in ("grouped_mm", "eager")}
        for t in tokens:
            hidden = torch.randn(t, h, generator=gen).to(dtype)
            routing = route_tokens(hidden, gate, spec.router, bias=bias)
            ids, weights = routing.ids, routing.weights
            fns = implementations(hidden, w_gate_up, w_down, ids, weights.to(dtype), modules)
            ref = fns["hf eager"]().float()
            diffs = {name: (fn().float() - ref).abs().max().item() / ref.abs().max().item() for name, fn in fns.items()}
            times = time_round_robin(fns, min_runs, min_seconds)
            medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
            base = medians["hf grouped_mm (default)"]
            for name, ms in medians.items():
                rows.append({
                    "dtype": dtype_name, "tokens": t, "impl": name, "median_ms": ms, "runs": len(times[name]),
                    "speedup_vs_hf_grouped_mm": base / ms, "max_rel_diff_vs_hf_eager": diffs[name],
                    "experts_hit": int(torch.unique(ids).numel()),
                })
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'dtype':<9} {'tokens':>6} {'implementation':<24} {'median ms':>10} {'runs':>5} "
          f"{'× vs hf grouped_mm':>19} {'rel diff':>9}")
    for r in rows:
        print(f"{r['dtype']:<9} {r['tokens']:>6} {r['impl']:<24} {r['median_ms']:>10.3f} {r['runs']:>5} "
              f"{r['speedup_vs_hf_grouped_mm']:>19.2f} {r['max_rel_diff_vs_hf_eager']:>9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--min-runs", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "moe_layer.json")
    args = parser.parse_args()
    rows = run(args.tokens, args.dtypes, args.min_runs, args.min_seconds)
    print_table(rows)
    meta = {
        "benchmark": "moe_layer",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "shapes": "small-v3: E=64, H=1024, I=512, top-6",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.json}  (speedup > 1 means faster than transformers' default grouped_mm experts)")


if __name__ == "__main__":
    main()
