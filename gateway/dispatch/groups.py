"""A deployment's expert groups behind one Dispatcher: in-process, an expert mesh the gateway attaches to, or (ray-dag)
replicas of its own."""

from __future__ import annotations

from expert_workers.expert_group import ExpertGroup
from gateway.config import DeploymentConfig
from gateway.dispatch.dispatcher import Dispatcher
from gateway.dispatch.mesh.attach import attach_mesh
from gateway.dispatch.replica_pool import ExpertGroupPool
from gateway.dispatch.transports import GrpcTransport, LocalTransport, RayDagTransport, RayTransport
from model_core.spec import ModelSpec
from router_service.placement import Placement


def build_dispatcher(cfg: DeploymentConfig, spec: ModelSpec, placement: Placement) -> Dispatcher:
    """The dispatcher for `cfg.backend`, with its expert groups started and loaded.

    In-process groups share the gateway's device (no copies between them); Ray actors live on the device their
    resources give them (`cfg.expert_torch_device`)."""
    device = cfg.gateway_torch_device
    if cfg.backend == "local":
        groups = [
            ExpertGroup(cfg.model, placement.experts_on(d), cfg.torch_dtype, spec, device=d,
                        kernel=cfg.expert_kernel, torch_device=str(device), layer_experts=placement.layer_overrides(d),
                        version=placement.version, half_matmul=cfg.half_matmul,
                        quantization=cfg.quantization)
            for d in range(placement.n_devices)
        ]
        return Dispatcher(placement, LocalTransport(groups), device=device)
    # ray-dag owns its replicas (one compiled graph over fixed actors); the others attach to a mesh.
    pool = ExpertGroupPool(cfg, placement) if cfg.backend == "ray-dag" else attach_mesh(cfg)
    placement = pool.placement  # a mesh's current placement, which may have moved on from the config's
    try:
        if cfg.backend == "ray":
            transport = RayTransport(pool, cfg.rpc.timeout_s, cfg.rpc.replica_deadline_s)
        elif cfg.backend == "ray-dag":
            transport = RayDagTransport(pool, cfg.rpc.timeout_s, cfg.rpc.replica_deadline_s)
        elif cfg.backend == "ray-rdt":
            import ray

            from gateway.dispatch.transports.rdt import RdtTransport, pick_tensor_transport

            over = pick_tensor_transport(cfg.rpc.tensor_transport, device, cfg.ray.device_resource == "gpu",
                                         pool.cluster_gpus(), holds_ray_gpu=bool(ray.get_gpu_ids()),
                                         gpus_per_group=cfg.ray.gpus_per_group,
                                         group_replicas=sum(cfg.replicas_of(d) for d in range(placement.n_devices)))
            transport = RdtTransport(pool, over, device, cfg.rpc.timeout_s, cfg.rpc.replica_deadline_s)
        else:
            transport = GrpcTransport(pool, cfg.rpc.timeout_s, cfg.rpc.replica_deadline_s,
                                      cfg.rpc.max_message_mb << 20, cfg.rpc.security())
    except Exception:
        pool.shutdown()
        raise
    # A compiled graph has a fixed topology: no scaling through the pool.
    return Dispatcher(placement, transport, pool=pool if cfg.backend != "ray-dag" else None,
                      on_close=pool.shutdown, device=device)  # the transport closes first
