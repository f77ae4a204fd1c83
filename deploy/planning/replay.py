"""The planner's replay: routed tokens cut into batches and sent through the dispatcher's own plan, counted per
device, per step and per byte exactly as serving counts them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deploy.planning.cost_model import LayerTraffic, Workload
from deploy.planning.routing_sources import RoutingSource
from gateway.dispatch.dispatcher import batch_bytes, host_tables, plan_dispatch
from model_core.spec import ModelSpec
from router_service.accounting import compare_routing
from router_service.eplb import plan_placement
from router_service.placement import Placement

# Shape legend: T = replayed tokens, K = experts per token, E = routed experts, L = MoE layers, D = devices,
# G = gateways, S = steps, M = top-M devices.


def build_placement(spec: ModelSpec, loads: torch.Tensor, n_devices: int, redundant: int) -> Placement:
    """Contiguous without redundant slots; with R > 0, the EPLB plan for `loads` (every MoE layer its own layout)."""
    if redundant == 0:
        return Placement.contiguous(spec.n_routed_experts, n_devices)
    plan = plan_placement(loads, n_devices, redundant, moe_layers=spec.moe_layers)
    return plan.to_placement(spec.moe_layers)


@dataclass
class Replay:
    """What the dispatch plans of a replay sent: exact totals over every token, and per-step traffic to price."""

    tokens_per_device: torch.Tensor  # [L, D] token rows sent to each device, over every replayed token
    bytes_sent: int  # hidden rows + ids + weights, over every layer and token (DispatchStats.bytes_sent)
    bytes_received: int  # partial sums back (DispatchStats.bytes_received)
    calls: int  # device batches (one message each way); depends on how tokens are batched
    n_tokens: int  # tokens replayed per MoE layer
    changed_tokens: int  # (token, layer) pairs whose experts the top-M limit changed
    steps: list[list[LayerTraffic]]  # [S][L] for the full steps only (G batches of `batch` tokens)


def replay(spec: ModelSpec, source: RoutingSource, placement: Placement, top_m: int | None,
           work: Workload) -> Replay:
    """Route every layer's tokens (with top-M when given), cut them into batches of `work.batch` tokens (G
    consecutive batches form a step, batch g from gateway g), and run `plan_dispatch` on each batch with the
    placement's `host_tables`, as the dispatcher does; bytes by `batch_bytes`, top-M changes by `compare_routing`,
    as serving counts them. Tokens per device and bytes are sums over tokens,
    so they do not depend on the batching; with redundant copies, which copy serves a pair does (round-robin
    within a batch), and so does the number of calls."""
    n_devices, n_experts, top_k, hidden = placement.n_devices, spec.n_routed_experts, spec.top_k, spec.hidden_size
    t, b, g = source.n_tokens, work.batch, work.gateways
    n_steps = t // (b * g)
    if n_steps == 0:
        raise ValueError(f"--batch {b} x --gateways {g} = {b * g} tokens per step: more than the {t} replayed "
                         "tokens; lower --batch or replay more tokens")
    expert_device, hosts = host_tables(placement)  # the Dispatcher's tables for this placement
    totals = torch.zeros(len(source.layers), n_devices, dtype=torch.long)
    sent = received = calls = changed = 0
    per_layer: list[list[LayerTraffic]] = []
    for j, layer in enumerate(source.layers):
        members = placement.members(layer) if top_m is not None else None
        ids, weights, token_devices = source.route(j, members, top_m)
        if top_m is not None:  # compared as serving compares them (the replay applies no live bias)
            changed += compare_routing(ids, source.route(j)[0], None, top_m_applied=True, bias_applied=False).tokens
        table = hosts.get(layer, expert_device)
        tokens = torch.zeros(n_steps, n_devices, dtype=torch.long)
        pairs = torch.zeros(n_steps, n_devices, dtype=torch.long)
        hits = torch.zeros(n_steps, n_devices, dtype=torch.long)
        hit = torch.zeros(n_devices, n_experts, dtype=torch.bool)  # the current step's experts read per device
        first_pairs = torch.zeros(n_steps, n_devices, dtype=torch.long)  # gateway 0's part (local_step.py)
        first_hits = torch.zeros(n_steps, n_devices, dtype=torch.long)
        rest_hits = torch.zeros(n_steps, n_devices, dtype=torch.long)
        hit_first = torch.zeros(n_devices, n_experts, dtype=torch.bool)
        hit_rest = torch.zeros(n_devices, n_experts, dtype=torch.bool)
        out = torch.zeros(n_steps, g, n_devices, dtype=torch.long)
        back = torch.zeros(n_steps, g, n_devices, dtype=torch.long)
        for i, start in enumerate(range(0, t, b)):
            rows = slice(start, start + b)
            td = token_devices[rows] if token_devices is not None else None
            step, gw = divmod(i, g)
            for batch in plan_dispatch(ids[rows], weights[rows], table, n_devices, td):
                n = int(batch.rows.numel())
                nbytes_out, nbytes_back = batch_bytes(n, top_k, hidden, work.dtype_bytes, batch.ids.element_size())
                totals[j, batch.device] += n
                sent, received, calls = sent + nbytes_out, received + nbytes_back, calls + 1
                if step < n_steps:
                    here = batch.ids[batch.ids >= 0]
                    tokens[step, batch.device] += n
                    pairs[step, batch.device] += here.numel()
                    hit[batch.device, here] = True
                    if gw == 0:
                        first_pairs[step, batch.device] += here.numel()
                        hit_first[batch.device, here] = True
                    else:
                        hit_rest[batch.device, here] = True
                    out[step, gw, batch.device] = nbytes_out
                    back[step, gw, batch.device] = nbytes_back
            if gw == g - 1 and step < n_steps:  # the step's last batch
                hits[step] = hit.sum(dim=-1)
                first_hits[step], rest_hits[step] = hit_first.sum(dim=-1), hit_rest.sum(dim=-1)
                for h in (hit, hit_first, hit_rest):
                    h.zero_()
        per_layer.append([LayerTraffic(tokens[s], pairs[s], hits[s], out[s], back[s], first_pairs[s], first_hits[s],
                                       rest_hits[s]) for s in range(n_steps)])
    steps = [[per_layer[j][s] for j in range(len(source.layers))] for s in range(n_steps)]
    return Replay(totals, sent, received, calls, t, changed, steps)

