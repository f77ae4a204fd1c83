"""How dispatched bytes move: in-process calls, Ray actor calls (numpy via the object store), gRPC unary calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from expert_workers.spans import traced_run
from protos.codec import NAMES, numpy_to_tensor, proto_to_tensor, tensor_to_numpy, tensor_to_proto


class DispatchError(RuntimeError):
    """An expert group failed or did not answer in time; the message names the device and layer."""


@dataclass(frozen=True)
class ExpertReply:
    output: torch.Tensor  # [n, H]
    tokens_per_expert: list[int]
    compute_ms: float


class Transport(Protocol):
    """Sends one device's batch for one layer; `receive` waits for a list of sends, in order."""

    def send(self, device: int, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
             carrier: dict[str, str] | None = None) -> Any:
        """carrier: W3C trace context for the expert group's server span (None when tracing is off)."""
        ...

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

    def receive(self, pending):
        return [reply for _, _, reply in pending]

    def close(self) -> None:
        self.groups = []


class RayTransport:
    """Ray actor calls carrying numpy views (never pickled torch tensors): the object store reads them zero-copy."""

    def __init__(self, actors: list, timeout_s: float) -> None:
        self.actors, self.timeout_s = actors, timeout_s

    def send(self, device, layer, hidden, ids, weights, carrier=None):
        return self.actors[device].forward.remote(
            layer, tensor_to_numpy(hidden), ids.numpy(), weights.numpy(), NAMES[hidden.dtype], carrier
        ), hidden.dtype

    def receive(self, pending):
        import ray

        replies = []
        for device, layer, (ref, dtype) in pending:
            try:
                out, counts, ms = ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise DispatchError(f"device {device}, layer {layer}: no reply within {self.timeout_s}s") from None
            except ray.exceptions.RayError as exc:
                raise DispatchError(f"device {device}, layer {layer}: {exc}") from exc
            replies.append(ExpertReply(numpy_to_tensor(out, dtype), counts, ms))
        return replies

    def close(self) -> None:
        self.actors = []


class GrpcTransport:
    """gRPC unary calls to each group's ExpertService, all devices in flight at once, with deadlines."""

    def __init__(self, addresses: list[str], timeout_s: float, max_message_bytes: int) -> None:
        import grpc

        from expert_workers.grpc_server import channel_options
        from protos import expert_service_pb2 as pb
        from protos import expert_service_pb2_grpc as pb_grpc

        self._grpc, self._pb = grpc, pb
        self.timeout_s = timeout_s
        self.channels = [grpc.insecure_channel(a, options=channel_options(max_message_bytes)) for a in addresses]
        self.stubs = [pb_grpc.ExpertServiceStub(c) for c in self.channels]

    def send(self, device, layer, hidden, ids, weights, carrier=None):
        req = self._pb.ForwardRequest(layer=layer)
        tensor_to_proto(hidden, req.hidden)
        tensor_to_proto(ids, req.expert_ids)
        tensor_to_proto(weights, req.weights)
        metadata = tuple(carrier.items()) if carrier else None  # W3C traceparent rides in gRPC metadata
        return self.stubs[device].Forward.future(req, timeout=self.timeout_s, metadata=metadata)

    def receive(self, pending):
        replies = []
        for device, layer, future in pending:
            try:
                resp = future.result()
            except self._grpc.RpcError as exc:
                raise DispatchError(f"device {device}, layer {layer}: {exc.code().name}: {exc.details()}") from None
            replies.append(ExpertReply(proto_to_tensor(resp.output, "output"), list(resp.tokens_per_expert),
                                       resp.compute_ms))
        return replies

    def close(self) -> None:
        for c in self.channels:
            c.close()
        self.channels, self.stubs = [], []
