"""Benchmark: the decode step `expertmesh plan` predicts on this machine against the step the engine measures.

Calibrates first (`deploy/planning/calibrate.py`: the ray transport's per-call and per-MB cost and an expert group's
compute on one-group deployments, a gateway's own step on a `backend: local` one; or `--hardware FILE` from
`expertmesh plan --calibrate`), writes the hardware file it priced with, then for D = 1, 2, 3 expert groups (backend
ray, one replica each, in a named mesh started by `mesh_up`) and G = 1, 2, 3 gateways (each a Ray actor holding an
Engine attached to that mesh, torch threads as calibrated) decodes 16 sequences per gateway from a common start and
times each gateway's steps. The prediction is the planner's own (`deploy.planning.plan.plan` with `LocalPricing`:
what `expertmesh plan --hardware FILE --transport ray --devices D --gateways G --batch 16` prints), on synthetic
uniform routing (zipf:0). Prints predicted against measured step time (the mean over gateways of each gateway's mean
step) with their ratio and whether it is within ±25 %, and writes JSON.

    python benchmarks/plan_step.py [--model models/small-v3] [--steps 12] [--hardware FILE] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.machine_info import machine  # noqa: E402
from deploy.planning.hardware import Hardware, hardware_yaml  # noqa: E402
from gateway.config import CacheConfig, DeploymentConfig, MeshConfig, RayConfig  # noqa: E402

NAMESPACE = "expertmesh-plan-step"
SEQUENCES = 16  # decoding at once on each gateway
PROMPT_TOKENS = 16
TOLERANCE = 0.25
START_DELAY_S = 1.0  # gateways start decoding at a common wall-clock time this far ahead


class GatewayProcess:
    """One gateway in its own process (`ray.remote(GatewayProcess)`): an Engine attached to the mesh `cfg` names."""

    def __init__(self, cfg: DeploymentConfig, threads: int) -> None:
        torch.set_num_threads(threads)
        from gateway import Engine

        self.engine = Engine.from_config(cfg)
        self.requests: list = []

    def prefill(self, prompts: list[list[int]], new_tokens: int) -> None:
        """Warm up (one short generate), then submit the prompts and step until each has its first token."""
        self.engine.generate(prompts[:2], 2, stop_at_eos=False)
        self.requests = [self.engine.submit(p, max_new_tokens=new_tokens, stop_at_eos=False) for p in prompts]
        while not all(r.output for r in self.requests):
            self.engine.step()

    def decode(self, start_at: float, steps: int) -> dict:
        """Wait for wall-clock `start_at`, then time `steps` decode steps of the whole batch; with what the dispatcher
        logged meanwhile: the time it sat blocked on replies, and per layer its wall time and slowest group compute."""
        import statistics

        stats = self.engine.backend.stats
        stats.keep_layers(steps * len(self.engine.spec.moe_layers))
        time.sleep(max(0.0, start_at - time.time()))
        blocked = stats.blocked_seconds
        busy, start = machine_busy_s(), time.time()
        for _ in range(steps):
            self.engine.step()
        end, busy = time.time(), machine_busy_s() - busy
        log = list(stats.layer_log)
        stats.keep_layers(0)
        blocked = stats.blocked_seconds - blocked
        failed = [r.error for r in self.requests if r.error]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
        if any(r.done for r in self.requests):
            raise RuntimeError("a sequence finished inside the timed steps: the batch shrank")
        return {"start": start, "end": end, "steps": steps, "blocked_s": blocked, "busy_s": busy,
                "layer_ms": statistics.median(r.seconds for r in log) * 1e3,
                "compute_ms": statistics.median(max(c.compute_ms for c in r.calls) for r in log)}

    def close(self) -> None:
        self.engine.close()


def machine_busy_s() -> float:
    """CPU seconds every core of this machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def prompts_of(count: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (PROMPT_TOKENS,), generator=gen).tolist() for _ in range(count)]


