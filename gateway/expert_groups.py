"""Starting expert groups for a deployment: in-process, or replicated Ray actors (gateway/replica_pool.py)."""

from __future__ import annotations

import logging

from expert_workers.expert_group import ExpertGroup
from gateway.backends import DispatchingBackend
from gateway.config import DeploymentConfig
from gateway.replica_pool import ExpertGroupPool
from gateway.transports import GrpcTransport, LocalTransport, RayDagTransport, RayTransport
from model_core.spec import ModelSpec
from router_service.placement import Placement

logger = logging.getLogger(__name__)



def build_backend(cfg: DeploymentConfig, spec: ModelSpec, placement: Placement) -> DispatchingBackend:
    """The dispatching backend for `cfg.backend`, with its expert groups started and loaded."""
    if cfg.backend == "local":
        groups = [
            ExpertGroup(cfg.model, placement.experts_on(d), cfg.torch_dtype, spec, device=d,
                        kernel=cfg.expert_kernel, torch_device=cfg.expert_torch_device)
            for d in range(placement.n_devices)
        ]
        return DispatchingBackend(placement, LocalTransport(groups))
    pool = ExpertGroupPool(cfg, placement)
    try:
        if cfg.backend == "ray":
            transport = RayTransport(pool, cfg.rpc.timeout_s, cfg.rpc.replica_deadline_s)
        elif cfg.backend == "ray-dag":
            transport = RayDagTransport(pool, cfg.rpc.timeout_s)
        else:
            transport = GrpcTransport(pool, cfg.rpc.timeout_s, cfg.rpc.replica_deadline_s,
                                      cfg.rpc.max_message_mb << 20)
    except Exception:
        pool.shutdown()
        raise
    backend = DispatchingBackend(placement, transport, on_close=pool.shutdown)  # transport closes first
    backend.pool = pool if cfg.backend != "ray-dag" else None  # a compiled graph has a fixed topology
    return backend


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
