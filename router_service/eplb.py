"""EPLB placement planner: give hot experts redundant copies and pack all copies so that device load evens out.

A pure function of the observed load (DeepSeek's EPLB, written here from its description): replicate, then pack,
optionally inside nodes first. Each (token, expert) pair is served by exactly one copy and an expert's tokens are split
evenly among its copies, so the model's answers do not change; only where the work lands does.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from router_service.load_stats import max_over_mean
from router_service.placement import Placement, PlacementError

# Shape legend: L = MoE layers, E = routed (logical) experts, D = devices, R = redundant slots (physical slots per
# layer P = E + R), G = expert groups (the model's n_group), N = nodes.


@dataclass(frozen=True)
class EplbPlan:
    """Which experts each device hosts in each MoE layer, and the device balance predicted before and after."""

    layers: tuple[tuple[tuple[int, ...], ...], ...]  # layers[l][d] = expert ids device d hosts, ascending, no repeats
    predicted_max_over_mean: tuple[float, ...]  # [L] max/mean device load with this plan
    current_max_over_mean: tuple[float, ...]  # [L] the same with the current placement
    redundant_slots: int  # R: physical slots per layer = E + R

    @property
    def worst_predicted(self) -> float:
        return max(self.predicted_max_over_mean)

    @property
    def worst_current(self) -> float:
        return max(self.current_max_over_mean)

    def copies(self, layer: int) -> list[int]:
        """[E] number of devices hosting each expert in `layer`."""
        devices = self.layers[layer]
        return _count_copies(devices, 1 + max(e for experts in devices for e in experts))

    def to_placement(self, moe_layers: Sequence[int], base: Placement | None = None, version: int = 0) -> Placement:
        """The plan as a Placement: plan layer l is MoE layer moe_layers[l]; the base map (layers the plan does not
        cover) is `base`'s, contiguous if None."""
        if len(moe_layers) != len(self.layers):
            raise ValueError(f"moe_layers: {len(moe_layers)} layers for a plan of {len(self.layers)}")
        n_experts = 1 + max(e for devices in self.layers for experts in devices for e in experts)
        base = base or Placement.contiguous(n_experts, len(self.layers[0]))
        return Placement(base.expert_device, base.n_devices, tuple(zip(moe_layers, self.layers, strict=True)),
                         version)

    def to_dict(self) -> dict:
        return {
            "redundant_slots": self.redundant_slots,
            "layers": [[list(experts) for experts in devices] for devices in self.layers],
            "predicted_max_over_mean": list(self.predicted_max_over_mean),
            "current_max_over_mean": list(self.current_max_over_mean),
        }


