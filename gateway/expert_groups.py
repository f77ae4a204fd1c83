"""Starting expert groups for a deployment: in-process, or one Ray actor per device in a placement group."""

from __future__ import annotations

import logging
import math
import os
import uuid

from expert_workers.actor import ExpertGroupActor
from expert_workers.expert_group import ExpertGroup
from gateway.backends import DispatchingBackend
from gateway.config import DeploymentConfig
from gateway.transports import GrpcTransport, LocalTransport, RayTransport
from model_core.spec import ModelSpec
from router_service.placement import Placement

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0


def build_backend(cfg: DeploymentConfig, spec: ModelSpec, placement: Placement) -> DispatchingBackend:
    """The dispatching backend for `cfg.backend`, with its expert groups started and loaded."""
    if cfg.backend == "local":
        groups = [
            ExpertGroup(cfg.model, placement.experts_on(d), cfg.torch_dtype, spec, device=d,
                        kernel=cfg.expert_kernel, torch_device=cfg.expert_torch_device)
            for d in range(placement.n_devices)
        ]
        return DispatchingBackend(placement, LocalTransport(groups))
    pool = RayExpertGroups(cfg, placement)
    try:
        if cfg.backend == "ray":
            transport = RayTransport(pool.actors, cfg.rpc.timeout_s)
        else:
            transport = GrpcTransport(pool.grpc_addresses, cfg.rpc.timeout_s, cfg.rpc.max_message_mb << 20)
    except Exception:
        pool.shutdown()
        raise
    return DispatchingBackend(placement, transport, on_close=pool.shutdown)


class RayExpertGroups:
    """One ExpertGroupActor per device, each in its own placement-group bundle; every actor also serves gRPC."""

    def __init__(self, cfg: DeploymentConfig, placement: Placement) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray, self._remove_pg = ray, remove_placement_group
        self.started_ray = connect_ray(cfg, placement.n_devices)
        self.deployment_id = uuid.uuid4().hex[:8]
        cpus, gpu = cfg.ray.cpus_per_group, cfg.ray.device_resource == "gpu"
        bundle = {"CPU": cpus, "GPU": 1} if gpu else {"CPU": cpus}
        self.pg = placement_group([dict(bundle) for _ in range(placement.n_devices)], strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise RuntimeError(
                f"devices={placement.n_devices}: the Ray cluster cannot fit {placement.n_devices} bundles of {bundle} "
                f"within {READY_TIMEOUT_S:.0f}s (resources: {ray.cluster_resources()})"
            ) from None
        remote_cls = ray.remote(ExpertGroupActor)
        self.actors = [
            remote_cls.options(
                name=f"expert-group-{d}-{self.deployment_id}",
                namespace=cfg.ray.namespace,
                num_cpus=cpus,
                num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=d),
            ).remote(cfg.model, placement.experts_on(d), cfg.dtype, d, serve_grpc=True,
                     max_message_bytes=cfg.rpc.max_message_mb << 20, threads=max(1, math.floor(cpus)),
                     kernel=cfg.expert_kernel, torch_device=cfg.expert_torch_device, tracing=cfg.tracing)
            for d in range(placement.n_devices)
        ]
        try:
            self.describe = ray.get([a.describe.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except Exception:
            self.shutdown()
            raise
        self.grpc_addresses = [info["grpc_address"] for info in self.describe]
        logger.info("started %d expert groups (%s)", len(self.actors), self.deployment_id)

    def shutdown(self) -> None:
        ray = self._ray
        for actor in getattr(self, "actors", []):
            try:
                ray.get(actor.shutdown.remote(), timeout=10)
            except Exception:  # a dead actor has nothing to stop
                logger.debug("expert group shutdown call failed", exc_info=True)
            ray.kill(actor)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            self._remove_pg(self.pg)
            self.pg = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def connect_ray(cfg: DeploymentConfig, n_devices: int) -> bool:
    """Join RAY_ADDRESS / cfg.ray.address, or start Ray embedded here; returns whether this call connected."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_address
    if address:
        ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=False)
    else:
        needed = math.ceil(n_devices * cfg.ray.cpus_per_group) + 1
        ray.init(num_cpus=max(os.cpu_count() or 1, needed), namespace=cfg.ray.namespace, include_dashboard=False,
                 log_to_driver=False)
    return True
