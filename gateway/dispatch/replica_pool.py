"""Expert-group replicas on Ray: R actors per device group, each in its own placement group, scalable at run time."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from expert_workers.actor import ExpertGroupActor
from gateway.config import DeploymentConfig
from gateway.dispatch.ray_runtime import connect_ray
from router_service.placement import Placement

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
PROBE_BACKOFF_S = 0.2  # between probes of a replica that stays down


class NoLiveReplica(RuntimeError):
    """A device group has no replica that can take traffic."""


@dataclass
class Replica:
    """One ExpertGroupActor serving one device group's experts. Fields change only under the pool's lock."""

    device: int
    index: int
    actor: Any  # ray ActorHandle
    placement_group: Any
    name: str
    grpc_address: str = ""
    started_at: float = 0.0  # the actor's start time: a new value means Ray restarted it
    node_id: str | None = None  # the Ray node it runs on (a restart may move it)
    inflight: int = 0
    calls: int = 0
    draining: bool = False
    failures: int = 0
    restarts: int = 0
    down_since: float | None = None  # when it first failed since it last answered
    unconfirmed: bool = False  # it failed, and no probe has since read its start time and gRPC address
    probe: Any = None  # a pending describe() call: answers once the (restarted) actor serves again
    probe_after: float = 0.0  # no new probe before this monotonic time


@dataclass(frozen=True)
class PoolSnapshot:
    """The pool's counters at one moment, as plain data."""

    live: dict[int, int]  # group -> live replicas
    inflight: dict[tuple[int, int], int]  # (group, replica index) -> calls in flight, draining replicas included
    restarts: int  # restarts Ray made, seen by probes
    evicted: int  # replicas removed because they stayed down