def plan_placement(
    loads: torch.Tensor | Sequence,
    n_devices: int,
    redundant_slots: int,
    *,
    current: Placement | list[list[int]] | None = None,
    expert_groups: int | None = None,
    nodes: int | None = None,
    moe_layers: Sequence[int] | None = None,
) -> EplbPlan:
    """Plan E + R physical expert slots per layer over D devices.

    loads: [L, E] (or [E], one layer) tokens routed to each logical expert, non-negative. An expert with load w and
    c copies is predicted to put w / c on each device hosting a copy. current: the placement now (device lists, each
    expert once), contiguous if None. With expert_groups and nodes, whole expert groups go to nodes first and each node
    is planned on its own devices (node n owns devices [n·D/N, (n+1)·D/N)) with its share of R. moe_layers: the MoE
    layer of each row of loads, to read a current placement's per-layer layouts (copies split their load too).

    A greedy heuristic, not an optimum: with few experts per device it can predict worse than the current placement,
    and a redundant-slot count that leaves uneven slots per device (R % D != 0) can predict worse than fewer slots on
    nearly even loads. Compare worst_predicted with worst_current before applying a plan.
    """
    w = _check_loads(loads)  # [L, E]
    n_layers, n_experts = w.shape
    _check_int("n_devices", n_devices, 1, n_experts, f"(loads has E={n_experts} experts)")
    _check_int("redundant_slots", redundant_slots, 0)
    limit = n_experts * (n_devices - 1)
    if redundant_slots > limit:
        raise ValueError(
            f"redundant_slots={redundant_slots}: expected at most E*(D-1)={limit} (each expert at most once per device)"
        )
    if current is None:
        current = Placement.contiguous(n_experts, n_devices)
    elif not isinstance(current, Placement):
        try:
            current = Placement.from_device_lists(current, n_experts)
        except PlacementError as exc:
            raise ValueError(f"current: {exc}") from None
    if current.n_devices != n_devices or current.n_experts != n_experts:
        raise ValueError(
            f"current: {current.n_devices} devices for {current.n_experts} experts, "
            f"expected n_devices={n_devices} for E={n_experts}"
        )
    if (expert_groups is None) != (nodes is None):
        raise ValueError(f"expert_groups={expert_groups!r}, nodes={nodes!r}: expected both or neither")
    if nodes is not None:
        _check_hierarchy(n_experts, n_devices, redundant_slots, expert_groups, nodes)

    rows = w.tolist()
    layers = []
    for layer_loads in rows:
        if nodes is None:
            devices = _plan_devices(layer_loads, n_devices, redundant_slots)
        else:
            devices = _plan_nodes(layer_loads, n_devices, redundant_slots, expert_groups, nodes)
        layers.append(tuple(tuple(sorted(experts)) for experts in devices))

    predicted = torch.zeros(n_layers, n_devices, dtype=torch.float64)  # [L, D]
    for l, devices in enumerate(layers):
        copies = _count_copies(devices, n_experts)
        for d, experts in enumerate(devices):
            predicted[l, d] = sum(rows[l][e] / copies[e] for e in experts)
    if moe_layers is not None and len(moe_layers) != n_layers:
        raise ValueError(f"moe_layers: {len(moe_layers)} layers for loads of {n_layers}")
    now = torch.zeros(n_layers, n_devices, dtype=torch.float64)  # [L, D]
    for l in range(n_layers):
        devices = current.layout(moe_layers[l] if moe_layers is not None else None)
        copies = _count_copies(devices, n_experts)
        for d, experts in enumerate(devices):
            now[l, d] = sum(rows[l][e] / copies[e] for e in experts)
    return EplbPlan(
        layers=tuple(layers),
        predicted_max_over_mean=tuple(_balance(row) for row in predicted),
        current_max_over_mean=tuple(_balance(row) for row in now),
        redundant_slots=redundant_slots,
    )


def _count_copies(devices: Sequence[Sequence[int]], n_experts: int) -> list[int]:
    counts = [0] * n_experts
    for experts in devices:
        for e in experts:
            counts[e] += 1
    return counts


def _balance(device_load: torch.Tensor) -> float:
    """max/mean device load, 1.0 (perfectly even) when nothing was routed."""
    return max_over_mean(device_load) if float(device_load.sum()) > 0 else 1.0


def _plan_devices(loads: list[float], n_devices: int, redundant: int) -> list[list[int]]:
    """One layer (or one node's share of it): device lists of local expert ids."""
    return _pack(loads, _replicate(loads, n_devices, redundant), n_devices)


