"""Benchmark: what tracing costs on the dispatch path (one MoE layer, in-process expert groups).

Compares, round-robin in one process on the same routed batch: an uninstrumented copy of the dispatch path
(plan → send → receive → combine, no tracing hooks at all), the real path with tracing off, with tracing on
but the trace not sampled (ratio 0), and with every span recorded to JSONL. Ratios are to the baseline.

    python benchmarks/tracing_overhead.py [--model models/tiny-v3] [--tokens 8] [--runs 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import Engine  # noqa: E402
from gateway.config import DeploymentConfig  # noqa: E402
from gateway.dispatch.dispatcher import combine, plan_dispatch  # noqa: E402
from gateway.dispatch.transports import ExpertCall  # noqa: E402
from model_core.make_model import make_model  # noqa: E402
from model_core.telemetry import TracingConfig  # noqa: E402
from router_service.routing import route_tokens  # noqa: E402


def uninstrumented(backend, layer, hidden, ids, weights) -> torch.Tensor:
    """The dispatch path with no tracing hooks: what 'tracing off' must cost no more than."""
    batches = plan_dispatch(ids, weights, backend.expert_device, backend.placement.n_devices)
    calls = [ExpertCall(b.device, layer, hidden[b.rows], b.ids, b.weights) for b in batches]
    replies = backend.transport.receive(calls, [backend.transport.send(call) for call in calls])
    return combine(hidden.shape[0], hidden.shape[1], batches, [r.output for r in replies], hidden.dtype)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/tiny-v3"))
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "tracing_overhead.json")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        make_model(args.model.name if args.model.name in ("tiny-v3", "small-v3") else "tiny-v3", args.model)
    spans_dir = tempfile.mkdtemp(prefix="expertmesh-spans-")
    tracing = {
        "tracing off": TracingConfig(exporter="none"),
        "on, not sampled": TracingConfig(exporter="jsonl", jsonl_dir=spans_dir, sample_ratio=0.0),
        "on, jsonl": TracingConfig(exporter="jsonl", jsonl_dir=spans_dir, sample_ratio=1.0),
    }
    engines = {name: Engine.from_config(DeploymentConfig(model=str(args.model), devices=args.devices, tracing=t))
               for name, t in tracing.items()}
    ref = engines["tracing off"]
    layer = ref.spec.moe_layers[0]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, ref.spec.hidden_size, generator=gen)
    weights_layer = ref.model.layers[layer]
    routing = route_tokens(hidden, weights_layer.gate, ref.spec.router, weights_layer.selection_bias)
    fns = {"baseline (no hooks)": lambda: uninstrumented(ref.backend, layer, hidden, routing.ids, routing.weights)}
    for name, engine in engines.items():
        tracer = engine.telemetry.tracer

        def run(engine=engine, tracer=tracer):
            if tracer is None:
                return engine.backend.dispatch(layer, hidden, routing.ids, routing.weights).wait()
            with tracer.start_as_current_span("bench"):
                return engine.backend.dispatch(layer, hidden, routing.ids, routing.weights).wait()

        fns[name] = run
    expected = fns["baseline (no hooks)"]()
    for name, fn in fns.items():
        assert torch.equal(fn(), expected), name
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e6)
    for e in engines.values():
        e.close()
    base = statistics.median(times["baseline (no hooks)"])
    rows = [{"variant": name, "median_us": statistics.median(t), "ratio": statistics.median(t) / base}
            for name, t in times.items()]
    print(f"one MoE layer dispatch, {args.tokens} tokens, {args.devices} in-process groups, {args.model.name}, "
          f"{args.runs} round-robin runs")
    print(f"{'variant':<22} {'median µs':>10} {'× baseline':>11}")
    for r in rows:
        print(f"{r['variant']:<22} {r['median_us']:>10.1f} {r['ratio']:>11.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "tracing_overhead", "date": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "model": str(args.model), "tokens": args.tokens, "rows": rows}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
