"""A gateway's view of the expert mesh: the replicas to call (directly: the control actor is never on the data path),
kept current by a heartbeat that long-polls the control actor, and the placement versions this gateway uses."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from gateway.config import DeploymentConfig
from gateway.dispatch.mesh.directory import MeshDirectory
from gateway.dispatch.replica_choice import Replica, ReplicaChooser
from router_service.placement import Placement

logger = logging.getLogger(__name__)

HEARTBEAT_WAIT_S = 1.0  # how long one heartbeat waits at the control actor for a newer directory
CONTROL_RETRY_S = 0.5  # after a failed heartbeat (the control actor restarts): serving goes on meanwhile
CHANGE_TIMEOUT_S = 600.0  # staging a placement or scaling, at the control actor


class MeshView(ReplicaChooser):
    """The replicas of mesh `name` as this gateway sees them. Choosing and probing are the gateway's own
    (ReplicaChooser); which replicas exist, their placement and every change come from the control actor.

    on_placement(placement): set by the gateway (`follow_placements`); called from the heartbeat thread when the
    mesh offers a newer placement (the gateway switches to it at its next step boundary, then calls `switch`)."""

    def __init__(self, cfg: DeploymentConfig, control: Any, directory: MeshDirectory, gateway: str, *,
                 owner: bool, started_ray: bool) -> None:
        super().__init__(directory.placement, cfg.rpc.replica_deadline_s)
        self.cfg, self.control, self.gateway, self.owner = cfg, control, gateway, owner
        self.started_ray = started_ray
        self.name = self.deployment_id = directory.name
        self.offered = directory.placement  # the newest placement the mesh offers
        self.epoch = -1
        self.on_placement: Callable[[Placement], None] | None = None
        self.control_failures = 0  # heartbeats that found the control actor down
        self._apply(directory)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"mesh-{self.name}", daemon=True)
        self._heartbeat.start()

    # -- what the directory says ------------------------------------------------------------------------------------
    def _apply(self, directory: MeshDirectory) -> Placement | None:
        """Bring the replica list up to `directory`; returns its placement when it is newer than the one offered."""
        with self._lock:
            if directory.epoch <= self.epoch:
                return None
            known = {r.name: r for rs in self.groups.values() for r in rs}
            groups: dict[int, list[Replica]] = {d: [] for d in range(directory.placement.n_devices)}
            for e in directory.replicas:
                r = known.get(e.name)
                if r is None:
                    r = Replica(e.device, e.index, e.actor, None, e.name, e.grpc_address, e.started_at, e.node_id)
                elif e.started_at != r.started_at and e.grpc_address:  # restarted: the mesh read its new address
                    r.grpc_address, r.started_at, r.node_id = e.grpc_address, e.started_at, e.node_id
                r.draining = e.draining
                groups[e.device].append(r)
            self.groups = groups
            self.epoch = directory.epoch
            self.restarts = max(self.restarts, directory.restarts)
            self.evicted = directory.evicted
            if directory.placement.version > self.offered.version:
                self.offered = directory.placement
                return directory.placement
            return None

    def refresh(self) -> None:
        """Read the directory now (after a change this gateway asked for)."""
        self._offer(self._apply(self._ray.get(self.control.directory.remote(), timeout=CHANGE_TIMEOUT_S)))

    def _offer(self, placement: Placement | None) -> None:
        if placement is not None and self.on_placement is not None:
            self.on_placement(placement)

    # -- ReplicaChooser's hooks -----------------------------------------------------------------------------------
    def _back_up_locked(self, replica: Replica, info: dict) -> bool:
        """A restarted replica serves this gateway once it holds the placement version the gateway uses (the control
        actor makes it load the current one)."""
        return self.placement.version in info.get("versions", [info.get("version")])

    def _gone_locked(self, replica: Replica) -> None:
        """Replacing it is the control actor's decision: tell it, and keep avoiding the replica meanwhile."""
        replica.probe_after = time.monotonic() + 1.0
        self._tell(self.control.report_down, replica.name)

    def failed(self, replica: Replica) -> None:
        super().failed(replica)
        self._tell(self.control.report_down, replica.name)

    def _tell(self, method: Any, *args: Any) -> None:
        try:
            method.remote(*args)  # fire and forget: the control actor may be restarting
        except Exception as exc:
            logger.info("mesh %s: could not reach the control actor (%s)", self.name, type(exc).__name__)

    # -- changes (the control actor decides them; this gateway follows) ----------------------------------------------
    def stage(self, placement: Placement) -> None:
        """Have the mesh load `placement` on every replica and offer it (to every attached gateway)."""
        self._ray.get(self.control.stage.remote(placement), timeout=CHANGE_TIMEOUT_S)
        self.refresh()

    @contextlib.contextmanager
    def placement_change(self) -> Iterator[None]:
        yield  # the control actor holds its own lock from staging to offering

    def switch(self, placement: Placement) -> None:
        """This gateway dispatches with `placement` from now on (its next heartbeat says so)."""
        with self._lock:
            self.placement = placement

    def release_placements(self, keep: int) -> None:
        """Tell the mesh this gateway moved to `keep`; it frees older copies once every attached gateway has."""
        self._ray.get(self.control.moved.remote(self.gateway, keep), timeout=CHANGE_TIMEOUT_S)

    def scale(self, device: int, replicas: int, drain_timeout_s: float = 60.0) -> list[int]:
        """Set group `device` to `replicas` replicas, for every gateway of the mesh; returns the live indices."""
        if device not in self.groups:
            raise ValueError(f"group={device}: expected 0..{len(self.groups) - 1}")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas={replicas!r}: expected an integer >= 1")
        live, _ = self._ray.get(self.control.scale.remote(device, replicas, drain_timeout_s),
                                timeout=CHANGE_TIMEOUT_S)
        self.refresh()
        return live

    shared = True

    @property
    def members_epoch(self) -> int:
        return self.epoch

    def follow_placements(self, on_placement: Callable[[Placement], None]) -> None:
        self.on_placement = on_placement

    def decided(self, placement: Placement) -> Placement:
        """The mesh's placement once `placement` was staged (after `stage`'s refresh): the one its control actor
        staged for that version (or a newer one), whichever gateway proposed it."""
        with self._lock:
            return self.offered if self.offered.version >= placement.version else placement

    def shared_relay(self, transport: str, timeout_s: float) -> Any:
        """The mesh's RDT relay (one for all gateways: its collective group spans the replicas)."""
        return self._ray.get(self.control.relay_handle.remote(transport, timeout_s), timeout=60)

    def relay_lost(self, relay: Any) -> None:
        """The control actor replaces the mesh's relay once, for every gateway."""
        self._tell(self.control.relay_lost, relay)

    def status(self) -> dict:
        return self._ray.get(self.control.status.remote(), timeout=60)

    # -- the heartbeat ---------------------------------------------------------------------------------------------
    def _busy(self) -> dict[str, int]:
        with self._lock:
            return {r.name: r.inflight for rs in self.groups.values() for r in rs if r.draining and r.inflight}

    def _heartbeat_loop(self) -> None:
        ray = self._ray
        while not self._stop.is_set():
            try:
                ref = self.control.sync.remote(self.gateway, self.placement.version, self.epoch, self._busy(),
                                               HEARTBEAT_WAIT_S)
                directory = ray.get(ref, timeout=HEARTBEAT_WAIT_S + 30)
            except Exception as exc:  # the control actor died or restarts: the data path does not need it
                if self._stop.is_set():
                    return
                self.control_failures += 1
                logger.info("mesh %s: heartbeat failed (%s); serving on", self.name, type(exc).__name__)
                self._stop.wait(CONTROL_RETRY_S)
                continue
            if directory is not None:
                try:
                    self._offer(self._apply(directory))
                except Exception:
                    logger.exception("mesh %s: applying directory epoch %d failed", self.name, directory.epoch)

    def shutdown(self) -> None:
        """Detach (and stop the mesh, when this gateway started it privately)."""
        ray = self._ray
        self._stop.set()
        self._heartbeat.join(timeout=HEARTBEAT_WAIT_S + 5)
        try:
            if self.owner:
                ray.get(self.control.shutdown.remote(), timeout=120)
                ray.kill(self.control, no_restart=True)
            else:
                ray.get(self.control.detach.remote(self.gateway), timeout=30)
        except ray.exceptions.RayError as exc:
            logger.warning("mesh %s: %s failed (%s)", self.name, "shutdown" if self.owner else "detach",
                           type(exc).__name__)
        with self._lock:
            self.groups = {d: [] for d in self.groups}
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def new_gateway_id() -> str:
    return f"gw-{uuid.uuid4().hex[:8]}"