def measure(args: argparse.Namespace, devices: int, gateways: int, threads: int, vocab: int) -> dict:
    """One fresh mesh of `devices` groups, `gateways` gateway processes on it, one timed decode of all together."""
    import ray

    from gateway.dispatch.mesh.attach import mesh_down, mesh_up

    new_tokens = args.steps + 4  # nobody finishes inside the timed steps
    cfg = DeploymentConfig(model=str(args.model), dtype=args.dtype, backend="ray", devices=devices, replicas=1,
                           ray=RayConfig(cpus_per_group=1.0, namespace=NAMESPACE),
                           mesh=MeshConfig(name=f"plan-step-{devices}x{gateways}-{uuid.uuid4().hex[:6]}"),
                           cache=CacheConfig(max_tokens=SEQUENCES * (PROMPT_TOKENS + new_tokens + 32)))
    t0 = time.perf_counter()
    mesh_up(cfg)
    handles = []
    try:
        process = ray.remote(GatewayProcess).options(num_cpus=0, max_restarts=0)
        handles = [process.remote(cfg, threads) for _ in range(gateways)]
        ray.get([h.prefill.remote(prompts_of(SEQUENCES, vocab, seed=args.seed + g), new_tokens)
                 for g, h in enumerate(handles)])
        load = os.getloadavg()[0]
        start_at = time.time() + START_DELAY_S
        runs = ray.get([h.decode.remote(start_at, args.steps) for h in handles])
        ray.get([h.close.remote() for h in handles])
    finally:
        for h in handles:
            ray.kill(h, no_restart=True)
        mesh_down(cfg)
    step_ms = [1e3 * (r["end"] - r["start"]) / r["steps"] for r in runs]
    own_ms = [1e3 * (r["end"] - r["start"] - r["blocked_s"]) / r["steps"] for r in runs]
    return {"devices": devices, "gateways": gateways, "measured_ms": mean(step_ms), "measured_ms_per_gateway": step_ms,
            "measured_unblocked_ms": mean(own_ms), "measured_layer_ms": mean([r["layer_ms"] for r in runs]),
            "measured_compute_ms": mean([r["compute_ms"] for r in runs]), "load_1min": load,
            # the machine's busy CPU per step while the gateways stepped (every process on it: read beside `load`)
            "measured_cpu_ms": mean([1e3 * r["busy_s"] / r["steps"] for r in runs]),
            "row_wall_s": time.perf_counter() - t0}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def predict(model: Path, hw: Hardware, devices: int, gateways: int, steps: int, cores: float) -> dict:
    """The planner's step for D groups and G gateways of 16 sequences, priced from `hw`'s calibrated ray rates."""
    from deploy.planning.cost_model import Workload
    from deploy.planning.local_step import LocalPricing
    from deploy.planning.plan import plan
    from deploy.planning.routing_sources import SyntheticRouting, load_spec

    spec = load_spec(str(model))
    work = Workload(SEQUENCES, gateways, context=PROMPT_TOKENS + steps)
    source = SyntheticRouting(spec, SEQUENCES * gateways * 32, 0.0, seed=0)
    (row,) = plan(spec, source, hw, [devices], [None], [0], work, LocalPricing("ray", cores))
    return {"predicted_ms": row.step_ms_serial, "gateway_step_ms": row.gateway_step_ms,
            "predicted_cpu_ms": row.floor_ms * cores,  # every process's CPU work in one step
            "predicted_layer_ms": (row.comm_us + row.expert_us) / 1e3, "predicted_compute_ms": row.expert_us / 1e3,
            "pricing": row.pricing}


