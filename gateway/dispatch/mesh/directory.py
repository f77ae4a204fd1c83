"""What the mesh's control actor tells gateways: the replicas, the placement on offer, and what must match to attach."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import DeploymentConfig, DeploymentConfigError
from router_service.placement import Placement


@dataclass(frozen=True)
class ReplicaEntry:
    """One expert-group replica as the mesh lists it."""

    device: int
    index: int
    name: str
    actor: Any  # ray ActorHandle
    grpc_address: str
    started_at: float
    node_id: str | None
    draining: bool  # being scaled away: no new calls


@dataclass(frozen=True)
class MeshDirectory:
    """The mesh at one epoch (the epoch grows with every change a gateway must see)."""

    name: str
    epoch: int
    placement: Placement  # the newest placement: every replica holds it
    replicas: tuple[ReplicaEntry, ...]
    restarts: int  # replica restarts the control actor has seen
    evicted: int  # replicas replaced because they stayed down


def fingerprint(cfg: DeploymentConfig) -> dict[str, Any]:
    """The settings a gateway and the mesh it attaches to must agree on: they decide what the replicas compute."""
    return {
        "model": str(Path(cfg.model).resolve()),
        "dtype": cfg.dtype,
        "devices": cfg.devices,
        "expert_kernel": cfg.expert_kernel,
        "half_matmul": cfg.half_matmul,
        "quantization": cfg.quantization,
        "ray.device_resource": cfg.ray.device_resource,
    }


def check_fingerprint(mesh: str, serves: dict[str, Any], wanted: dict[str, Any]) -> None:
    """DeploymentConfigError naming the first setting where a gateway's config differs from the mesh it attaches to."""
    for key, value in wanted.items():
        if serves.get(key) != value:
            raise DeploymentConfigError(
                f"{key}={value!r}: mesh {mesh!r} serves {key}={serves.get(key)!r}; attach with the mesh's settings, "
                "or name another mesh (mesh.name)")
