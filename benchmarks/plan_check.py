"""Benchmark: the planner's cost model against measured dispatches on this machine (small-v3, decode).

Calibrates first (each transport's per-call and per-MB cost, an expert group's compute:
`deploy/planning/calibrate.py`, on one-group deployments), then serves 16 decoding sequences on every D in {1, 2, 4}
and top-M in {none, 1, 2} (M < D) over `ray` and `grpc`, logs each MoE layer's dispatch (DispatchStats.keep_layers:
rows, pairs, experts hit, bytes per device call, wall time from plan to combine) and prices the same calls with
`deploy.planning.cost_model.local_layer_seconds`. Prints predicted against measured per-layer dispatch time
(medians over the logged layers) and writes JSON. The whole decode step (gateway included, 1-3 gateways on one
mesh) is checked by benchmarks/plan_step.py.

    python benchmarks/plan_check.py [--model models/small-v3] [--steps 24] [--hardware calibrated.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.planning.cost_model import local_layer_seconds  # noqa: E402
from deploy.planning.hardware import Hardware  # noqa: E402

CONFIGS = ((1, None), (2, None), (2, 1), (4, None), (4, 1), (4, 2))  # (D, M)


@torch.inference_mode()
def measure(model: str, dtype: str, backend: str, devices: int, top_m: int | None, steps: int, hw: Hardware,
            cores: int) -> dict:
    from gateway import Engine
    from gateway.config import CacheConfig, DeploymentConfig

    config = DeploymentConfig(model=model, dtype=dtype, backend=backend, devices=devices, top_m_devices=top_m,
                              cache=CacheConfig(max_tokens=4096))
    with Engine.from_config(config) as engine:
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, engine.spec.vocab_size, (24,), generator=gen).tolist() for _ in range(16)]
        requests = [engine.submit(p, max_new_tokens=steps + 8, stop_at_eos=False) for p in prompts]
        while not all(r.output for r in requests):
            engine.step()
        engine.step()
        engine.backend.stats.keep_layers(100_000)
        for _ in range(steps):
            engine.step()
        log = list(engine.backend.stats.layer_log)
    transport, experts = hw.transports[backend], hw.experts
    measured = [r.seconds * 1e3 for r in log]
    predicted = [local_layer_seconds([(c.bytes_out + c.bytes_back, c.pairs, c.experts_hit) for c in r.calls],
                                     transport, experts, cores) * 1e3 for r in log]
    m, p = statistics.median(measured), statistics.median(predicted)
    return {"backend": backend, "devices": devices, "top_m": top_m, "layers": len(log),
            "measured_ms": m, "predicted_ms": p, "ratio": p / m,
            "group_compute_ms": statistics.median(max(c.compute_ms for c in r.calls) for r in log),
            "calls_per_layer": statistics.mean(len(r.calls) for r in log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "small-v3")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per deployment")
    parser.add_argument("--backends", default="ray,grpc")
    parser.add_argument("--hardware", type=Path, help="a file written by `expertmesh plan --calibrate` (else "
                                                      "calibrate in this run)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "plan_check.json")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        from model_core.make_model import make_model

        make_model("small-v3", args.model)
    import ray

    ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False)  # a benchmark sizes its own Ray
    backends = tuple(args.backends.split(","))
    if args.hardware is not None:
        hw = Hardware.from_yaml(args.hardware)
    else:
        import dataclasses

        from deploy.planning.calibrate import calibrate_local

        rates = calibrate_local(str(args.model), args.dtype, backends, gateway=False)
        hw = dataclasses.replace(Hardware.from_yaml(ROOT / "deploy" / "hardware" / "h100.yaml"), name="this-machine",
                                 transports=rates.transports, experts=rates.experts)
    # The groups share the machine with the gateway, which keeps one core busy (attention, shared experts, the
    # plan and the combine) while they compute.
    cores = max(1, (os.cpu_count() or 1) - 1)
    print(f"\ncalibrated: {hw.transports}; experts {hw.experts}; {cores} core(s) for the groups")
    rows = []
    print(f"\n{'backend':>7} {'D':>2} {'M':>4} {'measured ms':>12} {'predicted ms':>13} {'pred/meas':>10} "
          f"{'group compute ms':>17} {'calls':>6}")
    for backend in backends:
        for devices, top_m in CONFIGS:
            row = measure(str(args.model), args.dtype, backend, devices, top_m, args.steps, hw, cores)
            rows.append(row)
            print(f"{backend:>7} {devices:>2} {str(top_m or 'none'):>4} {row['measured_ms']:12.2f} "
                  f"{row['predicted_ms']:13.2f} {row['ratio']:10.2f} {row['group_compute_ms']:17.2f} "
                  f"{row['calls_per_layer']:6.2f}", flush=True)
    within = sum(0.75 <= r["ratio"] <= 1.25 for r in rows)
    print(f"\n{within}/{len(rows)} within ±25 %")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
        "cpus": os.cpu_count(), "dtype": args.dtype, "steps": args.steps, "cores_for_groups": cores,
        "hardware": hw.to_dict(), "rows": rows, "within_25_percent": within,
    }, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
