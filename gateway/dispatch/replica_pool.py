"""Expert-group replicas on Ray: R actors per device group, each in its own placement group, scalable at run time."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass

from expert_workers.actor import ExpertGroupActor
from gateway.config import DeploymentConfig
from gateway.dispatch.ray_runtime import connect_ray
from router_service.placement import Placement

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0


class NoLiveReplica(RuntimeError):
    """A device group has no replica that can take traffic."""


@dataclass
class Replica:
    """One ExpertGroupActor serving one device group's experts."""

    device: int
    index: int
    actor: object  # ray ActorHandle
    placement_group: object
    grpc_address: str
    inflight: int = 0
    calls: int = 0
    draining: bool = False
    failures: int = 0
    name: str = ""
    restarts: int = 0
    started_at: float = 0.0  # the actor's start time: a new value means Ray restarted it


class ExpertGroupPool:
    """`replicas[d]` live ExpertGroupActors per device group d. New replicas load their weights (and answer
    `describe`) before they join; removed ones stop taking traffic and drain their in-flight calls first.
    Actors restart on failure (`max_restarts=-1`); the transports retry a failed call on a live replica."""

    def __init__(self, cfg: DeploymentConfig, placement: Placement) -> None:
        import ray

        self._ray = ray
        self.cfg, self.placement = cfg, placement
        self.started_ray = connect_ray(cfg)
        self.deployment_id = uuid.uuid4().hex[:8]
        self.groups: dict[int, list[Replica]] = {d: [] for d in range(placement.n_devices)}
        self._lock = threading.Lock()
        self._next_index = 0
        self._rr = 0
        self.restarts = 0
        try:
            self._add([d for d in range(placement.n_devices) for _ in range(cfg.replicas_of(d))])
        except Exception:
            self.shutdown()
            raise

    # -- starting and stopping replicas -----------------------------------------------------------------
    def _add(self, devices: list[int]) -> list[Replica]:
        """Start one replica per entry of `devices`, wait until all have loaded, then let them take traffic."""
        ray = self._ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        cpus, gpu = cfg.ray.cpus_per_group, cfg.ray.device_resource == "gpu"
        bundle = {"CPU": cpus, "GPU": 1} if gpu else {"CPU": cpus}
        started = []
        for d in devices:
            pg = placement_group([dict(bundle)])
            with self._lock:
                index = self._next_index
                self._next_index += 1
            name = f"expert-group-{d}-r{index}-{self.deployment_id}"
            actor = ray.remote(ExpertGroupActor).options(
                name=name, namespace=cfg.ray.namespace, num_cpus=cpus, num_gpus=1 if gpu else 0,
                max_restarts=-1, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            ).remote(cfg.model, self.placement.experts_on(d), cfg.dtype, d, serve_grpc=True,
                     max_message_bytes=cfg.rpc.max_message_mb << 20, threads=max(1, math.floor(cpus)),
                     kernel=cfg.expert_kernel, torch_device=cfg.expert_torch_device, tracing=cfg.tracing)
            started.append(Replica(d, index, actor, pg, "", name=name))
        try:
            infos = ray.get([r.actor.describe.remote() for r in started], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            for r in started:
                self._stop(r)
            raise RuntimeError(
                f"expert groups {devices}: replicas did not become ready within {READY_TIMEOUT_S:.0f}s; does the "
                f"cluster have room for bundles of {bundle}? (resources: {ray.cluster_resources()})"
            ) from None
        for r, info in zip(started, infos, strict=True):
            r.grpc_address, r.started_at = info["grpc_address"], info["started_at"]
        with self._lock:
            for r in started:
                self.groups[r.device].append(r)
        return started

    def _stop(self, replica: Replica) -> None:
        ray = self._ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get(replica.actor.shutdown.remote(), timeout=10)  # stops its gRPC server, flushes its spans
        except Exception:  # a dead actor has nothing to stop
            logger.debug("replica %s shutdown call failed", replica.name, exc_info=True)
        ray.kill(replica.actor, no_restart=True)
        remove_placement_group(replica.placement_group)

    def scale(self, device: int, replicas: int, drain_timeout_s: float = 60.0) -> list[int]:
        """Set group `device` to `replicas` live replicas; returns the live replica indices afterwards."""
        if device not in self.groups:
            raise ValueError(f"group={device}: expected 0..{len(self.groups) - 1}")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas={replicas!r}: expected an integer >= 1")
        live = self.live(device)
        if replicas > len(live):
            self._add([device] * (replicas - len(live)))
        elif replicas < len(live):
            with self._lock:
                victims = sorted(live, key=lambda r: r.index)[replicas:]
                for v in victims:
                    v.draining = True  # no new calls go there
            deadline = time.monotonic() + drain_timeout_s
            while any(v.inflight for v in victims) and time.monotonic() < deadline:
                time.sleep(0.01)
            with self._lock:
                self.groups[device] = [r for r in self.groups[device] if r not in victims]
            for v in victims:
                self._stop(v)
        logger.info("group %d scaled to %d replicas", device, replicas)
        return [r.index for r in self.live(device)]

    def shutdown(self) -> None:
        for replicas in list(self.groups.values()):
            for r in replicas:
                self._stop(r)
        self.groups = {d: [] for d in self.groups}
        if self.started_ray:
            self._ray.shutdown()
            self.started_ray = False

    # -- choosing replicas --------------------------------------------------------------------------------
    def live(self, device: int) -> list[Replica]:
        with self._lock:
            return [r for r in self.groups[device] if not r.draining]

    def pick(self, device: int, avoid: Replica | None = None) -> Replica:
        """The live replica with the fewest calls in flight (round-robin among equals); `avoid` only if alone."""
        with self._lock:
            live = [r for r in self.groups[device] if not r.draining]
            if not live:
                raise NoLiveReplica(f"group {device}: no live replica")
            choices = [r for r in live if r is not avoid] or live
            self._rr += 1
            n = len(choices)
            best = min(enumerate(choices), key=lambda ir: (ir[1].inflight, (ir[0] + self._rr) % n))[1]
            best.inflight += 1
            best.calls += 1
            return best

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.inflight -= 1

    def note_restart(self, replica: Replica) -> None:
        """Ask a replica that answered after a failure whether Ray restarted it (counted once per restart)."""
        try:
            info = self._ray.get(replica.actor.describe.remote(), timeout=30)
        except Exception:
            return
        if info["started_at"] != replica.started_at:
            replica.started_at = info["started_at"]
            replica.restarts += 1
            with self._lock:
                self.restarts += 1
        replica.grpc_address = info["grpc_address"] or replica.grpc_address

    def actors(self, device: int | None = None) -> list:
        devices = [device] if device is not None else sorted(self.groups)
        return [r.actor for d in devices for r in self.live(d)]

    def describe(self) -> list[dict]:
        return [{"group": d, "replicas": [{"index": r.index, "name": r.name, "inflight": r.inflight,
                                            "draining": r.draining, "failures": r.failures, "calls": r.calls,
                                            "restarts": r.restarts} for r in replicas]}
                for d, replicas in sorted(self.groups.items())]
