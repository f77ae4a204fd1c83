"""The `expertmesh plan` subcommand: its arguments, and the handler that replays, prices and prints (or calibrates)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from model_core.compute_choices import MODEL_DTYPES

if TYPE_CHECKING:  # the handlers import the planner when they run: `expertmesh --help` stays light
    from deploy.planning.hardware import Hardware
    from deploy.planning.local_step import LocalPricing


def _ints(flag: str, minimum: int):
    """An argparse type for a comma-separated list of integers >= minimum (`plan --devices 8,16,32`)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            values = []
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected comma-separated integers >= {minimum}")
        return values

    return parse


def _top_ms(text: str) -> list[int | None]:
    """`plan --top-m none,4` -> [None, 4]."""
    out: list[int | None] = []
    for t in (t.strip() for t in text.split(",") if t.strip()):
        if t == "none":
            out.append(None)
        elif t.isdigit() and int(t) >= 1:
            out.append(int(t))
        else:
            out = []
            break
    if not out:
        raise argparse.ArgumentTypeError(f"--top-m {text!r}: expected comma-separated 'none' or integers >= 1")
    return out


def add_parsers(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plan", help="predict per-device load, bytes and step time of candidate deployments from "
                                     "recorded or synthetic routing (docs/planning.md)")
    pl.set_defaults(handler=cmd_plan)
    pl.add_argument("--model", help="checkpoint directory, config.json file, 'deepseek-v3' or a generator preset")
    src = pl.add_mutually_exclusive_group()
    src.add_argument("--traces", type=Path, help="routing-trace directory to replay (tracing.routing_trace_dir)")
    src.add_argument("--synthetic", help="zipf:S: synthetic router scores with Zipf(S) expert popularity")
    pl.add_argument("--devices", type=_ints("--devices", 1), default=[8, 16, 32], help="expert groups D, e.g. 8,16,32")
    pl.add_argument("--top-m", type=_top_ms, default=[None], help="device limits, e.g. none,4")
    pl.add_argument("--redundant", type=_ints("--redundant", 0), default=[0],
                    help="redundant expert slots per layer (EPLB placement from the replayed load), e.g. 0,32")
    pl.add_argument("--hardware", type=Path, help="hardware rates YAML, e.g. deploy/hardware/h100.yaml")
    pl.add_argument("--node-size", type=int, help="GPUs per node (default: the hardware file's gpus_per_node)")
    pl.add_argument("--batch", type=int, default=64, help="decode tokens per step per gateway (default 64)")
    pl.add_argument("--gateways", type=int, default=1, help="gateway GPUs, each running --batch sequences")
    pl.add_argument("--context", type=int, default=4096, help="cached tokens each sequence attends over")
    pl.add_argument("--dtype", choices=MODEL_DTYPES, default="bfloat16",
                    help="weights, activations and latent cache (default bfloat16)")
    pl.add_argument("--gateway-dtype", choices=("bf16", "fp8"), default="bf16",
                    help="memory: the gateway's weights in bf16 (default) or block-wise FP8 (its projections); the "
                         "routed experts are counted in both bf16 and FP8 (docs/planning.md, Memory)")
    pl.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="memory: the share of each GPU's memory_gb weights and latent cache may fill (default 0.9, "
                         "the rest left for activations and workspaces, like vLLM's option of that name)")
    pl.add_argument("--tokens", type=int, default=4096, help="synthetic tokens per MoE layer (default 4096)")
    pl.add_argument("--seed", type=int, default=0, help="synthetic routing seed")
    pl.add_argument("--json", type=Path, dest="json_out", metavar="OUT", help="write every row as JSON to OUT")
    pl.add_argument("--png", type=Path, help="plot tokens/s per GPU and step time against D")
    pl.add_argument("--calibrate", type=Path, metavar="OUT",
                    help="measure this machine's matmul rate, memory bandwidth, each --transports backend's per-call "
                         "and per-MB cost and the expert groups' compute (a one-group deployment of --model), and "
                         "write a hardware file to OUT (link rates are copied from --hardware)")
    pl.add_argument("--transport", default="auto",
                    help="how the hop and the gateway are priced: 'links' (link rates and GPU rooflines), a backend "
                         "the hardware file has calibrated (its round trips, calibrated expert and gateway compute, "
                         "on this machine's shared cores: docs/planning.md), or 'auto' (default: 'ray' or the first "
                         "calibrated backend when the file has any, else 'links')")
    pl.add_argument("--cores", type=float, help="with calibrated pricing: the cores every gateway and group share "
                                                "(default: the file's calibrated cores, else this machine's count)")
    pl.add_argument("--merge", choices=("join", "whole"), default="join",
                    help="with calibrated pricing: how a replica merges the gateways' calls for a layer: 'join' "
                         "(default; calls join the running pass expert by expert, as a CPU replica's bf16 loop does) "
                         "or 'whole' (the first call alone, the others merged into the next pass: GPU kernels)")
    pl.add_argument("--transports", default="ray,grpc",
                    help="with --calibrate: backends to measure (comma-separated; 'none' for none)")


