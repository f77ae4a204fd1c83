"""Benchmark: what dispatching routed experts over each transport costs, per layer and end to end (small-v3).

For a decode batch (8 tokens) and a prefill batch (2048 tokens) it measures one MoE layer's dispatch round
trip (plan, send to every device, expert compute, combine) for the in-process groups, Ray actor calls (numpy
through the object store), Ray Direct Transport (`ray-rdt`: Gloo on CPU, through the relay actor) and gRPC,
next to the slowest device's compute time and the bytes moved, with each transport's overhead per MB against a
memory copy of the same bytes measured in the same run; then the transports alone (every expert id -1: the
groups check each call and compute nothing), with Ray and gRPC also sending each call its rows (the path before
the shared layer batch) and Ray's own floor (no-op actors taking the same packed calls); then end-to-end throughput
of each deployment relative to the in-process engine (one group, no dispatch), with 1 and 2 ping-pong
micro-batches (scheduler.micro_batches) and the gateway's idle time per MoE layer (blocked collecting replies),
all in the same run.

    python benchmarks/dispatch.py [--model models/small-v3] [--devices 4] [--dtype bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import Engine  # noqa: E402
from gateway.dispatch.dispatcher import batch_bytes, plan_dispatch  # noqa: E402
from gateway.dispatch.transports import ExpertCall, numpy_args, take_rows  # noqa: E402
from model_core.make_model import make_model  # noqa: E402
from router_service.routing import route_tokens  # noqa: E402


def round_robin(fns: dict, runs: int) -> dict[str, tuple[float, list]]:
    """Run every fn once per round (so drift on a shared machine hits all alike), in a new random order each
    round: a call right after another to the same actors finds them warm (one after others' calls can take
    1.5× as long here), so no fn may always follow the same one. name -> (median ms, results in run order)."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, list] = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(runs):
        for name in order.sample(list(fns), len(fns)):
            fn = fns[name]
            t0 = time.perf_counter()
            results[name].append(fn())
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


