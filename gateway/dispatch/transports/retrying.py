"""Calls to a replica pool, sent again when a replica dies or is slow: the base of the Ray, gRPC and RDT transports."""

from __future__ import annotations

import logging
import os
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from gateway.dispatch.replica_choice import NoLiveReplica
from gateway.dispatch.transports.interface import DispatchError, ExpertCall, ExpertReply, Transport, describe_error

logger = logging.getLogger(__name__)

# Ray passes an argument up to this size inside the call itself, and puts a larger one in the object store: a
# call whose rows reach it reads the layer's shared batch instead (gRPC uses the same default; not tuned for it).
SHARE_MIN_BYTES = int(os.environ.get("RAY_max_direct_call_object_size", 100 * 1024))


class ReplicaDown(RuntimeError):
    """The replica's actor died or restarts: send the call again (another replica, or the restarted one)."""


class ReplicaSlow(RuntimeError):
    """The call ran past `timeout_s`: the replica may still be computing it, so never send it there again."""


@dataclass(eq=False)
class SharedBatch:
    """A layer's whole hidden batch, put at most once for all of the layer's calls that read it (`handle`: Ray's
    ObjectRef, or gRPC's BatchFile; it stays valid while any of their calls may be sent again)."""

    hidden: torch.Tensor  # [T, H]
    handle: Any = None
    failed: bool = False  # it could not be put (no room): the calls carry their rows


@dataclass(eq=False)
class ReplicaCall:
    """An ExpertCall in flight on one replica: the handle a replica transport's `send` returns. A call sent again
    (after a failure) is a new ReplicaCall with the same `call` and `shared`."""

    call: ExpertCall
    shared: SharedBatch | None  # the layer's batch when this call may read it instead of carrying its rows
    replica: Any = None  # the pool's Replica
    future: Any = None  # the transport's own: a Ray ObjectRef, a gRPC future, ...


