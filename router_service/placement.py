"""Expert placement: which devices host each routed expert, per MoE layer (copies allowed), from a rule or a file.

A *logical* expert (the model's expert id) has one or more *physical* copies, each on a different device (expert
group). The base map puts every expert on exactly one device; a layer may have a layout of its own in which hot
experts have copies (redundant experts, EPLB) or experts sit elsewhere. Each (token, expert) pair is served by
exactly one copy, so where copies are never changes a token's result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model_core.yaml_file import read_yaml_mapping
from router_service.routing import check_top_m, members_of


class PlacementError(ValueError):
    """A placement leaves an expert out, repeats one on a device or names a bad device; the message says which."""


Layout = tuple[tuple[int, ...], ...]  # experts per device: layout[d] = the expert ids device d hosts


@dataclass(frozen=True)
class Placement:
    """expert_device[e] = the device hosting expert e in every MoE layer without a layout of its own;
    layers = ((layer, layout), ...) for the layers that have one (sorted by layer). version counts re-placements."""

    expert_device: tuple[int, ...]
    n_devices: int
    layers: tuple[tuple[int, Layout], ...] = ()
    version: int = 0

    def __post_init__(self) -> None:
        if self.n_devices < 1:
            raise PlacementError(f"devices={self.n_devices}: expected at least 1")
        bad = [(e, d) for e, d in enumerate(self.expert_device) if not 0 <= d < self.n_devices]
        if bad:
            raise PlacementError(f"expert {bad[0][0]} is placed on device {bad[0][1]}, outside [0, {self.n_devices})")
        empty = [d for d in range(self.n_devices) if d not in set(self.expert_device)]
        if empty:
            raise PlacementError(f"devices {empty} host no experts; use fewer devices or move experts there")
        seen = set()
        for layer, layout in self.layers:
            if layer in seen:
                raise PlacementError(f"layer {layer}: given twice")
            seen.add(layer)
            _check_layout(layer, layout, len(self.expert_device), self.n_devices)

    @classmethod
    def contiguous(cls, n_experts: int, n_devices: int) -> Placement:
        """Experts split into consecutive, near-equal runs: device d hosts [d·E/D, (d+1)·E/D)."""
        if not 1 <= n_devices <= n_experts:
            raise PlacementError(f"devices={n_devices}: expected 1..n_routed_experts={n_experts}")
        return cls(tuple(e * n_devices // n_experts for e in range(n_experts)), n_devices)

    @classmethod
    def from_device_lists(cls, devices: list[list[int]], n_experts: int,
                          layers: Mapping[int, Sequence[Sequence[int]]] | None = None,
                          moe_layers: Sequence[int] | None = None, version: int = 0) -> Placement:
        """devices[d] = the expert ids device d hosts; every expert exactly once. layers: {MoE layer: [[expert ids
        of device 0], ...]} for layers with copies or their own layout (checked against moe_layers if given)."""
        owner: dict[int, int] = {}
        for d, experts in enumerate(devices):
            if not isinstance(experts, list):
                raise PlacementError(f"devices[{d}]: expected a list of expert ids, got {experts!r}")
            for e in experts:
                if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < n_experts:
                    raise PlacementError(f"devices[{d}]: expert id {e!r} is outside [0, {n_experts})")
                if e in owner:
                    raise PlacementError(f"expert {e} is placed twice (devices {owner[e]} and {d})")
                owner[e] = d
        missing = [e for e in range(n_experts) if e not in owner]
        if missing:
            raise PlacementError(f"experts {missing[:10]} are not placed on any device")
        return cls(tuple(owner[e] for e in range(n_experts)), len(devices),
                   _layouts(layers or {}, len(devices), moe_layers), version)

    @classmethod
    def from_file(cls, path: str | Path, n_experts: int, moe_layers: Sequence[int] | None = None) -> Placement:
        """A YAML or JSON file `{devices: [[0, 1, ...], [8, 9, ...], ...]}`, optionally with
        `layers: {<MoE layer>: [[expert ids of device 0], ...]}` where experts may have copies (see `layout`)."""
        data = read_yaml_mapping(path, "placement file", PlacementError)
        if not isinstance(data.get("devices"), list):
            raise PlacementError(f"{path}: expected a mapping with a 'devices' list of expert-id lists")
        unknown = sorted(set(data) - {"devices", "layers", "version"}, key=str)
        if unknown:
            raise PlacementError(f"{path}: unknown keys {unknown} (expected devices, layers, version)")
        layers = data.get("layers") or {}
        if not isinstance(layers, dict):
            raise PlacementError(f"{path}: layers: expected a mapping {{MoE layer: [[expert ids], ...]}}")
        version = data.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise PlacementError(f"{path}: version={version!r}: expected an integer >= 0")
        try:
            return cls.from_device_lists(data["devices"], n_experts, layers, moe_layers, version)
        except PlacementError as exc:
            raise PlacementError(f"{path}: {exc}") from None

    @property
    def n_experts(self) -> int:
        return len(self.expert_device)

    def experts_on(self, device: int, layer: int | None = None) -> list[int]:
        """The experts `device` hosts in `layer` (None: the base map)."""
        layout = self._layouts().get(layer) if layer is not None else None
        if layout is not None:
            return list(layout[device])
        return [e for e, d in enumerate(self.expert_device) if d == device]

    def layout(self, layer: int | None = None) -> Layout:
        """Experts per device in `layer` (None: the base map)."""
        return tuple(tuple(self.experts_on(d, layer)) for d in range(self.n_devices))

    def layer_overrides(self, device: int) -> dict[int, list[int]]:
        """{layer: experts `device` hosts there} for the layers with a layout of their own (what a group loads
        beyond the base map)."""
        return {layer: list(layout[device]) for layer, layout in self.layers}

    @property
    def has_copies(self) -> bool:
        return any(sum(len(experts) for experts in layout) > self.n_experts for _, layout in self.layers)

    def redundant_slots(self, layer: int) -> int:
        """Physical copies beyond one per expert in `layer`."""
        return sum(len(experts) for experts in self.layout(layer)) - self.n_experts

    def device_tensor(self) -> torch.Tensor:
        """[E] int64 expert -> device of the base map."""
        return torch.tensor(self.expert_device, dtype=torch.long)

    def copy_table(self, layer: int | None = None) -> torch.Tensor:
        """[E, C] int64: the devices hosting each expert in `layer`, ascending, -1 padded (C = most copies)."""
        hosts: list[list[int]] = [[] for _ in range(self.n_experts)]
        for d, experts in enumerate(self.layout(layer)):
            for e in experts:
                hosts[e].append(d)
        table = torch.full((self.n_experts, max(len(h) for h in hosts)), -1, dtype=torch.long)
        for e, h in enumerate(hosts):
            table[e, : len(h)] = torch.tensor(h, dtype=torch.long)
        return table

    def members(self, layer: int | None = None) -> torch.Tensor:
        """[D, m] expert ids per device in `layer`, -1 padded (the device partition for top-M routing; with
        copies an expert is a member of every device hosting it)."""
        if layer is None or layer not in self._layouts():
            return members_of(self.device_tensor(), self.n_devices)
        layout = self._layouts()[layer]
        table = torch.full((self.n_devices, max(len(x) for x in layout)), -1, dtype=torch.long)
        for d, experts in enumerate(layout):
            table[d, : len(experts)] = torch.tensor(sorted(experts), dtype=torch.long)
        return table

    def check_top_m(self, top_k: int, top_m_devices: int | None) -> None:
        if top_m_devices is not None:
            for layer in [None, *(layer for layer, _ in self.layers)]:
                check_top_m(self.members(layer), top_k, top_m_devices)

    def to_dict(self) -> dict:
        out: dict = {"devices": [self.experts_on(d) for d in range(self.n_devices)]}
        if self.layers:
            out["layers"] = {layer: [list(experts) for experts in layout] for layer, layout in self.layers}
        if self.version:
            out["version"] = self.version
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def _layouts(self) -> dict[int, Layout]:
        return dict(self.layers)


def _layouts(raw: Mapping, n_devices: int, moe_layers: Sequence[int] | None) -> tuple[tuple[int, Layout], ...]:
    """Per-layer layouts from a file's or caller's mapping, as sorted (layer, layout) pairs; shapes checked here,
    coverage in Placement.__post_init__."""
    out = []
    for key, layout in raw.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise PlacementError(f"layers: key {key!r}: expected an MoE layer index") from None
        if moe_layers is not None and layer not in moe_layers:
            raise PlacementError(f"layers: layer {layer} is not an MoE layer (MoE layers: {list(moe_layers)})")
        if not isinstance(layout, (list, tuple)) or len(layout) != n_devices:
            raise PlacementError(f"layer {layer}: expected {n_devices} expert-id lists (one per group)")
        for d, experts in enumerate(layout):
            if not isinstance(experts, (list, tuple)):
                raise PlacementError(f"layer {layer}, group {d}: expected a list of expert ids, got {experts!r}")
        out.append((layer, tuple(tuple(experts) for experts in layout)))
    return tuple(sorted(out))


def _check_layout(layer: int, layout: Layout, n_experts: int, n_devices: int) -> None:
    """Every expert on at least one group, at most once per group; every group hosts something."""
    if len(layout) != n_devices:
        raise PlacementError(f"layer {layer}: expected {n_devices} expert-id lists (one per group)")
    hosted = set()
    for d, experts in enumerate(layout):
        if not experts:
            raise PlacementError(f"layer {layer}: group {d} hosts no experts")
        seen = set()
        for e in experts:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < n_experts:
                raise PlacementError(f"layer {layer}, group {d}: expert id {e!r} is outside [0, {n_experts})")
            if e in seen:
                raise PlacementError(f"layer {layer}, group {d}: expert {e} is listed twice")
            seen.add(e)
        hosted |= seen
    missing = [e for e in range(n_experts) if e not in hosted]
    if missing:
        raise PlacementError(f"layer {layer}: experts {missing[:10]} are on no group")
