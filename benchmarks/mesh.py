"""Benchmark: many gateways on one expert mesh, with replicas merging their calls and without (issue 27).

small-v3, backend ray, 2 expert groups, 1 replica each, in a named mesh (gateway/dispatch/mesh/). Each gateway is
a separate process (a Ray actor holding `Engine.from_config`) attached to that mesh. For each scheduler.micro_batches
value (1, 2) and G = 1, 2, 3 gateways, a pair of fresh meshes, mesh.merge on and off, both up at once: their
gateways warm up (one short generate), then rounds alternate between the two (on, off / off, on / ...). In a round
every gateway prefills 32 random prompts, the replicas' merge counters are reset, then all gateways decode their 32
sequences from one common start time (greedy, no eos stop). Per row: total output tokens/s, per-gateway decode step
time, rows per expert pass, the share of calls merged into a pass with others, the replicas' compute time per
output token (measured in the replicas) and the passes; the rows per pass the planner predicts (`expertmesh plan
--devices 2 --gateways G --batch 32`, which assumes every gateway's rows meet in one pass). Then merge on against
off per (G, micro-batches): rows per pass (the issue's target at 2 gateways: >= 1.6x) and compute per token
(target: falls >= 30 %), each printed as met or missed.

    python benchmarks/mesh.py [--model models/small-v3] [--gateways 1 2 3] [--micro-batches 1 2]
                              [--new-tokens 24] [--rounds 3] [--quick] [--gpu] [--json benchmarks/results/mesh.json]

--gpu puts every gateway (gateway_device cuda) and both expert groups on the machine's one GPU, each with a 0.1
share (Ray's fractional GPUs): several gateways sharing one GPU. It has never run: no GPU was lent yet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.machine_info import machine  # noqa: E402
from gateway.config import CacheConfig, DeploymentConfig, MeshConfig, RayConfig, SchedulerConfig  # noqa: E402

NAMESPACE = "expertmesh-mesh-bench"
SEQUENCES = 32  # decoding at once on each gateway
ROWS_TARGET = 1.6  # merged / unmerged rows per pass at 2 gateways
COMPUTE_TARGET = 0.30  # the share by which expert compute per token falls with merging at 2 gateways
START_DELAY_S = 1.0  # gateways start decoding at a common wall-clock time this far ahead of the call
GPU_SHARE = 0.1  # --gpu: each gateway's and each expert group's share of the one GPU


class GatewayProcess:
    """One gateway in its own process (`ray.remote(GatewayProcess)`): an Engine attached to the mesh that `cfg`
    names, its 32 sequences prefilled by `prefill`, decoded by `decode` from a common start time."""

    def __init__(self, cfg: DeploymentConfig, threads: int) -> None:
        torch.set_num_threads(threads)
        from gateway import Engine

        self.engine = Engine.from_config(cfg)
        self.requests: list = []

    def warm_up(self, prompts: list[list[int]], new_tokens: int) -> int:
        return sum(len(t) for t in self.engine.generate(prompts, new_tokens, stop_at_eos=False))

    def prefill(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Submit the prompts and step until each has its first token (one step for 32 prompts of 16 tokens)."""
        t0 = time.perf_counter()
        self.requests = [self.engine.submit(p, max_new_tokens=new_tokens, stop_at_eos=False) for p in prompts]
        while not all(r.output for r in self.requests):
            self.engine.step()
        return time.perf_counter() - t0

    def decode(self, start_at: float) -> dict:
        """Wait for wall-clock `start_at`, then step until every sequence is done: start, end, steps, tokens."""
        time.sleep(max(0.0, start_at - time.time()))
        before = sum(len(r.output) for r in self.requests)
        start, steps = time.time(), 0
        while not all(r.done for r in self.requests):
            self.engine.step()
            steps += 1
        end = time.time()
        failed = [r.error for r in self.requests if r.error]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
        return {"start": start, "end": end, "steps": steps,
                "tokens": sum(len(r.output) for r in self.requests) - before,
                "outputs": [list(r.output) for r in self.requests]}

    def close(self) -> None:
        self.engine.close()


def deployment(args: argparse.Namespace, name: str, merge: bool, micro_batches: int) -> DeploymentConfig:
    room = SEQUENCES * (args.prompt_tokens + args.new_tokens + 32)  # every sequence's cache, never preempted
    gpu = {"device_resource": "gpu", "gpus_per_group": GPU_SHARE} if args.gpu else {}
    return DeploymentConfig(model=str(args.model), dtype=args.dtype, backend="ray", devices=2, replicas=1,
                            gateway_device="cuda" if args.gpu else "cpu",
                            ray=RayConfig(cpus_per_group=1.0, namespace=NAMESPACE, **gpu),
                            mesh=MeshConfig(name=name, merge=merge), cache=CacheConfig(max_tokens=room),
                            scheduler=SchedulerConfig(micro_batches=micro_batches))


