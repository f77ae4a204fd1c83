"""How dispatched bytes move: in-process calls, Ray actor calls (numpy via the object store), gRPC unary calls."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from expert_workers.spans import traced_run
from gateway.dispatch.replica_pool import NoLiveReplica
from protos.channel import channel_options
from protos.codec import NAMES, numpy_to_tensor, proto_to_tensor, tensor_to_numpy, tensor_to_proto

logger = logging.getLogger(__name__)


class DispatchError(RuntimeError):
    """An expert group failed or did not answer in time; the message names the device and layer."""


@dataclass(frozen=True)
class ExpertReply:
    output: torch.Tensor  # [n, H]
    tokens_per_expert: list[int]
    compute_ms: float


class Transport(Protocol):
    """Sends one device's batch for one layer; `flush` marks the end of a layer's sends (a compiled graph
    sends them all then); `receive` waits for a list of sends, in order. `tracer` is set when tracing is on
    (only in-process groups record server spans with it; remote groups have their own)."""

    tracer: Any

    def send(self, device: int, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
             carrier: dict[str, str] | None = None) -> Any:
        """carrier: W3C trace context for the expert group's server span (None when tracing is off)."""
        ...

    def flush(self) -> None: ...

    def receive(self, pending: list[tuple[int, int, Any]]) -> list[ExpertReply]: ...

    def close(self) -> None: ...


class LocalTransport:
    """Expert groups in this process: the reference path (no bytes move)."""

    def __init__(self, groups: list) -> None:
        self.groups = groups
        self.tracer = None

    def send(self, device, layer, hidden, ids, weights, carrier=None):
        result = traced_run(self.groups[device], self.tracer, carrier, "local", layer, hidden, ids, weights)
        return ExpertReply(result.output, result.tokens_per_expert, result.compute_ms)

    def flush(self) -> None:
        pass  # each send already ran

    def receive(self, pending):
        return [reply for _, _, reply in pending]

    def close(self) -> None:
        self.groups = []


@dataclass
class _Call:
    """One device batch in flight on one replica, with what is needed to send it again elsewhere."""

    replica: object
    handle: Any
    args: tuple
    dtype: torch.dtype
    retried: bool = False


class _ReplicaTransport:
    """Shared retry logic: a call that fails because its replica died, restarts or hangs is sent again to a live
    replica (or the restarted one) until `deadline_s` has passed; expert compute is pure, so a retry is safe."""

    RETRYABLE: tuple = ()

    def __init__(self, pool, timeout_s: float, deadline_s: float) -> None:
        self.pool, self.timeout_s, self.deadline_s = pool, timeout_s, deadline_s
        self.retries = 0
        self.tracer = None

    def flush(self) -> None:
        pass  # each send is already in flight

    def _submit(self, device: int, args: tuple, dtype: torch.dtype, avoid=None, deadline: float | None = None):
        while True:
            try:
                replica = self.pool.pick(device, avoid)
                break
            except NoLiveReplica:
                if deadline is None:
                    deadline = time.monotonic() + self.deadline_s
                if time.monotonic() > deadline:
                    raise DispatchError(f"group {device}: no live replica for {self.deadline_s}s") from None
                time.sleep(0.05)
        try:
            return _Call(replica, self._call(replica, args), args, dtype)
        except Exception:
            self.pool.release(replica)
            raise

    def receive(self, pending):
        return [self._result(device, layer, call) for device, layer, call in pending]

    def _result(self, device: int, layer: int, call: _Call) -> ExpertReply:
        deadline, pause = None, 0.05
        while True:
            try:
                reply = self._wait(call)
            except self.RETRYABLE as exc:
                self.pool.release(call.replica)
                call.replica.failures += 1
                self.retries += 1
                deadline = deadline or time.monotonic() + self.deadline_s
                if time.monotonic() > deadline:
                    raise DispatchError(f"group {device}, layer {layer}: no replica answered within "
                                        f"{self.deadline_s}s (last error: {self._describe(exc)})") from None
                logger.warning("group %d layer %d: replica %s failed (%s); retrying", device, layer,
                               call.replica.name, self._describe(exc))
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                call = self._submit(device, call.args, call.dtype, avoid=call.replica, deadline=deadline)
                call.retried = True
                continue
            except Exception as exc:
                self.pool.release(call.replica)
                raise DispatchError(f"group {device}, layer {layer}: {self._describe(exc)}") from exc
            self.pool.release(call.replica)
            if call.retried:
                self.pool.note_restart(call.replica)
            return reply

    def close(self) -> None:
        self.pool = None

    @staticmethod
    def _describe(exc: Exception) -> str:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class RayTransport(_ReplicaTransport):
    """Ray actor calls carrying numpy views (never pickled torch tensors): the object store reads them zero-copy."""

    def __init__(self, pool, timeout_s: float, deadline_s: float) -> None:
        import ray

        super().__init__(pool, timeout_s, deadline_s)
        self._ray = ray
        self.RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)

    def send(self, device, layer, hidden, ids, weights, carrier=None):
        args = (layer, tensor_to_numpy(hidden), ids.numpy(), weights.numpy(), NAMES[hidden.dtype], carrier)
        return self._submit(device, args, hidden.dtype)

    def _call(self, replica, args):
        return replica.actor.forward.remote(*args)

    def _wait(self, call: _Call) -> ExpertReply:
        out, counts, ms = self._ray.get(call.handle, timeout=self.timeout_s)
        return ExpertReply(numpy_to_tensor(out, call.dtype), counts, ms)


