"""Choosing an expert-group replica for each call: least loaded first, failed ones avoided and probed in the background.

`ReplicaChooser` is what the transports see. `ExpertGroupPool` (replica_pool.py) owns its replicas and replaces the
dead; a gateway's `MeshView` (mesh/view.py) chooses among the replicas the mesh's control actor lists.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from router_service.placement import Placement

logger = logging.getLogger(__name__)

PROBE_BACKOFF_S = 0.2  # between probes of a replica that stays down


class NoLiveReplica(RuntimeError):
    """A device group has no replica that can take traffic."""


@dataclass
class Replica:
    """One ExpertGroupActor serving one device group's experts. Fields change only under the chooser's lock."""

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
    """The replicas' counters at one moment, as plain data."""

    live: dict[int, int]  # group -> live replicas
    inflight: dict[tuple[int, int], int]  # (group, replica index) -> calls in flight, draining replicas included
    restarts: int  # restarts Ray made, seen by probes
    evicted: int  # replicas removed because they stayed down


class ReplicaChooser:
    """`groups[d]`: the replicas of device group d. `pick` hands out the least loaded live one; `failed` marks one
    down and probes it without blocking anyone (`describe` answers once Ray restarted it, with its new gRPC
    address). Subclasses say what happens when a restarted replica answers (`_back_up_locked`) and when one
    stays down past `evict_after_s` or is dead for good (`_gone_locked`)."""

    def __init__(self, placement: Placement, evict_after_s: float) -> None:
        import ray

        self._ray = ray
        self.placement = placement
        self.evict_after_s = evict_after_s
        self.groups: dict[int, list[Replica]] = {d: [] for d in range(placement.n_devices)}
        self._lock = threading.Lock()
        self._rr: dict[int, int] = {}  # per group: round-robin among equally loaded replicas
        self.restarts = 0  # restarts Ray made, seen by probes
        self.evicted = 0  # replicas removed because they stayed down

    # -- what a mesh's view answers differently (MeshView); a gateway's own pool answers these ---------------------
    shared = False  # whether the replicas are a mesh's, serving other gateways too (MeshView: True)

    @property
    def members_epoch(self) -> int | None:
        """The version of the replica list that gateways sharing these replicas agree on (a mesh's directory
        epoch); None: the list is this gateway's own."""
        return None

    def shared_relay(self, transport: str, timeout_s: float) -> Any | None:
        """The RDT relay every gateway of a shared mesh calls through (its collective group spans the replicas);
        None: the gateway starts its own."""
        return None

    def relay_lost(self, relay: Any) -> None:
        """A shared relay died under a call (a mesh replaces it once for all gateways); nothing for an own one."""

    def follow_placements(self, on_placement: Callable[[Placement], None]) -> None:
        """Call `on_placement` when the replicas' owner offers a newer placement (a mesh, decided once for every
        gateway); a gateway's own pool changes placement only when the gateway does, so never here."""

    def decided(self, placement: Placement) -> Placement:
        """What the replicas hold once `placement` was staged: `placement` itself for a gateway's own pool. A mesh
        decides once: another gateway's proposal of the same version may have been staged instead."""
        return placement

    # -- hooks ----------------------------------------------------------------------------------------------------
    def _back_up_locked(self, replica: Replica, info: dict) -> bool:
        """A probe of a failed replica answered `info` (describe()): whether it serves this chooser's placement
        now. False: probe again later (a subclass may have started something that makes it so)."""
        raise NotImplementedError

    def _gone_locked(self, replica: Replica) -> None:
        """`replica` is dead for good or stayed down past evict_after_s."""
        raise NotImplementedError

    # -- choosing replicas --------------------------------------------------------------------------------------
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
        """Apply what finished probes found (restarts, new gRPC addresses), start due ones, give up on the long
        dead. Every pick does this; the engine loop calls it while no traffic flows (a metrics scrape never does)."""
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

    def cluster_gpus(self) -> float:
        """GPUs in the Ray cluster (all nodes)."""
        return float(self._ray.cluster_resources().get("GPU", 0))

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
                        self._gone_locked(r)  # no restart will come (e.g. Ray killed it after a failed transfer)
                        continue
                else:
                    if info["started_at"] != r.started_at:
                        r.started_at = info["started_at"]
                        r.restarts += 1
                        self.restarts += 1
                    if not self._back_up_locked(r, info):
                        if r.probe is None:
                            r.probe_after = now + PROBE_BACKOFF_S
                        continue
                    r.grpc_address = info["grpc_address"] or r.grpc_address
                    r.node_id = info.get("node_id", r.node_id)
                    r.down_since, r.unconfirmed = None, False
                    continue
            if r.down_since is not None and now - r.down_since > self.evict_after_s:
                self._gone_locked(r)
            else:
                self._probe_locked(r)

    def _dead_for_good(self, replica: Replica) -> bool:
        """Ray's own record says the actor is DEAD (not RESTARTING): waiting for it is pointless."""
        from ray._private.state import state  # the GCS actor table; the public state API needs the dashboard

        try:
            return state.actor_table(replica.actor._actor_id.hex()).get("State") == "DEAD"
        except Exception as exc:  # no answer: fall back to the deadline
            logger.info("replica %s: actor state unknown (%s)", replica.name, type(exc).__name__)
            return False
