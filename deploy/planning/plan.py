"""`expertmesh plan`: every candidate deployment (D devices, top-M, R redundant slots) replayed through the
project's own routing, placement and dispatch-plan code (replay.py), priced with the cost model and its memory per
GPU counted (memory.py); the printed table, the JSON report and the plot."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

from deploy.planning.cost_model import Workload, gateway_moe_seconds, step_cost, tokens_per_s_per_gpu
from deploy.planning.hardware import Hardware
from deploy.planning.local_step import LocalPricing, gateway_step_seconds, local_step_cost, pricing_label
from deploy.planning.memory import DTYPES, MemoryBudget, layout_memory
from deploy.planning.replay import Replay, build_placement, replay
from deploy.planning.routing_sources import RoutingSource, expert_loads
from model_core.spec import ModelSpec


@dataclass
class PlanRow:
    """One candidate deployment: D devices, top-M, R redundant slots; predictions per MoE layer are means over
    the replayed steps and layers. `skipped` says why a combination has no numbers."""

    devices: int
    top_m: int | None
    redundant: int
    gpus: int = 0  # D expert GPUs + G gateway GPUs
    skipped: str | None = None
    tokens_per_device_max: float = 0.0  # per layer and step: the busiest device's token rows
    tokens_per_device_mean: float = 0.0
    dispatch_bytes_per_token: float = 0.0  # per token per MoE layer, out to the devices
    combine_bytes_per_token: float = 0.0  # per token per MoE layer, back
    intra_node_bytes_per_token: float = 0.0  # dispatch + combine over NVLink
    inter_node_bytes_per_token: float = 0.0  # dispatch + combine over InfiniBand
    expert_us: float = 0.0  # per layer: the slowest device's routed-expert time
    comm_us: float = 0.0  # per layer: dispatch + combine
    gateway_us: float = 0.0  # per layer: attention + router + shared experts on a gateway (roofline pricing)
    gateway_step_ms: float = 0.0  # a gateway's own step, all but the routed experts (calibrated or roofline)
    step_ms_serial: float = 0.0
    step_ms_overlapped: float = 0.0
    floor_ms: float = 0.0  # calibrated pricing: the least a step lasts, all its CPU work over the cores
    tokens_per_s_per_gpu_serial: float = 0.0
    tokens_per_s_per_gpu_overlapped: float = 0.0
    changed_by_top_m: float = 0.0  # share of (token, layer) pairs whose experts the device limit changed
    exact: dict | None = None  # totals over every replayed token: tokens per device per layer, bytes, calls
    pricing: str = ""  # how the step was priced (local_step.pricing_label)
    # Memory per GPU (memory.py): the busiest expert GPU's routed experts (over all MoE layers, copies included) and
    # their bytes in each expert dtype; a gateway GPU's weights + latent cache; whether both fit (None: unknown).
    experts_per_gpu: int = 0
    expert_gpu_bytes_bf16: int = 0
    expert_gpu_bytes_fp8: int = 0
    gateway_gpu_bytes: int = 0
    fits_bf16: bool | None = None
    fits_fp8: bool | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def price(spec: ModelSpec, hw: Hardware, work: Workload, row: PlanRow, result: Replay,
          pricing: LocalPricing | None = None) -> PlanRow:
    """Fill a row's predictions from a replay: at link rates and rooflines, or with `pricing`, from the hardware
    file's calibrated rates on the machine at hand (local_step.py)."""
    n_layers, n_steps = len(result.steps[0]), len(result.steps)
    if pricing is None:
        costs = [step_cost(step, spec, hw, work) for step in result.steps]
        gateway_step_s = costs[0].other_s + sum(c.gateway_s for c in costs[0].layers)
    else:
        costs = [local_step_cost(step, spec, hw, work, pricing) for step in result.steps]
        gateway_step_s = gateway_step_seconds(spec, hw, work)
    layer_costs = [c for cost in costs for c in cost.layers]
    traffic = [t for step in result.steps for t in step]
    per_layer_tokens = n_steps * n_layers * work.tokens_per_step
    serial = sum(c.serial_s for c in costs) / n_steps
    overlapped = sum(c.overlapped_s for c in costs) / n_steps
    return dataclasses.replace(
        row,
        gpus=row.devices + work.gateways,
        tokens_per_device_max=sum(float(t.tokens.max()) for t in traffic) / len(traffic),
        tokens_per_device_mean=sum(float(t.tokens.double().mean()) for t in traffic) / len(traffic),
        dispatch_bytes_per_token=sum(int(t.bytes_out.sum()) for t in traffic) / per_layer_tokens,
        combine_bytes_per_token=sum(int(t.bytes_back.sum()) for t in traffic) / per_layer_tokens,
        intra_node_bytes_per_token=sum(c.bytes_intra for c in layer_costs) / per_layer_tokens,
        inter_node_bytes_per_token=sum(c.bytes_inter for c in layer_costs) / per_layer_tokens,
        expert_us=1e6 * sum(c.expert_s for c in layer_costs) / len(layer_costs),
        comm_us=1e6 * sum(c.dispatch_s + c.combine_s for c in layer_costs) / len(layer_costs),
        gateway_us=1e6 * gateway_moe_seconds(spec, hw, work) if pricing is None else 0.0,
        gateway_step_ms=1e3 * gateway_step_s,
        step_ms_serial=1e3 * serial,
        step_ms_overlapped=1e3 * overlapped,
        floor_ms=1e3 * sum(c.floor_s for c in costs) / n_steps,
        tokens_per_s_per_gpu_serial=tokens_per_s_per_gpu(serial, work, row.devices),
        tokens_per_s_per_gpu_overlapped=tokens_per_s_per_gpu(overlapped, work, row.devices),
        changed_by_top_m=result.changed_tokens / (result.n_tokens * n_layers),
        exact={"layers": list(spec.moe_layers), "tokens_per_device": result.tokens_per_device.tolist(),
               "bytes_sent": result.bytes_sent, "bytes_received": result.bytes_received, "calls": result.calls},
        pricing=pricing_label(hw, pricing),
    )