class ExpertGroupPool:
    """`replicas[d]` live ExpertGroupActors per device group d. New replicas load their weights (and answer
    `describe`) before they join; removed ones stop taking traffic and drain their in-flight calls first.

    Actors restart on failure (`max_restarts=-1`); the transports retry a failed call on a live replica. A failed
    replica is probed without blocking anyone (`describe` answers once Ray has restarted it, with its new gRPC
    address); one that stays down for `rpc.replica_deadline_s` is evicted and a fresh replica replaces it.
    """

    def __init__(self, cfg: DeploymentConfig, placement: Placement, actor_class: type = ExpertGroupActor) -> None:
        import ray

        self._ray = ray
        self.cfg, self.placement, self.actor_class = cfg, placement, actor_class
        self.evict_after_s = cfg.rpc.replica_deadline_s
        self.started_ray = connect_ray(cfg)
        self.deployment_id = uuid.uuid4().hex[:8]
        self.groups: dict[int, list[Replica]] = {d: [] for d in range(placement.n_devices)}
        self._lock = threading.Lock()
        self._next_index = 0
        self._rr: dict[int, int] = {}  # per group: round-robin among equally loaded replicas
        self._closed = False
        self.placement_lock = threading.RLock()  # held from staging a placement to switching to it (no _add then)
        self._background: list[threading.Thread] = []
        self.restarts = 0  # restarts Ray made, seen by probes
        self.evicted = 0  # replicas removed because they stayed down
        try:
            self._add([d for d in range(placement.n_devices) for _ in range(cfg.replicas_of(d))])
        except Exception:
            self.shutdown()
            raise

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
        started = []
        for d in devices:
            pg = placement_group([dict(bundle)])
            with self._lock:
                index = self._next_index
                self._next_index += 1
            name = f"expert-group-{d}-r{index}-{self.deployment_id}"
            actor = ray.remote(concurrency_groups={"watch": 1})(self.actor_class).options(
                name=name, namespace=cfg.ray.namespace, num_cpus=cpus, num_gpus=gpus,
                max_restarts=-1, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            ).remote(cfg.model, self.placement.experts_on(d), cfg.dtype, d, serve_grpc=True,
                     max_message_bytes=cfg.rpc.max_message_mb << 20, threads=max(1, math.floor(cpus)),
                     kernel=cfg.expert_kernel, half_matmul=cfg.half_matmul, torch_device=cfg.expert_torch_device,
                     tracing=cfg.tracing,
                     grpc_bind=cfg.rpc.bind, joined_cluster=cfg.ray_address is not None,
                     security=cfg.rpc.security(), layer_experts=self.placement.layer_overrides(d),
                     version=self.placement.version)
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
                with self._lock:
                    if not any(v.inflight for v in victims):
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

    # -- choosing replicas --------------------------------------------------------------------------------
    def live(self, device: int) -> list[Replica]:
        with self._lock:
            return [r for r in self.groups[device] if not r.draining]

    def pick(self, device: int, avoid: Collection[Replica] = (), strict: bool = False) -> Replica:
        """The live replica with the fewest calls in flight (round-robin among equals), preferring replicas that
        are not known to be down. Replicas in `avoid` are taken only as the last choice, and never when `strict`."""
        with self._lock:
            self._poll_probes_locked()
            live = [r for r in self.groups[device] if not r.draining]
            choices = [r for r in live if all(r is not a for a in avoid)]
            if not strict and not choices:
                choices = live
            if not choices:
                others = " other than " + ", ".join(a.name for a in avoid) if avoid else ""
                raise NoLiveReplica(f"group {device}: no live replica{others}")
            choices = [r for r in choices if r.down_since is None] or choices
            rr = self._rr[device] = self._rr.get(device, 0) + 1
            n = len(choices)
            best = min(enumerate(choices), key=lambda ir: (ir[1].inflight, (ir[0] - rr) % n))[1]
            best.inflight += 1
            best.calls += 1
            return best

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.inflight -= 1

    def answered(self, replica: Replica) -> None:
        """A call on `replica` returned: it is up."""
        if replica.down_since is not None:
            with self._lock:
                replica.down_since = None

    def failed(self, replica: Replica) -> None:
        """A call on `replica` failed because the actor died or restarts: probe it (without waiting)."""
        with self._lock:
            replica.failures += 1
            replica.unconfirmed = True
            if replica.down_since is None:
                replica.down_since = time.monotonic()
            self._probe_locked(replica)

    def poll(self) -> None:
        """Apply what finished probes found (restarts, new gRPC addresses), start due ones, evict the long dead.
        Every pick does this; the engine loop calls it while no traffic flows (a metrics scrape never does)."""
        with self._lock:
            self._poll_probes_locked()

    def inflight(self) -> dict[tuple[int, int], int]:
        """(group, replica index) -> calls in flight, draining replicas included."""
        with self._lock:
            return {(d, r.index): r.inflight for d, replicas in sorted(self.groups.items()) for r in replicas}

    def snapshot(self) -> PoolSnapshot:
        """What metrics report, read as it stands: no probe is polled, no replica evicted or started."""
        with self._lock:
            return PoolSnapshot(
                live={d: sum(not r.draining for r in replicas) for d, replicas in sorted(self.groups.items())},
                inflight={(d, r.index): r.inflight for d, replicas in sorted(self.groups.items()) for r in replicas},
                restarts=self.restarts, evicted=self.evicted)

    def actors(self, device: int | None = None) -> list:
        devices = [device] if device is not None else sorted(self.groups)
        return [r.actor for d in devices for r in self.live(d)]

    # -- probing failed replicas (never blocks: ray.wait with timeout 0) -----------------------------------
    def _probe_locked(self, replica: Replica) -> None:
        if replica.probe is None and time.monotonic() >= replica.probe_after:
            replica.probe = replica.actor.describe.remote()

    def _poll_probes_locked(self) -> None:
        ray = self._ray
        watched = [r for replicas in self.groups.values() for r in replicas if r.unconfirmed]
        if not watched:
            return
        pending = [r.probe for r in watched if r.probe is not None]
        done = set(ray.wait(pending, num_returns=len(pending), timeout=0)[0]) if pending else set()
        now = time.monotonic()
        for r in watched:
            if r.probe is not None and r.probe in done:
                ref, r.probe = r.probe, None
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayError as exc:  # still down (or gone for good)
                    logger.info("replica %s: probe failed (%s)", r.name, type(exc).__name__)
                    r.probe_after = now + PROBE_BACKOFF_S
                    if isinstance(exc, ray.exceptions.ActorDiedError) and self._dead_for_good(r):
                        self._evict_locked(r)  # no restart will come (e.g. Ray killed it after a failed transfer)
                        continue
                else:
                    if info["started_at"] != r.started_at:
                        r.started_at = info["started_at"]
                        r.restarts += 1
                        self.restarts += 1
                    if info.get("version", self.placement.version) != self.placement.version:
                        # Restarted with the placement it was created with: load the current one, then serve.
                        v, d = self.placement.version, r.device
                        r.probe = r.actor.adopt_layout.remote(v, self.placement.experts_on(d),
                                                              self.placement.layer_overrides(d))
                        continue
                    r.grpc_address = info["grpc_address"] or r.grpc_address
                    r.node_id = info.get("node_id", r.node_id)
                    r.down_since, r.unconfirmed = None, False
                    continue
            if r.down_since is not None and now - r.down_since > self.evict_after_s:
                self._evict_locked(r)
            else:
                self._probe_locked(r)

    def cluster_gpus(self) -> float:
        """GPUs in the Ray cluster (all nodes)."""
        return float(self._ray.cluster_resources().get("GPU", 0))

    def _dead_for_good(self, replica: Replica) -> bool:
        """Ray's own record says the actor is DEAD (not RESTARTING): waiting for it is pointless."""
        from ray._private.state import state  # the GCS actor table; the public state API needs the dashboard

        try:
            return state.actor_table(replica.actor._actor_id.hex()).get("State") == "DEAD"
        except Exception as exc:  # no answer: fall back to the deadline
            logger.info("replica %s: actor state unknown (%s)", replica.name, type(exc).__name__)
            return False

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
