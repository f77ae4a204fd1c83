"""Expert placement: which device hosts each routed expert (contiguous like DeepSeek's, or from a file)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from router_service.routing import check_top_m, members_of


class PlacementError(ValueError):
    """A placement does not cover the experts exactly once or names a bad device; the message says which."""


@dataclass(frozen=True)
class Placement:
    """expert_device[e] = the device hosting expert e (the same map for every MoE layer)."""

    expert_device: tuple[int, ...]
    n_devices: int

    def __post_init__(self) -> None:
        if self.n_devices < 1:
            raise PlacementError(f"devices={self.n_devices}: expected at least 1")
        bad = [(e, d) for e, d in enumerate(self.expert_device) if not 0 <= d < self.n_devices]
        if bad:
            raise PlacementError(f"expert {bad[0][0]} is placed on device {bad[0][1]}, outside [0, {self.n_devices})")
        empty = [d for d in range(self.n_devices) if d not in set(self.expert_device)]
        if empty:
            raise PlacementError(f"devices {empty} host no experts; use fewer devices or move experts there")

    @classmethod
    def contiguous(cls, n_experts: int, n_devices: int) -> Placement:
        """Experts split into consecutive, near-equal runs: device d hosts [d·E/D, (d+1)·E/D)."""
        if not 1 <= n_devices <= n_experts:
            raise PlacementError(f"devices={n_devices}: expected 1..n_routed_experts={n_experts}")
        return cls(tuple(e * n_devices // n_experts for e in range(n_experts)), n_devices)

    @classmethod
    def from_device_lists(cls, devices: list[list[int]], n_experts: int) -> Placement:
        """devices[d] = the expert ids device d hosts; every expert exactly once."""
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
        return cls(tuple(owner[e] for e in range(n_experts)), len(devices))

    @classmethod
    def from_file(cls, path: str | Path, n_experts: int) -> Placement:
        """A YAML or JSON file `{devices: [[0, 1, ...], [8, 9, ...], ...]}`."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PlacementError(f"{path}: cannot read placement ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
            raise PlacementError(f"{path}: expected a mapping with a 'devices' list of expert-id lists")
        try:
            return cls.from_device_lists(data["devices"], n_experts)
        except PlacementError as exc:
            raise PlacementError(f"{path}: {exc}") from None

    @property
    def n_experts(self) -> int:
        return len(self.expert_device)

    def experts_on(self, device: int) -> list[int]:
        return [e for e, d in enumerate(self.expert_device) if d == device]

    def device_tensor(self) -> torch.Tensor:
        """[E] int64 expert -> device."""
        return torch.tensor(self.expert_device, dtype=torch.long)

    def members(self) -> torch.Tensor:
        """[D, m] expert ids per device, -1 padded (the device partition for top-M routing)."""
        return members_of(self.device_tensor(), self.n_devices)

    def check_top_m(self, top_k: int, top_m_devices: int | None) -> None:
        if top_m_devices is not None:
            check_top_m(self.members(), top_k, top_m_devices)

    def to_json(self) -> str:
        return json.dumps({"devices": [self.experts_on(d) for d in range(self.n_devices)]})
