"""Benchmark: balancing skewed traffic with the bias (adapt) and with redundant experts (eplb), small-v3, Ray.

Skewed traffic: random sequences over a narrow "topic" of 32 token ids, the ones whose routing leans most
toward one device. The placement is one a deployment could have made for other traffic: the experts this
topic uses most sit together on device 0 (written to the results folder). Under the model's exact routing
that device carries ≥ 2.5× the mean load in some layer. The same traffic then runs in each mode, one window
per row, until its target is met in every MoE layer or its window budget is spent:

- exact: the model's own routing (observe mode), the baseline;
- adapt: the aux-loss-free bias, until expert and device max/mean ≤ 1.3 (it changes which experts serve);
- eplb: redundant experts and live re-placement, until device max/mean ≤ 1.10 (answers unchanged);
- eplb+bias: both, the bias held to `max_changed_slots`.

Per mode and layer it reports device and expert max/mean, changed tokens and slots, tokens/s,
rearrangements and requests failed during them; the last line sums up EPLB.

    python benchmarks/balance.py [--backend ray] [--modes exact adapt eplb eplb+bias] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import Engine  # noqa: E402
from gateway.config import DeploymentConfig, RayConfig  # noqa: E402
from gateway.model.step import StepBatch  # noqa: E402
from model_core.make_model import make_model  # noqa: E402
from router_service.bias import BalanceConfig  # noqa: E402
from router_service.placement import Placement  # noqa: E402
from router_service.service import report_table  # noqa: E402

TARGET = 1.3  # adapt: expert and device max/mean
EPLB_TARGET = 1.10  # eplb modes: device max/mean (expert load is the model's own)
SKEW = 2.5


@torch.inference_mode()
def routed_ids(engine: Engine, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """One prefill of `tokens` ([n]) outside the engine's accounting: {layer: ids [n, K]}."""
    _, routings = engine.model.forward(tokens, StepBatch([0], [0], [tokens.numel()]), None)  # no cache needed
    return {layer: r.ids for layer, r in routings.items()}


def skewed_setup(
    model: Path, devices: int, dtype: str, topic_size: int, seed: int, rounds: int = 3
) -> tuple[torch.Tensor, Placement]:
    """Pick topic tokens and a placement that the topic overloads, reinforcing each other for a few rounds:
    the tokens leaning most toward device 0, then the experts they use most moved onto device 0."""
    gen = torch.Generator().manual_seed(seed)
    with Engine.from_pretrained(model, dtype=dtype, devices=devices) as engine:
        n, vocab = engine.spec.n_routed_experts, engine.spec.vocab_size
        placement = Placement.contiguous(n, devices)
        samples = [torch.randint(3, min(vocab, 259), (512,), generator=gen) for _ in range(4)]
        routed = [(tokens, routed_ids(engine, tokens)) for tokens in samples]
        for _ in range(rounds):
            device = placement.device_tensor()
            lean, seen = torch.zeros(vocab), torch.zeros(vocab)
            for tokens, per_layer in routed:
                for ids in per_layer.values():
                    lean.index_add_(0, tokens, (device[ids] == 0).float().mean(1))
                    seen.index_add_(0, tokens, torch.ones(tokens.numel()))
            topic = (lean / seen.clamp(min=1)).topk(topic_size).indices
            load = torch.zeros(n, dtype=torch.long)
            for ids in routed_ids(engine, topic[torch.randint(0, topic_size, (2048,), generator=gen)]).values():
                load += torch.bincount(ids.flatten(), minlength=n)
            hot = load.argsort(descending=True).tolist()
            per_device = n // devices
            rest = sorted(hot[per_device:])
            lists = [hot[:per_device]] + [rest[d * per_device : (d + 1) * per_device] for d in range(devices - 1)]
            placement = Placement.from_device_lists([sorted(x) for x in lists], n)
    return topic, placement