def calibrated_hardware(args: argparse.Namespace) -> Hardware:
    """`--hardware`, or this machine calibrated now (written next to the JSON, for `expertmesh plan --hardware`)."""
    if args.hardware is not None:
        return Hardware.from_yaml(args.hardware)
    from deploy.planning.calibrate import calibrate_local, measure_machine

    base = Hardware.from_yaml(ROOT / "deploy" / "hardware" / "h100.yaml")
    measured, where = measure_machine(base, "this-machine")
    rates = calibrate_local(str(args.model), args.dtype, ("ray",))
    hw = dataclasses.replace(measured, transports=rates.transports, experts=rates.experts, gateway=rates.gateway,
                             cores=rates.cores)
    where.update(transports="measured: one-group ray deployment", experts="measured: the group's compute",
                 gateway="measured: local deployment's decode steps minus its groups' compute",
                 cores="measured: Ray workers streaming expert-sized weights together over one alone")
    out = args.json.with_suffix(".hardware.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(hardware_yaml(hw, where))
    print(f"calibrated: ray {hw.transports['ray']}; {hw.experts}; {hw.gateway}; cores {hw.cores}; wrote {out}",
          flush=True)
    return hw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "small-v3")
    parser.add_argument("--preset", default="small-v3", help="generated into --model when it has no checkpoint")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--devices", type=int, nargs="+", help="expert groups D (default 1 2 3; --quick: 1 2)")
    parser.add_argument("--gateways", type=int, nargs="+", help="gateways G (default 1 2 3; --quick: 1 2)")
    parser.add_argument("--steps", type=int, help="timed decode steps per gateway (default 12; --quick: 3)")
    parser.add_argument("--hardware", type=Path, help="a file written by `expertmesh plan --calibrate` (else "
                                                      "calibrate in this run)")
    parser.add_argument("--cores", type=float, help="cores the planner prices with (default: the calibrated "
                                                    "cores, else the CPU count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="D, G in {1, 2} on the diagonal, 3 steps: a smoke run")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "plan_step.json")
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.quick else 12)
    devices = args.devices or ([1, 2] if args.quick else [1, 2, 3])
    gateways = args.gateways or ([1, 2] if args.quick else [1, 2, 3])
    configs = list(zip(devices, gateways, strict=False)) if args.quick else [(d, g) for d in devices for g in gateways]
    if not (args.model / "config.json").is_file():
        from model_core.make_model import make_model

        make_model(args.preset, args.model)
    import ray

    from model_core.spec import ModelSpec

    vocab = ModelSpec.from_dir(args.model).vocab_size
    started, load_before = time.perf_counter(), os.getloadavg()
    ray.init(address="local", num_cpus=max(devices) + 2, namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False)
    rows = []
    try:
        hw = calibrated_hardware(args)
        if "ray" not in hw.transports:
            parser.error(f"--hardware {args.hardware}: has no calibrated ray transport")
        threads = hw.gateway.threads if hw.gateway is not None else 1
        args.cores = args.cores or hw.cores or os.cpu_count() or 1
        print(f"\n{'D':>2} {'G':>2} {'measured ms':>12} {'predicted ms':>13} {'pred/meas':>10} {'±25 %':>6} "
              f"{'gw ms meas':>10} {'pred':>6} {'layer ms meas':>13} {'pred':>6} {'compute ms meas':>15} {'pred':>6} "
              f"{'load':>5} {'cpu ms meas':>11} {'pred':>6}", flush=True)
        for d, g in configs:
            row = {**measure(args, d, g, threads, vocab), **predict(args.model, hw, d, g, args.steps, args.cores)}
            row["ratio"] = row["predicted_ms"] / row["measured_ms"]
            row["within"] = abs(row["ratio"] - 1) <= TOLERANCE
            rows.append(row)
            print(f"{d:>2} {g:>2} {row['measured_ms']:12.1f} {row['predicted_ms']:13.1f} {row['ratio']:10.2f} "
                  f"{'yes' if row['within'] else 'NO':>6} {row['measured_unblocked_ms']:10.1f} "
                  f"{row['gateway_step_ms']:6.1f} {row['measured_layer_ms']:13.1f} {row['predicted_layer_ms']:6.1f} "
                  f"{row['measured_compute_ms']:15.1f} {row['predicted_compute_ms']:6.1f} {row['load_1min']:5.1f} "
                  f"{row['measured_cpu_ms']:11.1f} {row['predicted_cpu_ms']:6.1f}", flush=True)
    finally:
        ray.shutdown()
    within = sum(r["within"] for r in rows)
    print(f"\n{within}/{len(rows)} within ±{TOLERANCE:.0%}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "plan_step", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "load_before": load_before, "model": str(args.model), "dtype": args.dtype,
        "backend": "ray", "sequences_per_gateway": SEQUENCES, "steps": args.steps, "cores": args.cores,
        "hardware": hw.to_dict(), "rows": rows, "within": within, "tolerance": TOLERANCE,
        "wall_s": time.perf_counter() - started,
    }, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
