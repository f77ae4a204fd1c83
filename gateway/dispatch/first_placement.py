"""The placement a deployment starts with, from its `placement` and `devices` settings."""

from __future__ import annotations

from gateway.config import DeploymentConfig
from model_core.spec import ModelSpec
from router_service.placement import Placement


def initial_placement(config: DeploymentConfig, spec: ModelSpec) -> Placement:
    """The placement a deployment starts with: `placement` ('contiguous' or a file) over `devices` groups, checked
    against the model's top_k and `top_m_devices`."""
    n = spec.n_routed_experts
    if config.placement == "contiguous":
        placement = Placement.contiguous(n, config.devices)
    else:
        placement = Placement.from_file(config.placement, n, spec.moe_layers)
    if placement.n_devices != config.devices:
        raise ValueError(
            f"placement {config.placement}: has {placement.n_devices} devices, but devices={config.devices}"
        )
    placement.check_top_m(spec.top_k, config.top_m_devices)
    return placement