def traffic(topic: torch.Tensor, tokens: int, gen: torch.Generator, length: int = 512) -> list[list[int]]:
    return [topic[torch.randint(0, topic.numel(), (length,), generator=gen)].tolist() for _ in range(tokens // length)]


MODE_SETTINGS = {  # benchmark mode -> balancing.mode and the target that ends its windows early
    "exact": ("observe", None),
    "adapt": ("adapt", TARGET),
    "eplb": ("eplb", EPLB_TARGET),
    "eplb+bias": ("eplb+bias", EPLB_TARGET),
}


def worst(reports: list[dict]) -> tuple[float, float]:
    return max(r["expert_max_over_mean"] for r in reports), max(r["device_max_over_mean"] for r in reports)


def run_mode(mode: str, config: DeploymentConfig, topic: torch.Tensor, gen: torch.Generator,
             args: argparse.Namespace) -> dict:
    """The same skewed traffic, one balancing window per row, until the mode's target is met (every layer) or
    its window budget is spent; placements switch in the background between steps (eplb modes)."""
    _, target = MODE_SETTINGS[mode]
    budget = args.exact_windows if target is None else args.max_windows
    rows, failed, tokens, seconds, converged_at, reports = [], 0, 0, 0.0, None, []
    with Engine.from_config(config) as engine:
        for window in range(1, budget + 1):
            batch = traffic(topic, args.window_tokens, gen)
            t0 = time.perf_counter()
            try:
                engine.logits(batch)
                tokens += sum(len(p) for p in batch)
            except Exception as exc:  # counted: a request failed (e.g. during a rearrangement)
                failed += len(batch)
                print(f"{mode} window {window}: requests failed: {exc}", flush=True)
            seconds += time.perf_counter() - t0
            stats = engine.balance_stats()
            engine.wait_rearranged()
            reports = stats["last_window"]
            expert_worst, device_worst = worst(reports)
            rows.append({
                "window": window, "bias_version": stats["version"], "placement_version":
                    engine.backend.placement.version, "rearrangements": engine.rearrangements,
                "expert_max_over_mean": expert_worst, "device_max_over_mean": device_worst,
                "changed_share": max(r["changed_share"] for r in reports),
                "changed_slot_share": max(r["changed_slot_share"] for r in reports),
            })
            print(f"{mode:>9} window {window:>3}: worst expert max/mean {expert_worst:5.2f}, worst device max/mean "
                  f"{device_worst:5.2f}, tokens changed {rows[-1]['changed_share']:.0%}, expert slots changed "
                  f"{rows[-1]['changed_slot_share']:.0%}, placement v{rows[-1]['placement_version']}", flush=True)
            done = device_worst <= target if target is not None and mode != "adapt" else (
                target is not None and expert_worst <= target and device_worst <= target)
            if done:
                converged_at = window
                break
        redundant = engine.backend.placement.redundant_slots(engine.spec.moe_layers[0])
        return {"mode": mode, "windows": rows, "after": reports, "converged_at": converged_at,
                "rearrangements": engine.rearrangements, "rearrangement_failures": engine.rearrangement_failures,
                "failed_requests": failed, "tokens_per_s": tokens / seconds if seconds else 0.0,
                "redundant_slots": redundant,
                "changed_tokens_max": max(r["changed_share"] for r in rows),
                "changed_slots_max": max(r["changed_slot_share"] for r in rows)}


def run(args: argparse.Namespace) -> dict:
    topic, placement = skewed_setup(args.model, args.devices, args.dtype, args.topic_size, args.seed)
    placement_file = args.json.parent / "balance_placement.json"
    placement_file.parent.mkdir(parents=True, exist_ok=True)
    placement_file.write_text(placement.to_json())

    def deployment(mode: str) -> DeploymentConfig:
        return DeploymentConfig(
            model=str(args.model), dtype=args.dtype, backend=args.backend, devices=args.devices,
            placement=str(placement_file), ray=RayConfig(cpus_per_group=args.cpus_per_group),
            balancing=BalanceConfig(
                mode=MODE_SETTINGS[mode][0], gamma=args.gamma, gamma_decay_windows=args.gamma_decay_windows,
                max_bias=args.max_bias, window_tokens=args.window_tokens, redundant_slots=args.redundant_slots,
                rebalance_every_windows=1, min_gain=args.eplb_min_gain, max_changed_slots=args.max_changed_slots,
                name=f"balance-bench-{uuid.uuid4().hex[:6]}",
            ),
        )

    results = {}
    for mode in args.modes:
        gen = torch.Generator().manual_seed(args.seed + 1)  # every mode sees the same traffic
        results[mode] = run_mode(mode, deployment(mode), topic, gen, args)
    return {"modes": results, "topic_tokens": topic.tolist(), "placement": json.loads(placement.to_json())}


def print_summary(result: dict, args: argparse.Namespace) -> None:
    modes = result["modes"]
    first = next(iter(modes.values()))["windows"][0]
    print(f"\n{'mode':>9} {'windows':>7} {'device max/mean':>15} {'expert max/mean':>15} {'changed tokens':>14} "
          f"{'slots':>6} {'tokens/s':>9} {'rearr.':>6} {'failed':>6} {'copies':>6}")
    for mode, r in modes.items():
        last = r["windows"][-1]
        print(f"{mode:>9} {len(r['windows']):>7} {last['device_max_over_mean']:>15.2f} "
              f"{last['expert_max_over_mean']:>15.2f} {r['changed_tokens_max']:>14.1%} {r['changed_slots_max']:>6.1%} "
              f"{r['tokens_per_s']:>9.0f} {r['rearrangements']:>6} {r['failed_requests']:>6} {r['redundant_slots']:>6}")
    for mode, r in modes.items():
        print(f"\n{mode}: last window, per layer")
        print(report_table(r["after"]))
    if "eplb" in modes:
        e = modes["eplb"]
        start = modes["exact"]["windows"][0]["device_max_over_mean"] if "exact" in modes else \
            first["device_max_over_mean"]
        print(f"\nEPLB: device max/mean {start:.2f} -> {e['windows'][-1]['device_max_over_mean']:.2f}, changed tokens "
              f"{e['changed_tokens_max']:.0%}, failed requests {e['failed_requests']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/small-v3"))
    parser.add_argument("--backend", default="ray", choices=["local", "ray", "grpc"])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--topic-size", type=int, default=32)
    parser.add_argument("--window-tokens", type=int, default=4096)
    parser.add_argument("--gamma", type=float, default=0.03)
    parser.add_argument("--gamma-decay-windows", type=float, default=5.0)
    parser.add_argument("--max-bias", type=float, default=0.5)
    parser.add_argument("--max-windows", type=int, default=60, help="window budget of adapt and the eplb modes")
    parser.add_argument("--exact-windows", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=list(MODE_SETTINGS), choices=list(MODE_SETTINGS))
    parser.add_argument("--redundant-slots", type=int, default=16, help="eplb: extra copies per MoE layer")
    parser.add_argument("--eplb-min-gain", type=float, default=0.05)
    parser.add_argument("--max-changed-slots", type=float, default=0.05)
    parser.add_argument("--cpus-per-group", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "balance.json")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        make_model("small-v3", args.model)
    if args.backend != "local":
        import ray

        ray.init(num_cpus=max(os.cpu_count() or 1, args.devices + 2), include_dashboard=False, log_to_driver=False)
    result = run(args)
    meta = {
        "benchmark": "balance",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": args.backend,
        "devices": args.devices,
        "window_tokens": args.window_tokens,
        "gamma": args.gamma,
        "gamma_decay_windows": args.gamma_decay_windows,
        "max_bias": args.max_bias,
        "redundant_slots": args.redundant_slots,
        "model": str(args.model),
    }
    args.json.write_text(json.dumps({**meta, **result}, indent=1))
    print(f"wrote {args.json}")
    print_summary(result, args)  # its last line sums up EPLB


if __name__ == "__main__":
    main()
