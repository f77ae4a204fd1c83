"""Expert-group replicas on Ray that one owner starts, scales, re-places and replaces: R actors per device group,
each in its own placement group (the mesh's control actor owns one; a `ray-dag` gateway owns its own)."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from expert_workers.actor import ExpertGroupActor
from gateway.config import DeploymentConfig
from gateway.dispatch.ray_runtime import connect_ray
from gateway.dispatch.replica_choice import NoLiveReplica, PoolSnapshot, Replica, ReplicaChooser
from router_service.placement import Placement

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
ACTOR_CONCURRENCY = 16  # calls a replica runs at once: several gateways' calls meet there and merge into one pass
__all__ = ["ExpertGroupPool", "NoLiveReplica", "PoolSnapshot", "Replica"]


class ExpertGroupPool(ReplicaChooser):
    """`replicas[d]` live ExpertGroupActors per device group d. New replicas load their weights (and answer
    `describe`) before they join; removed ones stop taking traffic and drain their in-flight calls first.

    Actors restart on failure (`max_restarts=-1`); the transports retry a failed call on a live replica. A failed
    replica is probed without blocking anyone (`describe` answers once Ray has restarted it, with its new gRPC
    address); one that stays down for `rpc.replica_deadline_s` is evicted and a fresh replica replaces it.

    name: what replica names end with (unique per pool); detached: the replicas (and their placement groups) outlive
    this process (the mesh's: its control actor may die and come back); adopt: [(device, index, name)] of live
    replicas to take over instead of starting new ones (a restarted control actor); drained(victims): whether no
    caller has calls in flight on these replicas (default: this pool's own counts).
    """

    def __init__(self, cfg: DeploymentConfig, placement: Placement, actor_class: type = ExpertGroupActor, *,
                 name: str | None = None, detached: bool = False,
                 adopt: list[tuple[int, int, str]] | None = None,
                 drained: Callable[[list[Replica]], bool] | None = None) -> None:
        super().__init__(placement, cfg.rpc.replica_deadline_s)
        self.cfg, self.actor_class = cfg, actor_class
        self.started_ray = connect_ray(cfg)
        self.deployment_id = name or uuid.uuid4().hex[:8]
        self.detached = detached
        self._drained = drained or (lambda victims: not any(v.inflight for v in victims))
        self._next_index = 0
        self._closed = False
        self.placement_lock = threading.RLock()  # held from staging a placement to switching to it (no _add then)
        self._background: list[threading.Thread] = []
        try:
            if adopt is not None:
                self._adopt(adopt)
            else:
                self._add([d for d in range(placement.n_devices) for _ in range(cfg.replicas_of(d))])
        except Exception:
            self.shutdown()
            raise

    def _adopt(self, entries: list[tuple[int, int, str]]) -> None:
        """Take over live replicas by name (their placement groups too); one that does not answer is replaced."""
        ray = self._ray
        from ray.util import get_placement_group

        namespace = self.cfg.ray.namespace
        found, missing = [], []
        for device, index, name in entries:
            self._next_index = max(self._next_index, index + 1)
            try:
                actor = ray.get_actor(name, namespace=namespace)
                pg = get_placement_group(name)
            except ValueError:
                missing.append(device)
                continue
            found.append(Replica(device, index, actor, pg, name))
        infos = []
        for r in found:
            try:
                infos.append(ray.get(r.actor.describe.remote(), timeout=READY_TIMEOUT_S))
            except ray.exceptions.RayError as exc:
                logger.warning("replica %s: not adopted (%s); starting a new one", r.name, type(exc).__name__)
                infos.append(None)
        with self._lock:
            for r, info in zip(found, infos, strict=True):
                if info is None:
                    missing.append(r.device)
                    continue
                r.grpc_address, r.started_at, r.node_id = info["grpc_address"], info["started_at"], info.get("node_id")
                self.groups[r.device].append(r)
        if missing:
            self._add(missing)

    # -- starting and stopping replicas -----------------------------------------------------------------
    def _add(self, devices: list[int]) -> list[Replica]:
        """Start one replica per entry of `devices`, wait until all have loaded, then let them take traffic."""
        with self.placement_lock:
            return self._add_locked(devices)

    def _add_locked(self, devices: list[int]) -> list[Replica]:
        ray = self._ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        cpus, gpu = cfg.ray.cpus_per_group, cfg.ray.device_resource == "gpu"
        gpus = cfg.ray.gpus_per_group if gpu else 0  # a fraction lets several groups share one GPU
        bundle = {"CPU": cpus, "GPU": gpus} if gpu else {"CPU": cpus}
        lifetime = {"lifetime": "detached"} if self.detached else {}
        started = []
        for d in devices:
            with self._lock:
                index = self._next_index
                self._next_index += 1
            name = f"expert-group-{d}-r{index}-{self.deployment_id}"
            pg = placement_group([dict(bundle)], name=name, **lifetime)
            actor = ray.remote(concurrency_groups={"watch": 1})(self.actor_class).options(
                name=name, namespace=cfg.ray.namespace, num_cpus=cpus, num_gpus=gpus,
                max_restarts=-1, max_task_retries=0, max_concurrency=ACTOR_CONCURRENCY, **lifetime,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            ).remote(cfg.model, self.placement.experts_on(d), cfg.dtype, d, serve_grpc=True,
                     max_message_bytes=cfg.rpc.max_message_mb << 20, threads=max(1, math.floor(cpus)),
                     kernel=cfg.expert_kernel, half_matmul=cfg.half_matmul, quantization=cfg.quantization,
                     torch_device=cfg.expert_torch_device,
                     tracing=cfg.tracing,
                     grpc_bind=cfg.rpc.bind, joined_cluster=cfg.ray_address is not None,
                     security=cfg.rpc.security(), layer_experts=self.placement.layer_overrides(d),
                     version=self.placement.version, merge=cfg.mesh.merge)
            started.append(Replica(d, index, actor, pg, name))
        try:
            infos = ray.get([r.actor.describe.remote() for r in started], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            for r in started:
                self._stop(r)
            raise RuntimeError(
                f"expert groups {devices}: replicas did not become ready within {READY_TIMEOUT_S:.0f}s; does the "
                f"cluster have room for bundles of {bundle}? (resources: {ray.cluster_resources()})"
            ) from None
        except ray.exceptions.RayActorError as exc:  # its __init__ raised (a refused checkpoint, a bad device, ...)
            for r in started:
                self._stop(r)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise RuntimeError(f"expert groups {devices}: a replica failed to start: "
                               f"{lines[-1] if lines else type(exc).__name__}") from None
        with self._lock:
            for r, info in zip(started, infos, strict=True):
                r.grpc_address, r.started_at = info["grpc_address"], info["started_at"]
                r.node_id = info.get("node_id")
                self.groups[r.device].append(r)
        return started

    def _stop(self, replica: Replica) -> None:
        ray = self._ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get(replica.actor.shutdown.remote(), timeout=10)  # stops its gRPC server, flushes its spans
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            logger.info("replica %s: no clean shutdown (%s); killing it", replica.name, type(exc).__name__)
        ray.kill(replica.actor, no_restart=True)
        remove_placement_group(replica.placement_group)

    # -- re-placement -----------------------------------------------------------------------------------------
    def stage(self, placement: Placement, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Every replica loads `placement` beside the one it serves (in the background: calls keep flowing);
        returns once all have it. Hold `placement_lock` from here to `switch`, so no replica starts in between."""
        ray = self._ray
        v = placement.version
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                replicas = [r for rs in self.groups.values() for r in rs if not r.draining]
            checks = []
            for r in replicas:  # idempotent: a replica already loading or holding `v` ignores it
                r.actor.stage_layout.remote(v, placement.experts_on(r.device), placement.layer_overrides(r.device))
                checks.append(r.actor.layout_ready.remote(v))
            try:
                if all(ray.get(checks, timeout=max(1.0, deadline - time.monotonic()))):
                    return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                pass  # a replica died meanwhile: it is staged again once it is back (or evicted)
            except ray.exceptions.GetTimeoutError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"placement version {v}: not every replica loaded it within {timeout_s:.0f}s")
            time.sleep(0.1)

    @contextlib.contextmanager
    def placement_change(self) -> Iterator[None]:
        """Hold from `stage` to `switch`: no replica starts (scaling, replacement) in between, so none loads the old
        placement after the others staged the new one."""
        with self.placement_lock:
            yield

    def switch(self, placement: Placement) -> None:
        """New and restarted replicas load `placement` from now on."""
        with self._lock:
            self.placement = placement

    def release_placements(self, keep: int) -> None:
        """Every replica frees the placement versions other than `keep` (none of their calls is in flight)."""
        ray = self._ray
        with self._lock:
            replicas = [r for rs in self.groups.values() for r in rs]
        refs = [r.actor.release_layouts.remote(keep) for r in replicas]
        for r, ref in zip(replicas, refs, strict=True):
            try:
                ray.get(ref, timeout=READY_TIMEOUT_S)
            except ray.exceptions.RayError as exc:  # a dead replica adopts the current placement when it is back
                logger.info("replica %s: releasing old placements failed (%s)", r.name, type(exc).__name__)

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
            while time.monotonic() < deadline:
                if self._drained(victims):
                    break
                time.sleep(0.01)
            else:
                logger.warning("group %d: replicas %s still had calls in flight after %.0fs; stopping them",
                               device, [v.name for v in victims], drain_timeout_s)
            with self._lock:
                self.groups[device] = [r for r in self.groups[device] if r not in victims]
            for v in victims:
                self._stop(v)
        logger.info("group %d scaled to %d replicas", device, replicas)
        return [r.index for r in self.live(device)]

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            background, self._background = self._background, []
        for thread in background:  # replacements being started: let them finish, then stop them with the rest
            thread.join(timeout=READY_TIMEOUT_S)
        for replicas in list(self.groups.values()):
            for r in replicas:
                self._stop(r)
        self.groups = {d: [] for d in self.groups}
        if self.started_ray:
            self._ray.shutdown()
            self.started_ray = False

    # -- what probes find (ReplicaChooser's hooks) ------------------------------------------------------------
    def _back_up_locked(self, replica: Replica, info: dict) -> bool:
        """A restarted replica comes back with the placement it was created with: it loads the current one first."""
        if info.get("version", self.placement.version) == self.placement.version:
            return True
        v, d = self.placement.version, replica.device
        replica.probe = replica.actor.adopt_layout.remote(v, self.placement.experts_on(d),
                                                          self.placement.layer_overrides(d))
        return False

    def _gone_locked(self, replica: Replica) -> None:
        self._evict_locked(replica)

    def _evict_locked(self, replica: Replica) -> None:
        """Drop a replica that stayed down past the deadline and start a fresh one in its place (in background)."""
        self.groups[replica.device] = [r for r in self.groups[replica.device] if r is not replica]
        self.evicted += 1
        logger.error("replica %s of group %d: dead for good or down for over %.1fs (rpc.replica_deadline_s); "
                     "evicted, starting a replacement", replica.name, replica.device, self.evict_after_s)
        if self._closed:
            return
        thread = threading.Thread(target=self._replace, args=(replica,), name=f"replace-{replica.name}", daemon=True)
        self._background.append(thread)
        thread.start()

    def _replace(self, dead: Replica) -> None:
        self._stop(dead)
        try:
            with self._lock:
                if self._closed:
                    return
            self._add([dead.device])
        except Exception:  # a background thread: log it whole; the group stays a replica short
            logger.exception("group %d: starting a replacement replica failed", dead.device)