def cmd_plan(args: argparse.Namespace) -> int:
    from deploy.planning.hardware import Hardware

    if args.hardware is None:
        raise ValueError("--hardware: required (a rates file such as deploy/hardware/h100.yaml)")
    hardware = Hardware.from_yaml(args.hardware)
    if args.calibrate is not None:
        return _calibrate(args, hardware)
    return _plan(args, hardware)


def _plan(args: argparse.Namespace, hardware: Hardware) -> int:
    """Replay the routing on every (D, top-M, R), print the table; write the JSON and plot when asked."""
    import dataclasses

    from deploy.planning.cost_model import Workload
    from deploy.planning.memory import MemoryBudget, format_memory, memory_summary
    from deploy.planning.plan import describe, format_table, plan, report, smallest_planned, write_png
    from deploy.planning.routing_sources import SyntheticRouting, TraceRouting, load_spec, parse_synthetic

    if args.model is None:
        raise ValueError("--model: required (a checkpoint directory, config.json, or e.g. deepseek-v3)")
    if args.node_size is not None:
        hardware = dataclasses.replace(hardware, gpus_per_node=args.node_size)
    spec = load_spec(args.model)
    if args.traces is not None:
        source = TraceRouting(spec, args.traces)
    elif args.synthetic is not None:
        source = SyntheticRouting(spec, args.tokens, parse_synthetic(args.synthetic), args.seed)
    else:
        raise ValueError("--traces DIR or --synthetic zipf:S: one is required")
    work = Workload(args.batch, args.gateways, args.context, {"float32": 4}.get(args.dtype, 2))
    pricing = local_pricing(hardware, args.transport, args.cores, args.merge == "join")
    budget = MemoryBudget(hardware.memory_gb, args.gpu_memory_utilization, args.gateway_dtype)
    rows = plan(spec, source, hardware, args.devices, args.top_m, args.redundant, work, pricing, budget)
    memory = memory_summary(spec, budget, work, hardware.gpus_per_node, smallest_planned(rows, hardware.gpus_per_node))
    title = describe(args.model, spec, source, hardware, work, pricing)
    print(title)
    print(format_table(rows))
    print(format_memory(memory))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report(args.model, source, hardware, work, rows, memory)))
        print(f"wrote {args.json_out}")
    if args.png is not None:
        print(f"wrote {write_png(rows, args.png, title)}")
    return 0


def local_pricing(hardware: Hardware, transport: str, cores: float | None,
                  joining: bool = True) -> LocalPricing | None:
    """`--transport`, `--cores` and `--merge` as the planner's pricing: None for link rates, else the calibrated
    backend on `cores` (default: the file's calibrated cores, else this machine's count), calls joining one pass
    or not."""
    import os

    from deploy.planning.local_step import LocalPricing

    if transport == "auto":
        transport = "ray" if "ray" in hardware.transports else next(iter(hardware.transports), "links")
    if transport == "links":
        return None
    if transport not in hardware.transports:
        raise ValueError(f"--transport {transport!r}: {hardware.name} has no calibrated rate for it (calibrated: "
                         f"{sorted(hardware.transports) or 'none'}; 'links' prices at link rates)")
    if cores is None:
        cores = hardware.cores if hardware.cores is not None else os.cpu_count() or 1
    return LocalPricing(transport, cores, joining)


def _calibrate(args: argparse.Namespace, hardware: Hardware) -> int:
    """Measure this machine (and each --transports backend through a deployment of --model); write the file."""
    import dataclasses

    from deploy.planning.calibrate import calibrate_local, measure_machine
    from deploy.planning.hardware import hardware_yaml

    measured, where = measure_machine(hardware, args.calibrate.stem)
    transports = tuple(t for t in args.transports.split(",") if t and t != "none")
    if transports:
        if args.model is None:
            raise ValueError("--model: required to calibrate transports (a checkpoint directory to deploy)")
        rates = calibrate_local(str(args.model), args.dtype, transports)
        measured = dataclasses.replace(measured, transports=rates.transports, experts=rates.experts,
                                       gateway=rates.gateway, cores=rates.cores)
        where["transports"] = f"measured: one-group {args.model} deployments, round trips of 1-1024 rows"
        where["experts"] = f"measured: the group's compute of {args.model}'s experts, 1-64 rows per expert"
        where["gateway"] = (f"measured: {args.model} decode steps of a local deployment, 1-32 sequences, minus its "
                            "groups' compute")
        where["cores"] = ("measured: Ray workers streaming expert-sized weights together over one alone, at "
                          "calibration time")
    args.calibrate.write_text(hardware_yaml(measured, where))
    print(f"wrote {args.calibrate}: matmul {measured.matmul_tflops:g} TFLOP/s, memory "
          f"{measured.hbm_gbytes_per_s:g} GB/s" + "".join(
              f", {t}: {r.call_us:g} us per call + {r.us_per_mb:g} us per MB"
              for t, r in measured.transports.items())
          + (f", gateway step: {measured.gateway.base_us:g} us + {measured.gateway.per_token_us:g} us per token"
             if measured.gateway is not None else "") + f"; link rates copied from {args.hardware}")
    return 0
