"""Joining or starting Ray for a deployment (the one place the gateway calls ray.init)."""

from __future__ import annotations

from gateway.config import DeploymentConfig


def connect_ray(cfg: DeploymentConfig) -> bool:
    """Join RAY_ADDRESS / cfg.ray.address, or start Ray embedded here; returns whether this call connected."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_address
    if address:
        ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.embedded_ray_cpus(), namespace=cfg.ray.namespace, include_dashboard=False,
                 log_to_driver=False)
    return True