def prompts_of(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(count)]


@dataclass
class MeshSide:
    """One mesh of a pair (merge on or off) and the gateway processes attached to it."""

    cfg: DeploymentConfig
    merge: bool
    gateways: list = field(default_factory=list)  # ray actor handles of GatewayProcess
    replicas: list = field(default_factory=list)  # ray actor handles of the mesh's expert-group replicas
    rounds: list[dict] = field(default_factory=list)


def start_side(args: argparse.Namespace, gateways: int, merge: bool, micro_batches: int, vocab: int) -> MeshSide:
    """A fresh mesh, its replicas loaded, then `gateways` gateway processes attached and warmed up."""
    import ray

    from gateway.dispatch.mesh.attach import mesh_status, mesh_up

    name = f"bench-{'merge' if merge else 'nomerge'}-{gateways}x{micro_batches}-{uuid.uuid4().hex[:6]}"
    side = MeshSide(deployment(args, name, merge, micro_batches), merge)
    mesh_up(side.cfg)  # the replicas load once, before any gateway attaches
    side.replicas = [ray.get_actor(r["name"], namespace=NAMESPACE)
                     for r in mesh_status(side.cfg, load=False)["replicas"]]
    # --gpu: every gateway and both groups take a share of the one GPU (Ray's fractional GPUs)
    process = ray.remote(GatewayProcess).options(num_cpus=0, num_gpus=GPU_SHARE if args.gpu else 0, max_restarts=0)
    side.gateways = [process.remote(side.cfg, args.gateway_threads) for _ in range(gateways)]
    ray.get([h.warm_up.remote(prompts_of(4, 8, vocab, seed=100 + g), 4) for g, h in enumerate(side.gateways)])
    return side


def decode_round(side: MeshSide, args: argparse.Namespace, vocab: int, seed: int) -> dict:
    """Every gateway prefills its 32 prompts, the replicas' counters are reset, then all decode from one start."""
    import ray

    ray.get([h.prefill.remote(prompts_of(SEQUENCES, args.prompt_tokens, vocab, seed=seed + g), args.new_tokens)
             for g, h in enumerate(side.gateways)])
    ray.get([r.reset_merge_stats.remote() for r in side.replicas])
    start_at = time.time() + START_DELAY_S
    runs = ray.get([h.decode.remote(start_at) for h in side.gateways])
    stats = ray.get([r.merge_stats.remote() for r in side.replicas])
    return measured_round(runs, stats)


def stop_side(side: MeshSide) -> None:
    import ray

    from gateway.dispatch.mesh.attach import mesh_down

    try:
        ray.get([h.close.remote() for h in side.gateways], timeout=120)
    finally:
        for h in side.gateways:
            ray.kill(h, no_restart=True)
        mesh_down(side.cfg)


def run_pair(args: argparse.Namespace, gateways: int, micro_batches: int, vocab: int) -> list[dict]:
    """Merge on and off, each on a fresh mesh, both up at once; their decode rounds alternate (on, off, off, on,
    ...), so drift in the shared machine's load falls on both alike. Two rows: merge on, merge off."""
    t0 = time.perf_counter()
    sides: list[MeshSide] = []
    try:
        for merge in (True, False):
            sides.append(start_side(args, gateways, merge, micro_batches, vocab))
        for i in range(args.rounds):
            for side in (sides if i % 2 == 0 else sides[::-1]):
                side.rounds.append(decode_round(side, args, vocab, seed=args.seed + 1000 * i))
    finally:
        for side in sides:
            stop_side(side)
    return [measured_row(gateways, s.merge, micro_batches, s.rounds, time.perf_counter() - t0) for s in sides]


def measured_round(runs: list[dict], stats: list[dict]) -> dict:
    """One decode round, from the gateways' runs and the replicas' merge counters."""
    tokens = sum(r["tokens"] for r in runs)
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    compute = sum(s["compute_s"] for s in stats)
    return {"output_tokens": tokens, "decode_wall_s": wall, "tokens_per_s": tokens / wall,
            "step_ms": [1e3 * (r["end"] - r["start"]) / r["steps"] for r in runs],
            "steps_per_gateway": [r["steps"] for r in runs], "calls": sum(s["calls"] for s in stats),
            "passes": sum(s["passes"] for s in stats), "rows": sum(s["rows"] for s in stats),
            "merged_calls": sum(s["merged_calls"] for s in stats),
            "max_calls_per_pass": max(s["max_calls_per_pass"] for s in stats), "compute_s": compute,
            "compute_ms_per_token": 1e3 * compute / tokens, "replicas": stats,
            "outputs": [r["outputs"] for r in runs]}