def plan(spec: ModelSpec, source: RoutingSource, hw: Hardware, devices: list[int],
         top_ms: list[int | None], redundants: list[int], work: Workload,
         pricing: LocalPricing | None = None, budget: MemoryBudget | None = None) -> list[PlanRow]:
    """Every combination of D, top-M and R, in that order; impossible ones are rows with `skipped` set. `pricing`:
    as for `price`; `budget`: the memory each GPU may fill (default: the hardware file's memory_gb, 90 %)."""
    budget = budget or MemoryBudget(hw.memory_gb)
    loads = expert_loads(source) if any(r > 0 for r in redundants) else None
    rows = []
    for n_devices in devices:
        for redundant in redundants:
            try:
                placement = build_placement(spec, loads, n_devices, redundant)
            except ValueError as exc:
                rows += [PlanRow(n_devices, m, redundant, skipped=str(exc)) for m in top_ms]
                continue
            memory = layout_memory(spec, placement, budget, work)
            for top_m in top_ms:
                row = PlanRow(n_devices, top_m, redundant, **memory)
                try:
                    placement.check_top_m(spec.top_k, top_m)
                except ValueError as exc:
                    rows.append(dataclasses.replace(row, skipped=str(exc)))
                    continue
                rows.append(price(spec, hw, work, row, replay(spec, source, placement, top_m, work), pricing))
    return rows


