"""Finding the mesh a deployment names (or starting it), attaching a gateway to it, and the `mesh up | status | down`
operations."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from gateway.config import DeploymentConfig, DeploymentConfigError
from gateway.dispatch.mesh.control import MeshControl
from gateway.dispatch.mesh.directory import fingerprint
from gateway.dispatch.mesh.view import MeshView, new_gateway_id
from gateway.dispatch.ray_runtime import connect_ray

logger = logging.getLogger(__name__)

CONTROL_CONCURRENCY = 64  # heartbeats wait at the control actor (one per gateway) beside changes and status calls


class MeshNotRunning(DeploymentConfigError):
    """The named mesh is not running and the deployment may not start it (mesh.start: false)."""


def find_mesh(cfg: DeploymentConfig) -> Any | None:
    """The control actor of mesh `cfg.mesh.name` in `cfg.ray.namespace`, or None (Ray must be connected)."""
    import ray

    try:
        return ray.get_actor(cfg.mesh.name, namespace=cfg.ray.namespace)
    except ValueError:
        return None


def start_mesh(cfg: DeploymentConfig, name: str, *, private: bool = False, actor_class: type | None = None) -> Any:
    """The control actor of mesh `name`, created unless one of that name runs (Ray's get_if_exists: two gateways
    starting together get the same one). A shared mesh is detached and restarts on failure; a private one lives and
    dies with the gateway that starts it."""
    import ray

    options: dict[str, Any] = {"name": name, "namespace": cfg.ray.namespace, "get_if_exists": True,
                               "max_concurrency": CONTROL_CONCURRENCY, "num_cpus": 0}
    if private:
        options["max_restarts"] = 0
    else:
        options.update(lifetime="detached", max_restarts=-1, max_task_retries=0)
    extra = {"actor_class": actor_class} if actor_class is not None else {}
    return ray.remote(MeshControl).options(**options).remote(name, cfg, not private, **extra)


def attach_mesh(cfg: DeploymentConfig, actor_class: type | None = None) -> MeshView:
    """Attach a gateway to the mesh `cfg.mesh.name` (started when absent, if mesh.start), or to a private mesh of
    its own when no name is set. Waits until the mesh's replicas have loaded."""
    import ray

    started_ray = connect_ray(cfg)
    private = cfg.mesh.name is None
    name = cfg.mesh.name or f"mesh-{uuid.uuid4().hex[:8]}"
    try:
        control = None if private else find_mesh(cfg)
        if control is None:
            if not private and not cfg.mesh.start:
                raise MeshNotRunning(f"mesh.name={name!r}: no such mesh runs in namespace {cfg.ray.namespace!r}; "
                                     f"start it (expertmesh mesh up --config ...) or set mesh.start: true")
            control = start_mesh(cfg, name, private=private, actor_class=actor_class)
        gateway = new_gateway_id()
        try:
            directory = ray.get(control.attach.remote(gateway, fingerprint(cfg)), timeout=cfg.mesh.attach_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"mesh {name!r}: not ready within mesh.attach_timeout_s={cfg.mesh.attach_timeout_s:g}s "
                               f"(its expert groups are still loading, or the cluster has no room for them)") from None
        except ray.exceptions.RayTaskError as exc:  # the control actor refused (settings differ) or failed to start
            cause = exc.as_instanceof_cause()
            if isinstance(cause, DeploymentConfigError):
                raise DeploymentConfigError(str(cause).splitlines()[-1].split(": ", 1)[-1]) from None
            raise RuntimeError(f"mesh {name!r}: {_last_line(exc)}") from None
        except ray.exceptions.RayActorError as exc:  # its __init__ raised (a refused checkpoint, no room, ...)
            raise RuntimeError(f"mesh {name!r}: the control actor failed to start: {_last_line(exc)}") from None
        logger.info("gateway %s attached to mesh %s (epoch %d, placement version %d)", gateway, name,
                    directory.epoch, directory.placement.version)
        return MeshView(cfg, control, directory, gateway, owner=private, started_ray=started_ray)
    except Exception:
        if started_ray:
            ray.shutdown()
        raise


def mesh_status(cfg: DeploymentConfig, load: bool = True) -> dict:
    """What `expertmesh mesh status` prints; raises MeshNotRunning when the named mesh does not run."""
    import ray

    control = _running(cfg)
    return ray.get(control.status.remote(load), timeout=60)


def mesh_down(cfg: DeploymentConfig) -> dict:
    """Stop the named mesh (its replicas, relay and control actor) and forget its state; returns its last status."""
    import ray

    control = _running(cfg)
    status = ray.get(control.status.remote(False), timeout=60)
    ray.get(control.shutdown.remote(), timeout=300)
    ray.kill(control, no_restart=True)
    return status


def mesh_up(cfg: DeploymentConfig) -> dict:
    """Start the named mesh (or find it running) and wait until its replicas have loaded; returns its status."""
    import ray

    if cfg.mesh.name is None:
        raise DeploymentConfigError("mesh.name: missing (a mesh that outlives this command needs a name)")
    control = find_mesh(cfg) or start_mesh(cfg, cfg.mesh.name)
    try:
        return ray.get(control.status.remote(False), timeout=cfg.mesh.attach_timeout_s)
    except ray.exceptions.RayActorError as exc:
        raise RuntimeError(f"mesh {cfg.mesh.name!r}: the control actor failed to start: {_last_line(exc)}") from None


def _running(cfg: DeploymentConfig) -> Any:
    if cfg.mesh.name is None:
        raise DeploymentConfigError("mesh.name: missing (which mesh?)")
    control = find_mesh(cfg)
    if control is None:
        raise MeshNotRunning(f"mesh.name={cfg.mesh.name!r}: no such mesh runs in namespace {cfg.ray.namespace!r}")
    return control


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