def measured_row(gateways: int, merge: bool, micro_batches: int, rounds: list[dict], pair_s: float) -> dict:
    """A row over its rounds: times as the best round's (the shared machine's other load only ever slows a round
    down; engine_core.py keeps the best of its rounds too), counters as totals."""
    total = {k: sum(r[k] for r in rounds) for k in ("calls", "passes", "rows", "merged_calls")}
    return {
        "gateways": gateways, "merge": merge, "micro_batches": micro_batches, "rounds": rounds,
        "tokens_per_s": max(r["tokens_per_s"] for r in rounds),
        "step_ms_mean": min(sum(r["step_ms"]) / len(r["step_ms"]) for r in rounds),
        "compute_ms_per_token": min(r["compute_ms_per_token"] for r in rounds),
        "rows_per_pass": total["rows"] / total["passes"], "merged_share": total["merged_calls"] / total["calls"],
        "max_calls_per_pass": max(r["max_calls_per_pass"] for r in rounds),
        "passes_per_round": total["passes"] / len(rounds), "pair_wall_s": pair_s,
    }


def planned_rows_per_pass(model: Path, gateways: list[int], batch: int) -> dict[int, float]:
    """`expertmesh plan --devices 2 --gateways G --batch 32 --synthetic zipf:0`: the token rows one device computes
    per MoE layer and step when all G gateways' calls meet in one pass (the planner's assumption)."""
    from deploy.planning.cost_model import Workload
    from deploy.planning.hardware import Hardware
    from deploy.planning.plan import plan
    from deploy.planning.routing_sources import SyntheticRouting, load_spec

    spec = load_spec(str(model))
    hardware = Hardware.from_yaml(ROOT / "deploy" / "hardware" / "h100.yaml")  # rows do not depend on the rates
    source = SyntheticRouting(spec, 4096, 0.0, seed=0)
    return {g: plan(spec, source, hardware, [2], [None], [0], Workload(batch, g))[0].tokens_per_device_mean
            for g in gateways}


def compare(rows: list[dict], planned: dict[int, float]) -> list[dict]:
    """Merge on against off for every (gateways, micro-batches) measured both ways; each row gets its planned rows
    per pass. The issue's targets are judged at 2 gateways (`issue_target` marks those comparisons)."""
    by = {(r["gateways"], r["micro_batches"], r["merge"]): r for r in rows}
    for r in rows:
        r["planned_rows_per_pass"] = planned.get(r["gateways"])
    out = []
    for (gateways, micro, merge), on in by.items():
        off = by.get((gateways, micro, False))
        if not merge or off is None:
            continue
        rows_ratio = on["rows_per_pass"] / off["rows_per_pass"]
        fall = 1 - on["compute_ms_per_token"] / off["compute_ms_per_token"]
        same = [a == b for r_on, r_off in zip(on["rounds"], off["rounds"], strict=True)  # the same prompts
                for x, y in zip(r_on["outputs"], r_off["outputs"], strict=True) for a, b in zip(x, y, strict=True)]
        out.append({"gateways": gateways, "micro_batches": micro, "issue_target": gateways == 2,
                    "merged_share": on["merged_share"],
                    "rows_per_pass_ratio": rows_ratio, "rows_per_pass_target_met": rows_ratio >= ROWS_TARGET,
                    "compute_per_token_fall": fall, "compute_per_token_target_met": fall >= COMPUTE_TARGET,
                    "tokens_per_s_ratio": on["tokens_per_s"] / off["tokens_per_s"],
                    "same_tokens_share": sum(same) / len(same)})
    return out