class ReplicaTransport(Transport):
    """Shared retry logic over a replica pool (expert compute is pure, so sending a call again is safe).

    - A replica that died or restarts: the call goes again to a live replica, or waits for the restarted one,
      until `deadline_s` has passed; the pool probes the failed replica without blocking the caller.
    - A replica that did not answer within `timeout_s`: the call goes to another replica if the group has
      one; it is never queued again behind itself on the same serial actor (that would double the load of an
      overloaded actor). With no other replica the call fails with the timeout named.
    - Every call's in-flight count is released exactly once, whatever happens to the other calls of the layer.

    A subclass says how one call moves: `_start` sends it to a replica, `_wait` blocks for its reply (raising
    ReplicaDown or ReplicaSlow for the cases above), `_finished` polls, `_cancel` and `_settle` wind calls down.
    """

    def __init__(self, pool, timeout_s: float, deadline_s: float) -> None:
        self.pool, self.timeout_s, self.deadline_s = pool, timeout_s, deadline_s
        self.retries = 0
        self.tracer = None
        self._orphans: list[ReplicaCall] = []  # timed-out calls still running on their replica
        # Shared layer batches (Ray's object store, or a file in /dev/shm for gRPC): off unless a transport sets
        # share_min_bytes, the smallest rows-of-one-call size that reads the shared batch instead.
        self.share_min_bytes: int | None = None
        self.node_id: str | None = None  # the gateway's Ray node: replicas on it can read a shared batch
        self.shared_puts = 0  # layer batches put where the replicas on the gateway's node read them
        self.shared_calls = 0  # calls that read one
        self._batch: SharedBatch | None = None  # this layer's, until flush()

    # -- how one call moves (each transport's own) -------------------------------------------------------------
    @abstractmethod
    def _start(self, replica, flight: ReplicaCall) -> Any:
        """Send `flight.call` to `replica`; returns the future to store in `flight.future`."""

    @abstractmethod
    def _wait(self, flight: ReplicaCall) -> ExpertReply:
        """Block for the reply (at most `timeout_s`). Raises ReplicaDown (send again), ReplicaSlow (timed out),
        DispatchError or anything else (fails the call)."""

    @abstractmethod
    def _finished(self, flight: ReplicaCall) -> bool:
        """Whether the call is over on its replica (a timed-out call's in-flight count waits for it)."""

    @abstractmethod
    def _cancel(self, flight: ReplicaCall) -> None:
        """Stop the call where the transport can (a layer that already failed does not need it)."""

    @abstractmethod
    def _settle(self, flights: list[ReplicaCall], timeout_s: float) -> None:
        """Wait up to `timeout_s` for cancelled or abandoned calls to end."""

    # -- the Transport interface ---------------------------------------------------------------------------------
    def send(self, call: ExpertCall) -> ReplicaCall:
        return self._submit(ReplicaCall(call, self._layer_batch(call)))

    def flush(self) -> None:
        self._batch = None  # each send is already in flight; the next layer's calls share the next layer's batch

    def receive(self, calls: list[ExpertCall], handles: list[ReplicaCall]) -> list[ExpertReply]:
        """Every call's reply, in order. After the first call that fails for good, the rest are abandoned
        (released, cancelled where the transport can) and the failure is raised."""
        self._sweep_orphans()
        replies, failure, abandoned = [], None, []
        for flight in handles:
            if failure is not None:
                abandoned.append(flight)
                continue
            try:
                replies.append(self._result(flight))
            except DispatchError as exc:
                failure = exc
            except Exception as exc:  # a bug or an unexpected client error: still abandon the rest cleanly
                failure = DispatchError(f"group {flight.call.device}, layer {flight.call.layer}: "
                                        f"{describe_error(exc)}")
                failure.__cause__ = exc
        if failure is not None:
            self._abandon(abandoned)
            raise failure
        return replies

    def close(self) -> None:
        for flight in self._orphans:
            self._cancel(flight)
            self.pool.release(flight.replica)
        self._orphans = []
        self.pool = None

    def stage_placement(self, placement) -> None:
        self.pool.stage(placement)

    def switch_placement(self, placement) -> None:
        self.pool.switch(placement)

    def release_placements(self, keep: int) -> None:
        self.pool.release_placements(keep)

    # -- shared layer batches ------------------------------------------------------------------------------------
    def _layer_batch(self, call: ExpertCall) -> SharedBatch | None:
        """The layer's shared batch for a call whose rows reach share_min_bytes (one for all of the layer's
        calls, put when the first call that reads it is made), or None: the call carries its rows."""
        hidden, rows = call.hidden, call.rows
        if rows is None or self.share_min_bytes is None \
                or rows.numel() * hidden.shape[1] * hidden.element_size() < self.share_min_bytes:
            return None
        if self._batch is None or self._batch.hidden is not hidden:
            self._batch = SharedBatch(hidden)
        return self._batch

    def _on_gateway_node(self, replica) -> bool:
        return replica.node_id is not None and replica.node_id == self.node_id

    # -- replicas, retries and in-flight counts ------------------------------------------------------------------
    def _submit(self, flight: ReplicaCall, avoid: tuple = (), strict: bool = False,
                deadline: float | None = None) -> ReplicaCall:
        """Send the call to a replica of its group (not one in `avoid`); a new ReplicaCall for that replica."""
        device = flight.call.device
        while True:
            try:
                replica = self.pool.pick(device, avoid, strict)
                break
            except NoLiveReplica:
                if strict:
                    raise
                if deadline is None:
                    deadline = time.monotonic() + self.deadline_s
                if time.monotonic() > deadline:
                    raise DispatchError(f"group {device}: no live replica for {self.deadline_s}s") from None
                time.sleep(0.05)
        sent = ReplicaCall(flight.call, flight.shared, replica)
        try:
            sent.future = self._start(replica, sent)
        except Exception:
            self.pool.release(replica)
            raise
        return sent

    def _result(self, flight: ReplicaCall) -> ExpertReply:
        device, layer = flight.call.device, flight.call.layer
        deadline, pause = time.monotonic() + self.deadline_s, 0.05
        slow: tuple = ()  # replicas that timed out on this call: it is never sent to them again
        while True:
            try:
                reply = self._wait(flight)
            except ReplicaDown as exc:
                self.pool.release(flight.replica)
                self.pool.failed(flight.replica)
                self.retries += 1
                if time.monotonic() > deadline:
                    raise DispatchError(f"group {device}, layer {layer}: no replica answered within "
                                        f"{self.deadline_s}s (last error: {exc})") from None
                logger.warning("group %d layer %d: replica %s failed (%s); retrying", device, layer,
                               flight.replica.name, exc)
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                flight = self._submit(flight, avoid=(flight.replica, *slow), deadline=deadline)
                continue
            except ReplicaSlow as exc:
                self._orphans.append(flight)  # it keeps its replica's in-flight count until it really ends
                slow = (*slow, flight.replica)
                late = f"group {device}, layer {layer}: replica {flight.replica.name} did not answer within " \
                       f"rpc.timeout_s={self.timeout_s}s ({exc})"
                if time.monotonic() > deadline:
                    raise DispatchError(f"{late}; rpc.replica_deadline_s={self.deadline_s}s has passed") from None
                try:
                    flight = self._submit(flight, avoid=slow, strict=True)
                except NoLiveReplica:
                    raise DispatchError(f"{late}; no other replica can take the call") from None
                self.retries += 1
                logger.warning("group %d layer %d: replica %s timed out; sent to replica %s", device, layer,
                               slow[-1].name, flight.replica.name)
                continue
            except Exception as exc:
                self.pool.release(flight.replica)
                raise DispatchError(f"group {device}, layer {layer}: {describe_error(exc)}") from exc
            self.pool.release(flight.replica)
            self.pool.answered(flight.replica)
            return reply

    def _sweep_orphans(self) -> None:
        still = []
        for flight in self._orphans:
            if self._finished(flight):
                self.pool.release(flight.replica)
            else:
                still.append(flight)
        self._orphans = still

    def _abandon(self, flights: list[ReplicaCall]) -> None:
        """Calls of a layer that already failed: cancel what can be, wait briefly for the rest, release them."""
        for flight in flights:
            self._cancel(flight)
        self._settle(flights, min(self.timeout_s, 5.0))
        self._orphans.extend(flights)
        self._sweep_orphans()
