"""The `ray` transport: Ray actor calls carrying numpy views (the object store reads them zero-copy), and the
waiting on Ray ObjectRefs that it shares with the `ray-rdt` transport."""

from __future__ import annotations

import torch

from expert_workers.expert_group import PlacementVersionMissing
from gateway.dispatch.transports.interface import ExpertReply, describe_error, take_rows
from gateway.dispatch.transports.retrying import (
    SHARE_MIN_BYTES,
    ReplicaCall,
    ReplicaDown,
    ReplicaSlow,
    ReplicaTransport,
)
from protos.codec import NAMES, numpy_to_tensor, tensor_to_numpy


def numpy_args(layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               carrier: dict[str, str] | None, version: int | None = None, rows: torch.Tensor | None = None) -> tuple:
    """ExpertGroupActor.forward_packed's (and forward_dag's) one argument: host numpy views (the codec makes the one
    copy off a GPU). hidden: the device's rows; or with `rows`, the layer's shared batch, and the rows go in
    hidden's place."""
    return (layer, tensor_to_numpy(hidden if rows is None else rows), tensor_to_numpy(ids), tensor_to_numpy(weights),
            NAMES[hidden.dtype], carrier, version)


class RayCallTransport(ReplicaTransport):
    """A replica transport whose futures are Ray ObjectRefs of `(output, compute_ms)`: waiting,
    polling and settling them, written once for `ray` and `ray-rdt`. A subclass names the callee errors that
    mean "send the call again" (`resend_errors`) and may say where a ref is (`_ref`), what a dead actor means
    (`_actor_died`) and how an output becomes a tensor (`_output`)."""

    resend_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, pool, timeout_s: float, deadline_s: float) -> None:
        import ray

        super().__init__(pool, timeout_s, deadline_s)
        self._ray = ray

    def _ref(self, flight: ReplicaCall):
        """The call's ObjectRef (the future itself, unless a subclass stores more beside it)."""
        return flight.future

    def _actor_died(self, flight: ReplicaCall) -> None:
        """The callee's actor died (Ray raised RayActorError or ActorUnavailableError for the call)."""

    def _output(self, out, dtype: torch.dtype) -> torch.Tensor:
        return numpy_to_tensor(out, dtype)

    def _wait(self, flight: ReplicaCall) -> ExpertReply:
        ray = self._ray
        try:
            out, ms = ray.get(self._ref(flight), timeout=self.timeout_s)
        except self.resend_errors as exc:  # the callee asks for the call again: its last line says why
            raise ReplicaDown(str(exc).splitlines()[-1]) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self._actor_died(flight)
            raise ReplicaDown(describe_error(exc)) from None
        except ray.exceptions.GetTimeoutError:
            raise ReplicaSlow(f"no reply in {self.timeout_s}s") from None
        return ExpertReply(self._output(out, flight.call.dtype), ms)

    def _finished(self, flight: ReplicaCall) -> bool:
        return bool(self._ray.wait([self._ref(flight)], timeout=0)[0])

    def _cancel(self, flight: ReplicaCall) -> None:
        pass  # a sync actor runs a started call to its end; its in-flight count is released when it does

    def _settle(self, flights: list[ReplicaCall], timeout_s: float) -> None:
        if flights:
            self._ray.wait([self._ref(f) for f in flights], num_returns=len(flights), timeout=timeout_s)


class RayTransport(RayCallTransport):
    """Ray actor calls carrying numpy views (never pickled torch tensors): the object store reads them zero-copy.

    Each call packs its arguments into one (Ray serializes one argument instead of seven). A call whose hidden
    rows Ray would put in the object store anyway (`share_min_bytes`, Ray's inline limit) reads the layer's whole
    batch from shared memory instead, when its replica runs on the gateway's node: the batch is put once for
    every such call of the layer, and each call names its rows. That replaces one gather and one object-store
    copy per call with one copy per layer. A replica on another node gets its rows, as before (it would otherwise
    pull the whole batch over the network)."""

    resend_errors = (PlacementVersionMissing,)  # restarted with its old placement: it adopts the current one

    def __init__(self, pool, timeout_s: float, deadline_s: float, share_min_bytes: int | None = SHARE_MIN_BYTES
                 ) -> None:
        """share_min_bytes: the smallest rows-of-one-call size that reads the shared batch (None: never share)."""
        super().__init__(pool, timeout_s, deadline_s)
        self.share_min_bytes = share_min_bytes
        self.node_id = self._ray.get_runtime_context().get_node_id()

    def _start(self, replica, flight: ReplicaCall):
        call, shared = flight.call, flight.shared
        if shared is not None and self._on_gateway_node(replica):
            if shared.handle is None:
                shared.handle = self._ray.put(tensor_to_numpy(shared.hidden))
                self.shared_puts += 1
            self.shared_calls += 1
            packed = numpy_args(call.layer, call.hidden, call.ids, call.weights, call.carrier, call.version,
                                call.rows)
            return replica.actor.forward_packed.remote(packed, shared.handle)
        packed = numpy_args(call.layer, take_rows(call.hidden, call.rows), call.ids, call.weights, call.carrier,
                            call.version)
        return replica.actor.forward_packed.remote(packed)