class RayDagTransport:
    """One Ray Compiled Graph over one replica per group: a layer's batches leave in a single execute() over
    shared-memory channels instead of one actor call each (DESIGN.md measured ~5× less per-call overhead).
    Fixed topology: one replica per group, no run-time scaling, and a failed actor fails the call (no retry)."""

    def __init__(self, pool, timeout_s: float) -> None:
        import ray
        from ray.dag import InputNode, MultiOutputNode

        self._ray, self.pool, self.timeout_s = ray, pool, timeout_s
        self.n_devices = len(pool.groups)
        actors = [pool.live(d)[0].actor for d in range(self.n_devices)]
        with InputNode() as inp:
            dag = MultiOutputNode([a.forward_dag.bind(inp[d]) for d, a in enumerate(actors)])
        self.dag = dag.experimental_compile()
        self.retries = 0
        self.tracer = None
        self._staged: dict[int, tuple] = {}
        self._dtypes: dict[int, torch.dtype] = {}
        self._ref = None

    def send(self, device, layer, hidden, ids, weights, carrier=None):
        self._staged[device] = (layer, tensor_to_numpy(hidden), ids.numpy(), weights.numpy(), NAMES[hidden.dtype],
                                carrier)
        self._dtypes[device] = hidden.dtype
        return device

    def flush(self) -> None:
        """Run the graph once for every batch staged since the last flush (devices without tokens get None)."""
        inputs = [self._staged.get(d) for d in range(self.n_devices)]
        self._staged = {}
        self._ref = self.dag.execute(*inputs)

    def receive(self, pending):
        ray = self._ray
        ref, self._ref = self._ref, None
        try:
            results = ray.get(ref, timeout=self.timeout_s)
        except Exception as exc:
            raise DispatchError(f"compiled graph, layer {pending[0][1] if pending else '?'}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        replies = []
        for device, _, _ in pending:
            out, counts, ms = results[device]
            replies.append(ExpertReply(numpy_to_tensor(out, self._dtypes[device]), counts, ms))
        return replies

    def close(self) -> None:
        if self.dag is not None:
            self.dag.teardown()
            self.dag = None


class GrpcTransport(_ReplicaTransport):
    """gRPC unary calls to each replica's ExpertService, all devices in flight at once, with deadlines.

    A replica that Ray restarted serves on a new port: after a failure the pool re-reads its address."""

    def __init__(self, pool, timeout_s: float, deadline_s: float, max_message_bytes: int) -> None:
        import grpc

        from protos import expert_service_pb2 as pb
        from protos import expert_service_pb2_grpc as pb_grpc

        super().__init__(pool, timeout_s, deadline_s)
        self._grpc, self._pb, self._pb_grpc = grpc, pb, pb_grpc
        self._options = channel_options(max_message_bytes)
        self._channels: dict[str, tuple] = {}  # address -> (channel, stub)
        self.RETRYABLE = (_Retryable,)

    def _stub(self, address: str):
        if address not in self._channels:
            channel = self._grpc.insecure_channel(address, options=self._options)
            self._channels[address] = (channel, self._pb_grpc.ExpertServiceStub(channel))
        return self._channels[address][1]

    def send(self, device, layer, hidden, ids, weights, carrier=None):
        req = self._pb.ForwardRequest(layer=layer)
        tensor_to_proto(hidden, req.hidden)
        tensor_to_proto(ids, req.expert_ids)
        tensor_to_proto(weights, req.weights)
        metadata = tuple(carrier.items()) if carrier else None  # W3C traceparent rides in gRPC metadata
        return self._submit(device, (req, metadata), hidden.dtype)

    def _call(self, replica, args):
        req, metadata = args
        return self._stub(replica.grpc_address).Forward.future(req, timeout=self.timeout_s, metadata=metadata)

    def _wait(self, call: _Call) -> ExpertReply:
        grpc = self._grpc
        try:
            resp = call.handle.result()
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                self.pool.note_restart(call.replica)  # picks up the new port if Ray restarted it
                raise _Retryable(f"{code.name}: {exc.details()}") from None
            raise DispatchError(f"{code.name}: {exc.details()}") from None
        return ExpertReply(proto_to_tensor(resp.output, "output"), list(resp.tokens_per_expert), resp.compute_ms)

    def close(self) -> None:
        for channel, _ in self._channels.values():
            channel.close()
        self._channels = {}
        super().close()


class _Retryable(RuntimeError):
    """A gRPC failure of the replica (not of the request): try another replica."""
