"""Benchmark: live aux-loss-free balancing under skewed traffic (small-v3, Ray backend by default).

Skewed traffic: random sequences over a narrow "topic" of 32 token ids, the ones whose routing leans most
toward one device. The placement is one a deployment could have made for other traffic: the experts this
topic uses most sit together on device 0 (written to the results folder). Under the model's exact routing
that device carries ≥ 2.5× the mean load in some layer. The script then runs the same traffic with the
router service in `adapt` mode, one window per row, until expert and device max/mean are ≤ 1.3 in every
MoE layer, and prints the before/after table with the fidelity price (share of tokens whose experts differ
from the model's own routing).

    python benchmarks/balance.py [--backend ray] [--max-windows 60] [--json PATH]
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

TARGET = 1.3
SKEW = 2.5


@torch.inference_mode()
def routed_ids(engine: Engine, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """One prefill of `tokens` ([n]) outside the engine's accounting: {layer: ids [n, K]}."""
    cache = engine.model.new_cache()
    cache.allocate(0, tokens.numel())
    _, routings = engine.model.forward(tokens, StepBatch([0], [0], [tokens.numel()]), cache)
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


def worst(reports: list[dict]) -> tuple[float, float]:
    return max(r["expert_max_over_mean"] for r in reports), max(r["device_max_over_mean"] for r in reports)


def run(args: argparse.Namespace) -> dict:
    topic, placement = skewed_setup(args.model, args.devices, args.dtype, args.topic_size, args.seed)
    placement_file = args.json.parent / "balance_placement.json"
    placement_file.parent.mkdir(parents=True, exist_ok=True)
    placement_file.write_text(placement.to_json())

    def deployment(mode: str) -> DeploymentConfig:
        return DeploymentConfig(
            model=str(args.model),
            dtype=args.dtype,
            backend=args.backend,
            devices=args.devices,
            placement=str(placement_file),
            ray=RayConfig(cpus_per_group=args.cpus_per_group),
            balancing=BalanceConfig(
                mode=mode,
                gamma=args.gamma,
                gamma_decay_windows=args.gamma_decay_windows,
                max_bias=args.max_bias,
                window_tokens=args.window_tokens,
                name=f"balance-bench-{uuid.uuid4().hex[:6]}",
            ),
        )

    gen = torch.Generator().manual_seed(args.seed + 1)
    with Engine.from_config(deployment("observe")) as engine:
        engine.logits(traffic(topic, args.window_tokens, gen))
        before = engine.balance_stats()["last_window"]
    skewed_layers = [r["layer"] for r in before if r["device_max_over_mean"] >= SKEW]
    rows = []
    with Engine.from_config(deployment("adapt")) as engine:
        converged_at = None
        for window in range(1, args.max_windows + 1):
            t0 = time.perf_counter()
            engine.logits(traffic(topic, args.window_tokens, gen))
            stats = engine.balance_stats()
            reports = stats["last_window"]
            expert_worst, device_worst = worst(reports)
            rows.append(
                {
                    "window": window,
                    "bias_version": stats["version"],
                    "expert_max_over_mean": expert_worst,
                    "device_max_over_mean": device_worst,
                    "changed_share": max(r["changed_share"] for r in reports),
                    "changed_slot_share": max(r["changed_slot_share"] for r in reports),
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(
                f"window {window:>3}: worst expert max/mean {expert_worst:5.2f}, worst device max/mean "
                f"{device_worst:5.2f}, tokens changed {rows[-1]['changed_share']:.0%}, expert slots changed "
                f"{rows[-1]['changed_slot_share']:.0%}",
                flush=True,
            )
            if expert_worst <= TARGET and device_worst <= TARGET:
                converged_at = window
                break
        after = reports
    return {
        "before": before,
        "after": after,
        "windows": rows,
        "converged_at": converged_at,
        "skewed_layers": skewed_layers,
        "topic_tokens": topic.tolist(),
        "placement": json.loads(placement.to_json()),
    }


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
    parser.add_argument("--max-windows", type=int, default=60)
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
    print("\nbefore (exact routing, observe mode):")
    print(report_table(result["before"]))
    print(
        f"\nafter {len(result['windows'])} adapt windows of {args.window_tokens} tokens "
        f"(γ={args.gamma}, decaying as γ/(1 + w/{args.gamma_decay_windows}), max_bias={args.max_bias}):"
    )
    print(report_table(result["after"]))
    print(f"\nlayers with a device at ≥ {SKEW}× mean load under exact routing: {result['skewed_layers']}")
    verdict = (
        f"converged (≤ {TARGET}) after {result['converged_at']} windows"
        if result["converged_at"]
        else f"NOT converged to ≤ {TARGET} within {args.max_windows} windows"
    )
    print(verdict)
    meta = {
        "benchmark": "balance",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": args.backend,
        "devices": args.devices,
        "window_tokens": args.window_tokens,
        "gamma": args.gamma,
        "gamma_decay_windows": args.gamma_decay_windows,
        "max_bias": args.max_bias,
        "model": str(args.model),
    }
    args.json.write_text(json.dumps({**meta, **result}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
