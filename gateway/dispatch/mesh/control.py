"""The mesh's control actor: it owns the expert-group replicas, the placement and its version, and the directory
gateways read; it decides every change (scaling, replacing a dead replica, re-placement) once. Never on the data path.

`ray.remote(MeshControl)` with a name makes it (see attach.py). Its state (settings, placement, replica names) is
kept in Ray's GCS key-value store, so a restarted control actor adopts the live replicas instead of starting new
ones, and gateways re-register with their next heartbeat.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from expert_workers.actor import ExpertGroupActor
from gateway.config import DeploymentConfig
from gateway.dispatch.first_placement import initial_placement
from gateway.dispatch.mesh.directory import MeshDirectory, ReplicaEntry, check_fingerprint, fingerprint
from gateway.dispatch.replica_pool import ExpertGroupPool, Replica
from model_core.spec import ModelSpec
from router_service.placement import Placement

logger = logging.getLogger(__name__)

STATE_NAMESPACE = "expertmesh-mesh"  # Ray's internal key-value store: one key per mesh name
WATCH_INTERVAL_S = 0.2


def state_key(name: str) -> bytes:
    return f"state/{name}".encode()


def load_state(name: str) -> dict | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(state_key(name), namespace=STATE_NAMESPACE)
    return pickle.loads(raw) if raw else None


def drop_state(name: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(state_key(name), namespace=STATE_NAMESPACE)


@dataclass
class Attached:
    """A gateway attached to the mesh, as its latest heartbeat left it."""

    version: int  # the placement version it dispatches with
    epoch: int  # the directory epoch it has applied
    last_seen: float  # monotonic
    busy: dict[str, int] = field(default_factory=dict)  # draining replica name -> its calls in flight there


class MeshControl:
    """Plain class; `ray.remote(MeshControl).options(name=..., max_concurrency=...)` makes the actor."""

    def __init__(self, name: str, cfg: DeploymentConfig, detached: bool = True,
                 actor_class: type = ExpertGroupActor) -> None:
        self.name, self.cfg = name, cfg
        self.fingerprint = fingerprint(cfg)
        self._cond = threading.Condition()  # guards gateways, epoch, _key; notified when the epoch grows
        self._change = threading.Lock()  # one change (stage, scale) at a time
        self.gateways: dict[str, Attached] = {}
        self.epoch = 0
        self.created_at = time.time()
        state = load_state(name)
        if state is not None and state["fingerprint"] == self.fingerprint:
            placement, adopt = state["placement"], state["replicas"]
            self.epoch, self.created_at = state["epoch"] + 1, state["created_at"]
            self.rebuilds = state.get("rebuilds", 0) + 1
            logger.warning("mesh %s: control actor restarted; adopting %d replicas", name, len(adopt))
        else:
            placement, adopt, self.rebuilds = initial_placement(cfg, ModelSpec.from_dir(cfg.model)), None, 0
        self.released = True  # whether replicas hold only the current placement
        self.pool = ExpertGroupPool(cfg, placement, actor_class, name=name, detached=detached, adopt=adopt,
                                    drained=self._drained)
        self.relay: Any = None
        self.relay_starts = 0
        self._watches: dict[str, Any] = {}  # replica name -> its pending rdt_watch() call: fails when it dies
        self._key = self._directory_key()
        self._save()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_loop, name="mesh-watch", daemon=True)
        self._watcher.start()

    # -- gateways ---------------------------------------------------------------------------------------------------
    def attach(self, gateway: str, wanted: dict[str, Any]) -> MeshDirectory:
        """Register `gateway` (raises DeploymentConfigError when its settings differ from the mesh's)."""
        check_fingerprint(self.name, self.fingerprint, wanted)
        with self._cond:
            self.gateways[gateway] = Attached(self.pool.placement.version, self.epoch, time.monotonic())
        logger.info("mesh %s: gateway %s attached (%d attached)", self.name, gateway, len(self.gateways))
        return self.directory()

    def sync(self, gateway: str, version: int, epoch: int, busy: dict[str, int], wait_s: float = 1.0
             ) -> MeshDirectory | None:
        """A gateway's heartbeat: it dispatches with placement `version`, has applied directory `epoch` and has
        `busy` calls in flight on draining replicas. Returns the directory once its epoch is above `epoch` (waiting
        up to wait_s), else None."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self.gateways[gateway] = Attached(version, epoch, time.monotonic(), dict(busy))
            self._cond.notify_all()
            while self.epoch <= epoch and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
        return self.directory()

    def moved(self, gateway: str, version: int) -> bool:
        """`gateway` dispatches with placement `version` now; returns whether the replicas then hold only it."""
        with self._cond:
            record = self.gateways.get(gateway)
            if record is not None:
                record.version = max(record.version, version)
        return self._release_if_moved()

    def detach(self, gateway: str) -> None:
        """`gateway` closed. The last one to go stops the mesh when mesh.stop_with_last_gateway is set."""
        with self._cond:
            self.gateways.pop(gateway, None)
            last = not self.gateways
        logger.info("mesh %s: gateway %s detached", self.name, gateway)
        if last and self.cfg.mesh.stop_with_last_gateway:
            threading.Thread(target=self._stop_self, name="mesh-stop", daemon=True).start()
            return
        self._release_if_moved()

    def _stop_self(self) -> None:
        import ray

        logger.info("mesh %s: its last gateway detached; stopping (mesh.stop_with_last_gateway)", self.name)
        self.shutdown()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def report_down(self, replica: str) -> None:
        """A gateway's call on `replica` failed as if it died: probe it (and replace it if it stays down)."""
        r = self._replica(replica)
        if r is not None:
            self.pool.failed(r)

    # -- changes, decided here once -----------------------------------------------------------------------------
    def stage(self, placement: Placement) -> int:
        """Load `placement` on every replica beside the current one, then offer it to the gateways (each switches
        at its own step boundary); returns the epoch that offers it. A version already offered returns at once."""
        with self._change:
            current = self.pool.placement.version
            if placement.version == current:
                return self.epoch
            if placement.version < current:
                raise ValueError(f"placement.version={placement.version}: expected > the mesh's {current}")
            with self.pool.placement_change():
                self.pool.stage(placement)
                self.pool.switch(placement)
            self.released = False
            return self._publish()

    def scale(self, device: int, replicas: int, drain_timeout_s: float = 60.0) -> tuple[list[int], int]:
        """Run `replicas` replicas of group `device`: (live replica indices, the epoch that lists them). Removed
        replicas leave the directory first and stop once no attached gateway has calls in flight on them."""
        with self._change:
            live = self.pool.scale(device, replicas, drain_timeout_s)
            return live, self._publish()

    def _drained(self, victims: list[Replica]) -> bool:
        """The pool's drain check: the gateways saw the victims leave (they draining in the epoch they applied) and
        none has calls in flight on them."""
        epoch = self._publish()
        names = {v.name for v in victims}
        with self._cond:
            return all(g.epoch >= epoch and not any(g.busy.get(n, 0) for n in names) for g in self.gateways.values())

    # -- the RDT relay (one per mesh: its collective group spans the replicas, whichever gateway calls) -----------
    def relay_handle(self, transport: str, timeout_s: float) -> Any:
        with self._cond:
            if self.relay is None:
                import ray

                from gateway.dispatch.transports.rdt import RdtRelay

                gpu = transport == "nccl"
                self.relay = ray.remote(RdtRelay).options(
                    max_concurrency=64, num_cpus=0, num_gpus=0.01 if gpu else 0, max_restarts=0,
                    namespace=self.cfg.ray.namespace, name=f"rdt-relay-{self.name}-{self.relay_starts}",
                ).remote(transport, timeout_s, "cuda" if gpu else "cpu")
                self.relay_starts += 1
            return self.relay

    def relay_lost(self, relay: Any) -> None:
        with self._cond:
            if self.relay is not None and relay is not None and self.relay._actor_id == relay._actor_id:
                logger.warning("mesh %s: the RDT relay died; the next call starts a new one", self.name)
                self.relay = None

    # -- reading -------------------------------------------------------------------------------------------------------
    def directory(self) -> MeshDirectory:
        pool = self.pool
        with pool._lock:
            entries = tuple(ReplicaEntry(r.device, r.index, r.name, r.actor, r.grpc_address, r.started_at, r.node_id,
                                         r.draining) for d in sorted(pool.groups) for r in pool.groups[d])
            restarts, evicted = pool.restarts, pool.evicted
        return MeshDirectory(self.name, self.epoch, pool.placement, entries, restarts, evicted)

    def status(self, load: bool = True) -> dict:
        """Groups, replicas, placement version, attached gateways, and (load) each replica's merge counters and
        the expert weights it holds."""
        import ray

        d = self.directory()
        now = time.monotonic()
        with self._cond:
            gateways = {g: {"version": a.version, "epoch": a.epoch, "seen_s_ago": round(now - a.last_seen, 2)}
                        for g, a in sorted(self.gateways.items())}
        replicas = [{"group": r.device, "index": r.index, "name": r.name, "grpc": r.grpc_address,
                     "node": r.node_id, "draining": r.draining, "started_at": r.started_at} for r in d.replicas]
        if load:
            refs = [(r.actor.merge_stats.remote(), r.actor.memory.remote()) for r in d.replicas]
            for entry, (stats, memory) in zip(replicas, refs, strict=True):
                for key, ref in (("load", stats), ("memory", memory)):
                    try:
                        entry[key] = ray.get(ref, timeout=10)
                    except ray.exceptions.RayError as exc:
                        entry[key] = {"error": type(exc).__name__}
        return {"name": self.name, "epoch": self.epoch, "placement_version": d.placement.version,
                "released": self.released, "groups": d.placement.n_devices, "replicas": replicas,
                "gateways": gateways, "restarts": d.restarts, "evicted": d.evicted, "rebuilds": self.rebuilds,
                "model": self.fingerprint["model"], "created_at": self.created_at}

    def shutdown(self) -> None:
        """Stop every replica and the relay and forget the mesh's state (`expertmesh mesh down`)."""
        import ray

        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            relay, self.relay = self.relay, None
        self._watcher.join(timeout=5)
        if relay is not None:
            ray.kill(relay, no_restart=True)
        self.pool.shutdown()
        drop_state(self.name)

    # -- inside ----------------------------------------------------------------------------------------------------
    def _replica(self, name: str) -> Replica | None:
        with self.pool._lock:
            return next((r for rs in self.pool.groups.values() for r in rs if r.name == name), None)

    def _directory_key(self) -> tuple:
        pool = self.pool
        with pool._lock:
            return (pool.placement.version, tuple((r.name, r.grpc_address, r.started_at, r.draining)
                                                  for d in sorted(pool.groups) for r in pool.groups[d]))

    def _publish(self) -> int:
        """Grow the epoch when the directory changed (gateways waiting in `sync` get it); the current epoch."""
        key = self._directory_key()
        with self._cond:
            if key != self._key:
                self._key = key
                self.epoch += 1
                self._cond.notify_all()
                changed = True
            else:
                changed = False
            epoch = self.epoch
        if changed:
            self._save()
        return epoch

    def _save(self) -> None:
        from ray.experimental import internal_kv

        pool = self.pool
        with pool._lock:
            replicas = [(r.device, r.index, r.name) for rs in pool.groups.values() for r in rs]
            placement = pool.placement
        state = {"fingerprint": self.fingerprint, "placement": placement, "replicas": replicas, "epoch": self.epoch,
                 "created_at": self.created_at, "rebuilds": self.rebuilds}
        internal_kv._internal_kv_put(state_key(self.name), pickle.dumps(state), overwrite=True,
                                     namespace=STATE_NAMESPACE)

    def _release_if_moved(self) -> bool:
        """Free old placement versions once every attached gateway dispatches with the current one."""
        if self.released:
            return True
        if not self._change.acquire(blocking=False):  # a change in progress: the watch loop tries again
            return False
        try:
            current = self.pool.placement.version
            with self._cond:
                if any(g.version < current for g in self.gateways.values()):
                    return False
            self.pool.release_placements(current)
            self.released = True
            logger.info("mesh %s: every gateway moved to placement version %d; old copies released", self.name,
                        current)
            return True
        finally:
            self._change.release()

    def _watch_loop(self) -> None:
        """Apply probes (restarts, replacements), notice dead replicas, drop silent gateways, release old copies."""
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                self._watch_once()
            except Exception:  # the loop must outlive one bad pass
                logger.exception("mesh %s: watch pass failed", self.name)

    def _watch_once(self) -> None:
        import ray

        pool = self.pool
        pool.poll()
        with pool._lock:
            replicas = {r.name: r for rs in pool.groups.values() for r in rs}
        for name in list(self._watches):
            if name not in replicas:
                del self._watches[name]
        fired = ray.wait(list(self._watches.values()), num_returns=len(self._watches), timeout=0)[0] \
            if self._watches else []
        for name, ref in list(self._watches.items()):
            if ref in fired:
                del self._watches[name]
                pool.failed(replicas[name])
        for name, r in replicas.items():
            if name not in self._watches and not r.unconfirmed:
                self._watches[name] = r.actor.rdt_watch.remote()
        now, limit = time.monotonic(), self.cfg.mesh.gateway_timeout_s
        with self._cond:
            for g in [g for g, a in self.gateways.items() if now - a.last_seen > limit]:
                logger.warning("mesh %s: gateway %s silent for over %.0fs; detached", self.name, g, limit)
                del self.gateways[g]
        self._publish()
        if not self.released:
            self._release_if_moved()