def print_tables(rows: list[dict], comparisons: list[dict]) -> None:
    print(f"\n{'gateways':>8} {'micro':>5} {'merge':>5} {'tokens/s':>9} {'step ms':>8} {'rows/pass':>9} {'planned':>7} "
          f"{'merged':>6} {'max calls':>9} {'compute ms/tok':>14} {'passes':>6}")
    for r in rows:
        planned = f"{r['planned_rows_per_pass']:7.1f}" if r.get("planned_rows_per_pass") else f"{'-':>7}"
        print(f"{r['gateways']:8} {r['micro_batches']:5} {'on' if r['merge'] else 'off':>5} {r['tokens_per_s']:9.1f} "
              f"{r['step_ms_mean']:8.1f} {r['rows_per_pass']:9.1f} {planned} {r['merged_share']:6.0%} "
              f"{r['max_calls_per_pass']:9} {r['compute_ms_per_token']:14.3f} {r['passes_per_round']:6.0f}")
    print(f"\nmerge on / off: {'gateways':>8} {'micro':>5} {'rows/pass x':>11} {'compute/token':>13} "
          f"{'tokens/s x':>10} {'same tokens':>11}")
    for c in comparisons:
        print(f"{'':15} {c['gateways']:8} {c['micro_batches']:5} {c['rows_per_pass_ratio']:11.2f} "
              f"{-c['compute_per_token_fall']:+13.0%} {c['tokens_per_s_ratio']:10.2f} {c['same_tokens_share']:11.0%}")
    null = {c["micro_batches"]: c for c in comparisons if c["gateways"] == 1}  # nothing merges there: the noise
    for c in (c for c in comparisons if c["issue_target"]):
        verdict = [f"rows per pass x{c['rows_per_pass_ratio']:.2f} (target >= x{ROWS_TARGET}: "
                   f"{'met' if c['rows_per_pass_target_met'] else 'MISSED'})",
                   f"expert compute per token {-c['compute_per_token_fall']:+.0%} (target <= -{COMPUTE_TARGET:.0%}: "
                   f"{'met' if c['compute_per_token_target_met'] else 'MISSED'})",
                   f"merged share {c['merged_share']:.0%}"]
        if c["micro_batches"] in null:
            verdict.append(f"at 1 gateway, where no call merges, compute per token differs by "
                           f"{-null[c['micro_batches']]['compute_per_token_fall']:+.0%} (the noise)")
        print(f"2 gateways, {c['micro_batches']} micro-batch(es): " + "; ".join(verdict))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "small-v3")
    parser.add_argument("--preset", default="small-v3", help="generated into --model when it has no checkpoint")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gateways", type=int, nargs="+", help="gateway counts (default 1 2 3; --quick: 1 2)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, help="tokens per sequence, the first from prefill (default 32; "
                        "--quick: 6)")
    parser.add_argument("--gateway-threads", type=int, default=1, help="torch threads of each gateway process")
    parser.add_argument("--micro-batches", type=int, nargs="+", choices=(1, 2),
                        help="scheduler.micro_batches values (default 1 2; --quick: 1); 2: two calls per gateway in "
                        "flight")
    parser.add_argument("--rounds", type=int, help="decode rounds per row, merge on and off alternating (default 3; "
                        "--quick: 1)")
    parser.add_argument("--cpus", type=int, default=None,
                        help="Ray's logical CPUs (default: the 4 replicas of a pair's two meshes + the gateways)")
    parser.add_argument("--no-plan", action="store_true", help="skip the planner's predicted rows per pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smaller defaults, for a smoke run")
    parser.add_argument("--gpu", action="store_true", help="gateways and expert groups share the one GPU (fractional "
                                                           "Ray GPUs; make gpu-check runs this)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "mesh.json")
    args = parser.parse_args()
    args.gateways = args.gateways or ([1, 2] if args.quick else [1, 2, 3])
    args.micro_batches = args.micro_batches or ([1] if args.quick else [1, 2])
    args.new_tokens = args.new_tokens or (6 if args.quick else 24)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if min(args.gateways) < 1 or args.new_tokens < 2 or args.rounds < 1:
        parser.error("--gateways, --rounds: integers >= 1; --new-tokens: >= 2 (one from prefill, the rest decoded)")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA GPU visible (torch.cuda.is_available() is False)")
    if not (args.model / "config.json").is_file():
        from model_core.make_model import make_model

        make_model(args.preset, args.model)
    import ray

    from model_core.spec import ModelSpec

    vocab = ModelSpec.from_dir(args.model).vocab_size
    ray.init(address="local", num_cpus=args.cpus or max(os.cpu_count() or 1, 4 + max(args.gateways)),
             namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    rows = []
    try:
        for micro in args.micro_batches:
            for gateways in args.gateways:
                for r in run_pair(args, gateways, micro, vocab):
                    rows.append(r)
                    print(f"{gateways} gateway(s), {micro} micro-batch(es), merge {'on' if r['merge'] else 'off'}: "
                          f"{r['tokens_per_s']:.1f} tokens/s, {r['rows_per_pass']:.1f} rows/pass, merged "
                          f"{r['merged_share']:.0%} ({r['pair_wall_s']:.0f}s for the pair)", flush=True)
    finally:
        ray.shutdown()
    planned = {} if args.no_plan else planned_rows_per_pass(args.model, args.gateways, SEQUENCES)
    comparisons = compare(rows, planned)
    for r in rows:
        for one in r["rounds"]:
            del one["outputs"]  # compared between merge on and off; too long to keep
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "mesh", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "model": str(args.model), "dtype": args.dtype, "backend": "ray", "groups": 2, "replicas_per_group": 1,
        "sequences_per_gateway": SEQUENCES, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "gateway_threads": args.gateway_threads, "rounds": args.rounds, "wall_s": time.perf_counter() - started,
        "rows": rows,
        "comparisons": comparisons,
        "targets": {"gateways": 2, "rows_per_pass_ratio": ROWS_TARGET, "compute_per_token_fall": COMPUTE_TARGET},
    }, indent=1))
    print_tables(rows, comparisons)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