def _replicate(loads: list[float], n_devices: int, redundant: int) -> list[int]:
    """Copies per expert: each extra copy goes to the highest load per copy (ties: lower id), at most D copies."""
    copies = [1] * len(loads)
    heap = [(-w, e) for e, w in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(redundant):  # never runs dry: the caller checked R <= E·(D-1)
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < n_devices:
            heapq.heappush(heap, (-loads[e] / copies[e], e))
    return copies


def _pack(loads: list[float], copies: list[int], n_devices: int) -> list[list[int]]:
    """Greedy packing: heaviest copy first onto the least-loaded device with a free slot that lacks the expert.

    Slots per device are P // D, plus one on the first P % D devices. The greedy can corner itself only when every
    device with a free slot already hosts the expert; `_swap_in` then always finds a move (see its docstring).
    """
    n_slots = sum(copies)
    free = [n_slots // n_devices + (d < n_slots % n_devices) for d in range(n_devices)]
    device_load = [0.0] * n_devices
    hosted: list[list[int]] = [[] for _ in range(n_devices)]
    open_devices = [(0.0, d) for d in range(n_devices)]  # (load, d): free slots and, while placing e, no copy of e
    per_copy = [w / c for w, c in zip(loads, copies, strict=True)]
    for e in sorted(range(len(loads)), key=lambda e: (-per_copy[e], e)):
        holding_e: list[int] = []  # devices that got a copy of e and still have a free slot
        for _ in range(copies[e]):
            if open_devices:
                _, d = heapq.heappop(open_devices)
            else:
                d = _swap_in(e, holding_e, hosted, device_load, free, per_copy)
            hosted[d].append(e)
            device_load[d] += per_copy[e]
            free[d] -= 1
            if free[d] > 0:
                holding_e.append(d)
        for d in holding_e:
            if free[d] > 0:
                heapq.heappush(open_devices, (device_load[d], d))
    return hosted


def _swap_in(
    e: int,
    holding_e: list[int],
    hosted: list[list[int]],
    device_load: list[float],
    free: list[int],
    per_copy: list[float],
) -> int:
    """Free a slot for expert e on a device without it: move some expert x from there to a device holding e.

    Always possible: a device A with a free slot exists (free slots = copies left) and hosts e (else it would be open);
    a device B without e exists (e has fewer than D copies so far) and is full. A holds fewer than its slots, which are
    at most B's slots + 1 = B's count + 1, so A holds at most B's count - 1 experts besides e: some x on B is not on A.
    """
    a = min((d for d in holding_e if free[d] > 0), key=lambda d: (device_load[d], d), default=None)
    without_e = [d for d in range(len(hosted)) if e not in hosted[d]]
    b = min(without_e, key=lambda d: (device_load[d], d), default=None)
    if a is None or b is None:
        raise RuntimeError(f"packing expert {e}: no device can take a copy (a bug: R <= E*(D-1) should prevent this)")
    movable = [x for x in hosted[b] if x not in hosted[a]]
    if not movable:
        raise RuntimeError(f"packing expert {e}: device {b} has nothing to move to device {a} (a bug)")
    x = min(movable, key=lambda x: (per_copy[x], x))
    hosted[b].remove(x)
    hosted[a].append(x)
    device_load[b] -= per_copy[x]
    device_load[a] += per_copy[x]
    free[a] -= 1
    free[b] += 1  # taken again by e at once
    return b


def _plan_nodes(loads: list[float], n_devices: int, redundant: int, n_groups: int, nodes: int) -> list[list[int]]:
    """Hierarchical: whole expert groups onto nodes (heaviest group to the least-loaded node with room), then each
    node's experts over its own devices with its share of the redundant slots."""
    group_size = len(loads) // n_groups
    group_load = [sum(loads[g * group_size : (g + 1) * group_size]) for g in range(n_groups)]
    node_load = [0.0] * nodes
    node_groups: list[list[int]] = [[] for _ in range(nodes)]
    for g in sorted(range(n_groups), key=lambda g: (-group_load[g], g)):
        n = min((n for n in range(nodes) if len(node_groups[n]) < n_groups // nodes), key=lambda n: (node_load[n], n))
        node_groups[n].append(g)
        node_load[n] += group_load[g]
    devices: list[list[int]] = []
    for n, groups in enumerate(node_groups):
        experts = [e for g in sorted(groups) for e in range(g * group_size, (g + 1) * group_size)]
        share = redundant // nodes + (n < redundant % nodes)
        local = _plan_devices([loads[e] for e in experts], n_devices // nodes, share)
        devices.extend([experts[i] for i in local_experts] for local_experts in local)
    return devices


def _check_loads(loads: torch.Tensor | Sequence) -> torch.Tensor:
    try:
        w = torch.as_tensor(loads, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"loads: expected an [L, E] or [E] array of numbers ({exc})") from None
    shape = list(w.shape)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"loads has shape {shape}: expected [L, E] with L, E >= 1, or [E]")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("loads: expected finite values >= 0 (tokens routed to each expert)")
    return w


def _check_int(name: str, value: object, low: int, high: int | None = None, why: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        expected = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise ValueError(f"{name}={value!r}: expected {expected}" + (f" {why}" if why else ""))


def _check_hierarchy(n_experts: int, n_devices: int, redundant: int, n_groups: object, nodes: object) -> None:
    _check_int("expert_groups", n_groups, 1)
    _check_int("nodes", nodes, 1)
    if n_experts % n_groups:
        raise ValueError(f"expert_groups={n_groups}: expected a divisor of E={n_experts}")
    if n_devices % nodes:
        raise ValueError(f"nodes={nodes}: expected a divisor of n_devices={n_devices}")
    if n_groups % nodes:
        raise ValueError(f"nodes={nodes}: expected a divisor of expert_groups={n_groups}")
    experts, devices = n_experts // nodes, n_devices // nodes
    if redundant > nodes * experts * (devices - 1):  # the fullest node gets ceil(R / N) of them
        raise ValueError(
            f"redundant_slots={redundant}: expected at most {nodes * experts * (devices - 1)} with nodes={nodes} "
            f"(a node's {experts} experts, each at most once on each of its {devices} devices)"
        )
