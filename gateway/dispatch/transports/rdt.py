"""Ray Direct Transport (`backend: ray-rdt`): a layer's rows and outputs move over Gloo, NCCL or CUDA IPC.

Ray moves Gloo/NCCL tensors only between actors of a collective group, only when an actor task returned them,
and only for the process that created the group; and when such a transfer fails it kills *both* actors for
good (docs/gpu-data-path.md). So the gateway keeps its model and state and hands each device's rows to a
disposable **relay** actor (CPU for Gloo, a GPU share of its own for NCCL) that owns the group over itself and
the live expert replicas: stage (relay) → forward_rdt (expert) → land (relay). When Ray kills the relay, the
gateway starts a new one and sends the calls again; an expert replica killed with it is replaced by the pool.
With CUDA IPC (one-sided: no group, nothing killed) a gateway that holds a Ray GPU share sends straight to
expert actors on the same GPU.

Replica choice, retries, timeouts and scaling are the `ray` transport's (`ReplicaTransport`), and so is the waiting
on Ray ObjectRefs (`RayCallTransport`).
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any

import ray
import torch

from expert_workers.collective import leave_collective_groups
from gateway.config import TENSOR_TRANSPORTS
from gateway.dispatch.transports.interface import describe_error
from gateway.dispatch.transports.ray_actor import RayCallTransport
from gateway.dispatch.transports.retrying import ReplicaCall
from protos.codec import DTYPES, NAMES, numpy_to_tensor, tensor_to_numpy

logger = logging.getLogger(__name__)

GROUP_BACKENDS = {"gloo": "torch_gloo", "nccl": "nccl"}  # CUDA IPC is one-sided: no collective group
RESET_TIMEOUT_S = 10.0  # a member that cannot leave its old group in this time is left out of the new one


def pick_tensor_transport(setting: str, gateway: torch.device, groups_on_gpu: bool, cluster_gpus: float,
                          holds_ray_gpu: bool, *, gpus_per_group: float, group_replicas: int) -> str:
    """`rpc.tensor_transport` resolved. 'auto': CUDA IPC when the gateway and every group share the cluster's one
    GPU and Ray gave this process its share (Ray's CUDA IPC only sends from such a process); NCCL when every
    group replica has whole GPUs of its own and a GPU is left for the relay (see `nccl_fits`); else Gloo, which
    carries CPU tensors from any gateway to any group. An explicit choice is checked the same way.

    gpus_per_group: each replica's `ray.gpus_per_group`; group_replicas: the replicas of all groups together."""
    if setting not in ("auto", *TENSOR_TRANSPORTS):
        raise ValueError(f"rpc.tensor_transport={setting!r}: expected 'auto' or one of {list(TENSOR_TRANSPORTS)}")
    ipc_ok = gateway.type == "cuda" and groups_on_gpu and cluster_gpus <= 1 and holds_ray_gpu
    nccl_ok = groups_on_gpu and nccl_fits(cluster_gpus, gpus_per_group, group_replicas)
    if setting == "auto":
        return "cuda_ipc" if ipc_ok else "nccl" if nccl_ok else "gloo"
    if setting == "cuda_ipc" and not ipc_ok:
        raise ValueError("rpc.tensor_transport='cuda_ipc': needs the gateway (gateway_device cuda) and every expert "
                         "group (ray.device_resource gpu) on the cluster's one GPU, and a gateway process Ray gave a "
                         "share of it (a Serve replica or actor with num_gpus; a driver has none)")
    if setting == "nccl" and not nccl_ok:
        raise ValueError(f"rpc.tensor_transport='nccl': needs expert groups on GPUs (ray.device_resource gpu), each "
                         f"replica on whole GPUs of its own (ray.gpus_per_group >= 1, here {gpus_per_group:g}) and "
                         f"a GPU of its own for the relay ({group_replicas} replicas x {gpus_per_group:g} + 1 GPUs; "
                         f"the cluster has {cluster_gpus:g})"
                         if groups_on_gpu else "rpc.tensor_transport='nccl': needs expert groups on GPUs "
                         "(ray.device_resource gpu)")
    return setting


def nccl_fits(cluster_gpus: float, gpus_per_group: float, group_replicas: int) -> bool:
    """NCCL allows one rank per GPU: every replica must hold whole GPUs (a fraction would let Ray put two groups,
    two ranks, on one GPU: NCCL's duplicate-GPU error at the group's first transfer), and the relay, a rank too,
    needs a GPU that no replica holds (its small share goes where whole-GPU replicas left room)."""
    whole = gpus_per_group >= 1 and float(gpus_per_group).is_integer()
    return whole and group_replicas >= 1 and cluster_gpus >= group_replicas * gpus_per_group + 1


class MemberDown(RuntimeError):
    """Raised by the relay: the expert replica named in the message failed or is not in the group now."""


class RdtRelay:
    """The actor that owns the collective group and moves one device batch per `forward` call.

    `ray.remote(RdtRelay).options(max_concurrency=...)` makes it: a layer's calls run on their own threads,
    and each one's stage and land tasks need free threads too. The group is (re)built lazily, with no
    transfer in flight, when the gateway's member list changes or a member's `watch` call reports that the
    actor died (a transfer to a restarted member would make Ray kill both ends)."""

    def __init__(self, transport: str, timeout_s: float, device: str = "cpu") -> None:
        if transport not in GROUP_BACKENDS:
            raise ValueError(f"transport={transport!r}: the relay carries {list(GROUP_BACKENDS)}")
        self.transport, self.timeout_s, self.device = transport, timeout_s, torch.device(device)
        self._staged: dict[int, torch.Tensor] = {}
        self._landed: dict[int, tuple] = {}
        self._expected: set[int] = set()  # keys whose caller still waits (a reply after a timeout is dropped)
        self._keys = itertools.count()
        self._cond = threading.Condition()
        self._group: Any = None
        self._version = -1
        self._members: dict[str, Any] = {}  # replica name -> actor handle, the group's members
        self._watches: dict[str, Any] = {}  # replica name -> its pending watch() call
        self._active = 0  # transfers in flight on the group
        self._one_at_a_time: dict[str, threading.Lock] = {}  # replica name -> held while a call moves to/from it
        self.builds = 0

    # -- tensors handed to Ray (one method per transport: Ray fixes it when the class is defined) ---------
    @ray.method(tensor_transport="gloo")
    def stage_gloo(self, key: int) -> torch.Tensor:
        return self._staged.pop(key)

    @ray.method(tensor_transport="nccl")
    def stage_nccl(self, key: int) -> torch.Tensor:
        return self._staged.pop(key)

    def land(self, key: int, reply: tuple) -> None:
        """reply: (output [n, H], compute_ms) as the expert group returned it."""
        if key in self._expected:
            self._landed[key] = reply

    # -- the gateway's calls ----------------------------------------------------------------------------------
    def forward(self, members: tuple, name: str, layer: int, hidden, expert_ids, weights, dtype: str,
                carrier: dict[str, str] | None = None, version: int | None = None) -> tuple:
        """One device batch on replica `name` -> (output as numpy, compute_ms).

        members: (version, {name: actor handle}) of the gateway's live replicas; hidden: numpy. The rows and the
        output cross the gateway ⇄ relay hop through the object store: Ray's CUDA IPC would need both processes
        on one Ray-assigned GPU, which it cannot promise for two actors; relay ⇄ expert is Gloo or NCCL."""
        out, ms = self._forward(members, name, layer, numpy_to_tensor(hidden, DTYPES[dtype]), expert_ids, weights,
                                carrier, version)
        return tensor_to_numpy(out.cpu()), ms

    def counters(self) -> dict:
        with self._cond:
            return {"builds": self.builds, "members": sorted(self._members), "active": self._active,
                    "staged": len(self._staged), "landed": len(self._landed)}

    def _forward(self, members, name, layer, hidden, expert_ids, weights, carrier, version) -> tuple:
        """One call at a time per replica (its expert math is serial anyway): Ray pairs a Gloo/NCCL send with the
        peer's next receive in the order each side was told of them, with no tag, so two transfers between the
        relay and one replica started from two threads (two micro-batches in flight) could pair the wrong way
        round and swap two calls' rows or outputs without an error."""
        with self._cond:
            lock = self._one_at_a_time.setdefault(name, threading.Lock())
        with lock:
            return self._forward_one(members, name, layer, hidden, expert_ids, weights, carrier, version)

    def _forward_one(self, members, name, layer, hidden, expert_ids, weights, carrier, version) -> tuple:
        me = ray.get_runtime_context().current_actor
        actor = self._enter(members, name)
        key = next(self._keys)
        self._expected.add(key)
        try:
            self._staged[key] = hidden.to(self.device)
            staged = getattr(me, f"stage_{self.transport}").remote(key)
            out = getattr(actor, f"forward_rdt_{self.transport}").remote(layer, staged, expert_ids, weights, carrier,
                                                                         version)
            try:
                ray.get(me.land.remote(key, out), timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise
            except ray.exceptions.RayError as exc:  # the expert failed: the group must not be used with it again
                self._drop_member(name)
                raise MemberDown(f"replica {name}: {describe_error(exc)}") from None
            return self._landed.pop(key)
        finally:
            self._expected.discard(key)
            self._staged.pop(key, None)
            self._landed.pop(key, None)
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    # -- the group --------------------------------------------------------------------------------------------
    def _enter(self, members: tuple, name: str) -> Any:
        """Wait until the group is current (rebuilding it when no transfer is in flight), count this transfer
        in, and return the member's actor handle."""
        version, handles = members
        with self._cond:
            while True:
                stale = self._fired_watches()
                if self._group is not None and version <= self._version and not stale:
                    break
                if self._active == 0:
                    self._rebuild(max(version, self._version), handles if version >= self._version else None)
                    break
                self._cond.wait(0.05)
            actor = self._members.get(name)
            if actor is None:
                raise MemberDown(f"replica {name} is not in the collective group (it failed, or it is starting)")
            self._active += 1
            return actor

    def _fired_watches(self) -> bool:
        refs = list(self._watches.values())
        return bool(refs) and bool(ray.wait(refs, num_returns=len(refs), timeout=0)[0])

    def _drop_member(self, name: str) -> None:
        with self._cond:
            if self._members.pop(name, None) is not None:
                self._version = -1  # the next call rebuilds over the gateway's current members
            self._watches.pop(name, None)

    def _rebuild(self, version: int, handles: dict[str, Any] | None) -> None:
        """Called with the lock held and no transfer in flight: every member leaves its groups, then the relay
        makes a new one over itself and the members that answered."""
        from ray.experimental.collective import create_collective_group, destroy_collective_group

        handles = handles if handles is not None else self._members
        old, self._group = self._group, None
        if old is not None:
            try:
                destroy_collective_group(old)
            except Exception as exc:  # a dead member's group: Ray already dropped parts of it
                logger.info("destroying the collective group: %s", describe_error(exc))
        leave_collective_groups()
        names = list(handles)
        resets = {n: handles[n].rdt_reset.remote() for n in names}
        ready = set(ray.wait(list(resets.values()), num_returns=len(resets), timeout=RESET_TIMEOUT_S)[0])
        members = {}
        for n in names:
            if resets[n] in ready:
                try:
                    ray.get(resets[n])
                    members[n] = handles[n]
                except ray.exceptions.RayError as exc:
                    logger.info("replica %s left out of the collective group: %s", n, describe_error(exc))
        me = ray.get_runtime_context().current_actor
        self._group = create_collective_group([me, *members.values()], backend=GROUP_BACKENDS[self.transport])
        watches = {n: self._watches[n] for n in members if n in self._watches
                   and not ray.wait([self._watches[n]], timeout=0)[0]}
        self._watches = {n: watches.get(n) or members[n].rdt_watch.remote() for n in members}
        self._members, self._version = members, version
        self.builds += 1
        logger.info("collective group %d (%s) over the relay and replicas %s", self.builds, self.transport,
                    sorted(members))


class RdtTransport(RayCallTransport):
    """Dispatch over Ray Direct Transport from the gateway process: through the relay (Gloo, NCCL), or straight
    to the expert actors (CUDA IPC: this process must hold a Ray GPU share). See the module docstring."""

    resend_errors = (MemberDown,)  # raised by the relay: the replica left the group

    def __init__(self, pool, transport: str, device: torch.device, timeout_s: float, deadline_s: float,
                 relay_concurrency: int = 64) -> None:
        if transport not in TENSOR_TRANSPORTS:
            raise ValueError(f"transport={transport!r}: expected one of {list(TENSOR_TRANSPORTS)}")
        super().__init__(pool, timeout_s, deadline_s)
        self.pool_at_start = pool  # close() clears self.pool
        self.transport, self.device, self.relay_concurrency = transport, device, relay_concurrency
        self._relay: Any = None
        self._relay_lock = threading.Lock()
        self._members_key: tuple = ()
        self._members_ref: Any = None
        self._version = 0
        self.relay_starts = 0

    # -- the relay and the member list it builds its group over --------------------------------------------
    def relay(self) -> Any:
        """The mesh's relay (one for all its gateways), or this gateway's own when its pool has no mesh."""
        with self._relay_lock:
            if self._relay is None:
                self._relay = self.pool.shared_relay(self.transport, self.timeout_s)
                if self._relay is None:
                    gpu = self.transport == "nccl"  # NCCL sends from the relay's own GPU
                    self._relay = ray.remote(RdtRelay).options(
                        max_concurrency=self.relay_concurrency, num_cpus=0, num_gpus=0.01 if gpu else 0,
                        max_restarts=0, namespace=self.pool.cfg.ray.namespace,
                        name=f"rdt-relay-{self.pool.deployment_id}-{self.relay_starts}",
                    ).remote(self.transport, self.timeout_s, "cuda" if gpu else "cpu")
                self.relay_starts += 1
            return self._relay

    def _lost_relay(self, relay: Any) -> None:
        with self._relay_lock:
            if self._relay is relay:
                logger.warning("the RDT relay died (Ray kills both ends of a failed transfer); starting a new one")
                self._relay = None
                self.pool.relay_lost(relay)

    def _members(self) -> Any:
        """(version, {name: handle}) of the replicas to build the relay's group over, in the object store (one copy
        per change of the names). With a mesh: every replica its directory lists as serving, versioned by the
        directory's epoch when the names change, so that gateways sharing the relay agree on which list is newer;
        else the pool's replicas that answer."""
        version = self.pool.members_epoch
        if version is not None:
            live = [(r.name, r.actor) for d in sorted(self.pool.groups) for r in self.pool.live(d)]
        else:
            live = [(r.name, r.actor) for d in sorted(self.pool.groups) for r in self.pool.live(d)
                    if r.down_since is None]
            version = None
        key = tuple(name for name, _ in live)  # a restarted member keeps its name: the relay's watch rebuilds then
        if key != self._members_key or self._members_ref is None:
            self._version = version if version is not None else self._version + 1
            self._members_key, self._members_ref = key, ray.put((self._version, dict(live)))
        return self._members_ref

    # -- calls ------------------------------------------------------------------------------------------------
    def _start(self, replica, flight: ReplicaCall) -> tuple:
        """(the reply's ObjectRef, the relay it went through or None)."""
        call = flight.call
        hidden = call.device_rows().contiguous()
        ids, weights = tensor_to_numpy(call.ids), tensor_to_numpy(call.weights)
        if self.transport == "cuda_ipc":  # one-sided: straight to the expert actor
            staged = ray.put(hidden, _tensor_transport="cuda_ipc")
            return replica.actor.forward_rdt_cuda_ipc.remote(call.layer, staged, ids, weights, call.carrier,
                                                             call.version), None
        relay = self.relay()
        return relay.forward.remote(self._members(), replica.name, call.layer, tensor_to_numpy(hidden), ids, weights,
                                    NAMES[hidden.dtype], call.carrier, call.version), relay

    def _ref(self, flight: ReplicaCall):
        return flight.future[0]

    def _actor_died(self, flight: ReplicaCall) -> None:
        relay = flight.future[1]
        if relay is not None:  # the callee is the relay: it died
            self._lost_relay(relay)

    def _output(self, out, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(out, torch.Tensor):  # CUDA IPC hands back a tensor
            return out.to(self.device)
        return numpy_to_tensor(out, dtype)

    def counters(self) -> dict:
        """The relay's group builds and what it holds (tests and /metrics); {} without a relay."""
        relay = self._relay
        if relay is None:
            return {}
        try:
            return {**ray.get(relay.counters.remote(), timeout=10), "relay_starts": self.relay_starts}
        except ray.exceptions.RayError:
            return {"relay_starts": self.relay_starts}

    def close(self) -> None:
        with self._relay_lock:
            relay, self._relay = self._relay, None
        super().close()
        if relay is not None and not self.pool_at_start.shared:  # a mesh's relay serves its other gateways
            ray.kill(relay, no_restart=True)