def format_table(rows: list[PlanRow]) -> str:
    """The printed table: one line per combination (per-layer values are means over steps and MoE layers)."""
    head = (f"{'D':>4} {'M':>4} {'R':>3} {'GPUs':>4} {'tok/dev max':>11} {'mean':>6} {'KB/tok/layer':>12} "
            f"{'intra':>6} {'inter':>6} {'expert us':>9} {'comm us':>8} {'gw us':>6} {'gw ms':>7} {'step ms':>8} "
            f"{'overlap':>8} {'tok/s/GPU':>9} {'overlap':>8} {'top-M chg':>9} {'exp GB bf16':>11} {'fp8':>6} "
            f"{'gw GB':>6} {'fits bf16/fp8':>13}")
    lines = [head]
    for r in rows:
        m = "none" if r.top_m is None else str(r.top_m)
        if r.skipped:
            lines.append(f"{r.devices:>4} {m:>4} {r.redundant:>3}  skipped: {r.skipped}")
            continue
        gw_us = f"{r.gateway_us:.1f}" if r.gateway_us else "-"
        kb = (r.dispatch_bytes_per_token + r.combine_bytes_per_token) / 1e3
        lines.append(
            f"{r.devices:>4} {m:>4} {r.redundant:>3} {r.gpus:>4} {r.tokens_per_device_max:>11.1f} "
            f"{r.tokens_per_device_mean:>6.1f} {kb:>12.1f} {r.intra_node_bytes_per_token / 1e3:>6.1f} "
            f"{r.inter_node_bytes_per_token / 1e3:>6.1f} {r.expert_us:>9.1f} {r.comm_us:>8.1f} {gw_us:>6} "
            f"{r.gateway_step_ms:>7.2f} {r.step_ms_serial:>8.2f} {r.step_ms_overlapped:>8.2f} "
            f"{r.tokens_per_s_per_gpu_serial:>9.1f} {r.tokens_per_s_per_gpu_overlapped:>8.1f} "
            f"{100 * r.changed_by_top_m:>8.1f}% {r.expert_gpu_bytes_bf16 / 1e9:>11.1f} "
            f"{r.expert_gpu_bytes_fp8 / 1e9:>6.1f} {r.gateway_gpu_bytes / 1e9:>6.1f} "
            f"{_mark(r.fits_bf16) + '/' + _mark(r.fits_fp8):>13}")
    return "\n".join(lines)


def _mark(fits: bool | None) -> str:
    return "?" if fits is None else "yes" if fits else "no"


def smallest_planned(rows: list[PlanRow], node_size: int) -> dict[str, dict | None]:
    """Per expert dtype, the planned layout that fits on the fewest nodes of `node_size` GPUs (D + G GPUs each),
    fewest GPUs next; None where no row fits (or the memory is unknown)."""
    out: dict[str, dict | None] = {}
    for dtype in DTYPES:
        fitting = [r for r in rows if not r.skipped and getattr(r, f"fits_{dtype}")]
        best = min(fitting, key=lambda r: (math.ceil(r.gpus / node_size), r.gpus), default=None)
        out[dtype] = None if best is None else {
            "devices": best.devices, "redundant": best.redundant, "gpus": best.gpus,
            "nodes": math.ceil(best.gpus / node_size), "gpu_bytes": getattr(best, f"expert_gpu_bytes_{dtype}")}
    return out


def describe(model: str, spec: ModelSpec, source: RoutingSource, hw: Hardware,
             work: Workload, pricing: LocalPricing | None = None) -> str:
    """The line printed above the table: what was replayed, on what, at what load, priced how."""
    return (f"plan {model}: {len(spec.moe_layers)} MoE layers, {spec.n_routed_experts} experts, top-{spec.top_k}; "
            f"{source.source}; hardware {hw.name} ({hw.gpus_per_node} GPUs/node); {work.gateways} gateway(s) x "
            f"batch {work.batch}, context {work.context}, {work.dtype_bytes}-byte values; priced by "
            f"{pricing_label(hw, pricing)}")


def report(model: str, source: RoutingSource, hw: Hardware, work: Workload,
           rows: list[PlanRow], memory: dict | None = None) -> dict:
    """What --json writes (`memory`: memory.memory_summary)."""
    return {"model": model, "routing": source.source, "hardware": hw.to_dict(), "workload": dataclasses.asdict(work),
            "rows": [r.to_dict() for r in rows], "memory": memory}


def write_png(rows: list[PlanRow], path: str | Path, title: str) -> Path:
    """Tokens/s per GPU and step time against D, one line per (top-M, R)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--png needs matplotlib: pip install matplotlib") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r.top_m or 0, r.redundant) for r in rows})
    for m, redundant in keys:
        line = [r for r in rows if (r.top_m or 0) == m and r.redundant == redundant and not r.skipped]
        if not line:
            continue
        label = f"top-M {'none' if m == 0 else m}, R={redundant}"
        xs = [r.devices for r in line]
        left.plot(xs, [r.tokens_per_s_per_gpu_overlapped for r in line], marker="o", label=label)
        right.plot(xs, [r.step_ms_overlapped for r in line], marker="o", label=label)
    ticks = sorted({r.devices for r in rows})
    for ax, ylabel in ((left, "output tokens/s per GPU (overlap)"), (right, "decode step ms (overlap)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(d) for d in ticks])
        ax.set_xlabel("expert devices D")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