@torch.inference_mode()
def layer_inputs(ref: Engine, tokens: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first MoE layer, random hidden rows [tokens, H] and the model's routing of them (ids, weights)."""
    spec, layer = ref.spec, ref.spec.moe_layers[0]
    gate = ref.model.layers[layer]
    gen = torch.Generator().manual_seed(tokens)
    u = torch.randn(tokens, spec.hidden_size, generator=gen).to(ref.model.dtype)
    routing = route_tokens(u, gate.gate, spec.router, gate.selection_bias)
    return layer, u, routing.ids, routing.weights


def share_variants(engines: dict[str, Engine]) -> dict[str, tuple[Engine, object]]:
    """name -> (engine, the transport's share_min_bytes to run with, or ... for transports without one): a Ray or
    gRPC deployment twice, with its default (calls on the gateway's node read the layer batch from shared memory:
    Ray's object store, a file in /dev/shm for gRPC) and with each call sent its rows (None: the path before)."""
    variants: dict[str, tuple[Engine, object]] = {}
    for name, engine in engines.items():
        if engine.config.backend in ("ray", "grpc"):
            variants[name] = (engine, engine.backend.transport.share_min_bytes)
            variants[f"{name}, rows per call"] = (engine, None)
        else:
            variants[name] = (engine, ...)
    return variants


def set_share(engine: Engine, share) -> None:
    if share is not ...:
        engine.backend.transport.share_min_bytes = share


def restore_defaults(variants: dict[str, tuple[Engine, object]]) -> None:
    """Each transport back to its default share_min_bytes (the first variant of each, as share_variants made)."""
    for engine, share in reversed(list(variants.values())):
        set_share(engine, share)


@torch.inference_mode()
def layer_round_trips(engines: dict[str, Engine], tokens: int, runs: int) -> list[dict]:
    layer, u, ids, weights = layer_inputs(engines["in-process (1 group)"], tokens)
    variants = share_variants(engines)

    def once(engine, share):
        set_share(engine, share)
        pending = engine.backend.dispatch(layer, u, ids, weights)
        pending.wait()
        nbytes = sum(sum(batch_bytes(*b.ids.shape, u.shape[1], u.element_size(), b.ids.element_size()))
                     for b in pending.batches)
        return [r.compute_ms for r in pending.replies], nbytes, len(pending.batches)

    timed = round_robin({name: (lambda v=v: once(*v)) for name, v in variants.items()}, runs)
    restore_defaults(variants)
    rows = []
    for name, (engine, _) in variants.items():
        ms, results = timed[name]
        # In-process groups run one after another; actors run in parallel, so the slowest one bounds the layer.
        sequential = engine.config.backend == "local"
        compute = statistics.median(sum(c) if sequential else max(c) for c, _, _ in results)
        _, nbytes, calls = results[-1]
        rows.append({
            "tokens": tokens, "deployment": name, "round_trip_ms": ms, "compute_ms": compute,
            "overhead_ms": ms - compute, "bytes_per_layer": nbytes,
            "overhead_ms_per_mb": (ms - compute) / max(nbytes / 1e6, 1e-9), "calls_per_layer": calls,
        })
    floor = memcpy_ms_per_mb(max(r["bytes_per_layer"] for r in rows), runs)
    for r in rows:
        r["memcpy_ms_per_mb"] = floor
    return rows


def memcpy_ms_per_mb(nbytes: int, runs: int) -> float:
    """The floor: one copy of `nbytes` in memory (torch, uint8), median ms per MB."""
    src = torch.randint(0, 255, (max(nbytes, 1),), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(max(runs, 5)):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times) / max(nbytes / 1e6, 1e-9)


class NoopGroup:
    """Ray's own floor: takes the Ray transport's packed call and answers as many bytes, computing nothing (its
    reply is a view of one buffer allocated once, so not even fresh memory is touched)."""

    def __init__(self, hidden_size: int, max_rows: int) -> None:
        self.out = np.ones((max_rows, hidden_size), dtype=np.int16)

    def forward_packed(self, args: tuple, batch=None):
        return self.out[: len(args[1])], 0.0

    def ready(self) -> bool:
        return True


@torch.inference_mode()
def transport_only(engines: dict[str, Engine], tokens: int, runs: int) -> list[dict]:
    """One layer's calls with every expert id -1 (the groups check them and compute nothing), per deployment:
    the transport's cost without expert math competing for the cores. Ray and gRPC run twice, reading the layer
    batch from shared memory (their default) and sending each call its rows (`share_min_bytes=None`); `ray floor` is
    no-op Ray actors taking the same packed calls, each sent its rows."""
    import ray

    layer, u, ids, weights = layer_inputs(engines["in-process (1 group)"], tokens)
    distributed = {n: e for n, e in engines.items() if e.config.backend != "local"}
    if not distributed:
        return []
    some = next(iter(distributed.values())).backend
    batches = plan_dispatch(ids, weights, some.expert_device, some.placement.n_devices)
    nowhere = [torch.full_like(b.ids, -1) for b in batches]
    version = some.placement.version

    def through(engine, share):
        def once():
            set_share(engine, share)
            transport = engine.backend.transport
            calls = [ExpertCall(b.device, layer, u, none, b.weights, b.rows, None, version)
                     for b, none in zip(batches, nowhere, strict=True)]
            handles = [transport.send(call) for call in calls]
            transport.flush()
            return transport.receive(calls, handles)
        return once

    variants = share_variants(distributed)
    fns = {name: through(engine, share) for name, (engine, share) in variants.items()}
    noops = [ray.remote(NoopGroup).remote(u.shape[1], tokens) for _ in batches]
    ray.get([a.ready.remote() for a in noops])

    def floor():
        refs = [a.forward_packed.remote(numpy_args(layer, take_rows(u, b.rows), none, b.weights, None, version))
                for a, b, none in zip(noops, batches, nowhere, strict=True)]
        return ray.get(refs)

    fns["ray floor (no-op actors)"] = floor
    timed = round_robin(fns, runs)
    restore_defaults(variants)
    for a in noops:
        ray.kill(a)
    nbytes = sum(b.rows.numel() * u.shape[1] * u.element_size() * 2 + b.ids.numel() * 12 for b in batches)
    return [{"tokens": tokens, "deployment": name, "round_trip_ms": ms, "bytes_per_layer": nbytes,
             "ms_per_mb": ms / (nbytes / 1e6), "calls_per_layer": len(batches),
             "vs_ray_floor": ms / timed["ray floor (no-op actors)"][0]} for name, (ms, _) in timed.items()]


@torch.inference_mode()
def end_to_end(engines: dict[str, Engine], vocab: int, quick: bool) -> list[dict]:
    """Prefill and decode throughput per deployment; every distributed one with 1 and with 2 micro-batches."""
    gen = torch.Generator().manual_seed(0)
    prefill_prompts = [torch.randint(3, vocab, (512,), generator=gen).tolist() for _ in range(4)]
    decode_prompts = [torch.randint(3, vocab, (16,), generator=gen).tolist() for _ in range(8)]
    steps, runs = (4, 1) if quick else (16, 3)
    variants: dict[str, tuple[Engine, int]] = {}
    for name, engine in engines.items():
        # In-process groups compute inside send (nothing to overlap); ray-dag runs one layer's graph at a time.
        for mb in ((1,) if engine.config.backend in ("local", "ray-dag") else (1, 2)):
            variants[name if mb == 1 else f"{name}, 2 micro-batches"] = (engine, mb)

    def job(name: str, fn):
        engine, mb = variants[name]

        def run():
            engine.micro_batches = mb
            return fn(engine)
        return run

    prefill = round_robin({n: job(n, lambda e: e.logits(prefill_prompts)) for n in variants}, runs)
    one = round_robin({n: job(n, lambda e: e.generate(decode_prompts, 1, stop_at_eos=False)) for n in variants},
                      runs)
    many = round_robin({n: job(n, lambda e: e.generate(decode_prompts, steps + 1, stop_at_eos=False))
                        for n in variants}, runs)
    rows = []
    for name, (engine, mb) in variants.items():
        prefill_ms = prefill[name][0]
        decode_ms = (many[name][0] - one[name][0]) / steps  # per decode step of 8 sequences
        rows.append({"deployment": name, "micro_batches": mb, "prefill_tokens_per_s": 2048 / (prefill_ms / 1e3),
                     "decode_tokens_per_s": 8 / (decode_ms / 1e3), "decode_step_ms": decode_ms,
                     "prefill_idle_ms_per_layer": idle_ms_per_layer(engine, mb, lambda e: e.logits(prefill_prompts)),
                     "decode_idle_ms_per_layer": idle_ms_per_layer(
                         engine, mb, lambda e: e.generate(decode_prompts, steps + 1, stop_at_eos=False))})
        # Same tokens as this deployment with 1 micro-batch? (Exact in the float32 tests; in bfloat16 the halves'
        # smaller GEMMs may round differently and flip a near-tie greedy token, as any change of batch can.)
        single = next(n for n, (e, m) in variants.items() if e is engine and m == 1)
        rows[-1]["tokens_equal_to_1_micro_batch"] = many[name][1][0] == many[single][1][0]
    base = rows[0]
    for r in rows:
        r["prefill_vs_in_process"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        r["decode_vs_in_process"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


def idle_ms_per_layer(engine: Engine, micro_batches: int, fn) -> float:
    """The gateway's time blocked collecting expert replies, per MoE layer dispatch, over one run of fn."""
    engine.micro_batches = micro_batches
    stats = engine.backend.stats
    blocked, layers = stats.blocked_seconds, stats.layers
    fn(engine)
    return (stats.blocked_seconds - blocked) * 1e3 / max(1, stats.layers - layers)


def print_tables(layer_rows: list[dict], transport_rows: list[dict], e2e_rows: list[dict]) -> None:
    print("one MoE layer, dispatch round trip (median); compute = Σ groups in-process, slowest actor otherwise")
    print(f"{'tokens':>6}  {'deployment':<34} {'round trip ms':>13} {'compute ms':>11} {'overhead ms':>12} "
          f"{'calls':>5} {'bytes moved':>12} {'overhead ms/MB':>15} {'memcpy ms/MB':>13}")
    for r in layer_rows:
        print(f"{r['tokens']:>6}  {r['deployment']:<34} {r['round_trip_ms']:>13.2f} "
              f"{r['compute_ms']:>11.2f} {r['overhead_ms']:>12.2f} {r['calls_per_layer']:>5} "
              f"{r['bytes_per_layer']:>12,} {r['overhead_ms_per_mb']:>15.3f} {r['memcpy_ms_per_mb']:>13.3f}")
    print("\ntransports alone: one layer's calls, every expert id -1 (checked, nothing computed), median")
    print(f"{'tokens':>6}  {'deployment':<36} {'round trip ms':>13} {'calls':>5} {'bytes moved':>12} {'ms/MB':>8} "
          f"{'× ray floor':>11}")
    for r in transport_rows:
        print(f"{r['tokens']:>6}  {r['deployment']:<36} {r['round_trip_ms']:>13.2f} {r['calls_per_layer']:>5} "
              f"{r['bytes_per_layer']:>12,} {r['ms_per_mb']:>8.3f} {r['vs_ray_floor']:>11.2f}")
    print("\nend to end (prefill: 4 × 512 tokens; decode: 8 sequences, one token each per step); idle = the gateway "
          "blocked collecting replies, ms per MoE layer")
    print(f"{'deployment':<36} {'prefill tok/s':>13} {'× in-proc':>9} {'idle':>6} {'decode tok/s':>13} "
          f"{'× in-proc':>9} {'idle':>6} {'same tokens as 1 µb':>20}")
    for r in e2e_rows:
        print(f"{r['deployment']:<36} {r['prefill_tokens_per_s']:>13.0f} {r['prefill_vs_in_process']:>9.2f} "
              f"{r['prefill_idle_ms_per_layer']:>6.2f} {r['decode_tokens_per_s']:>13.1f} "
              f"{r['decode_vs_in_process']:>9.2f} {r['decode_idle_ms_per_layer']:>6.2f} "
              f"{str(r['tokens_equal_to_1_micro_batch']):>20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/small-v3"))
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--deployments", nargs="+", default=["local", "ray", "ray-rdt", "grpc"],
                        choices=["local", "ray", "ray-dag", "ray-rdt", "grpc"],
                        help="compared with the in-process engine; measure ray-dag in a run of its own on a small "
                             "machine: compiled-graph actors poll their channels and slow every other process")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "dispatch.json")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        print(f"generating {args.model} (small-v3) ...")
        make_model("small-v3", args.model)
    import ray

    actors = len(args.deployments) * args.devices + 2
    ray.init(num_cpus=max(os.cpu_count() or 1, actors), include_dashboard=False,
             log_to_driver=False)
    d = args.devices
    labels = {"local": f"in-process ({d} groups)", "ray": f"ray ({d} actors)", "ray-dag": f"ray-dag ({d} actors)",
              "ray-rdt": f"ray-rdt ({d} actors)", "grpc": f"grpc ({d} actors)"}
    engines = {"in-process (1 group)": Engine.from_pretrained(args.model, backend="local", dtype=args.dtype)}
    for backend in args.deployments:
        engines[labels[backend]] = Engine.from_pretrained(args.model, backend=backend, devices=d, dtype=args.dtype)
    try:
        runs = {8: 10 if args.quick else 50, 2048: 2 if args.quick else 5}
        defaults = {n: v[1] for n, v in share_variants(engines).items()}
        layer_rows = [row for t, n in runs.items() for row in layer_round_trips(engines, t, n)]
        more = 1 if args.quick else 6  # the transports alone are cheap to measure many times over
        transport_rows = [row for t, n in runs.items() for row in transport_only(engines, t, more * n)]
        after = {n: v[1] for n, v in share_variants(engines).items()}
        assert after == defaults, f"a transport was left off its default share_min_bytes: {after} != {defaults}"
        e2e_rows = end_to_end(engines, engines["in-process (1 group)"].spec.vocab_size, args.quick)
    finally:
        for e in engines.values():
            e.close()
        ray.shutdown()
    print_tables(layer_rows, transport_rows, e2e_rows)
    meta = {
        "benchmark": "dispatch", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
        "model": str(args.model), "dtype": args.dtype, "devices": d,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = {**meta, "layer": layer_rows, "transport_only": transport_rows, "end_to_end": e2e_rows}
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
