"""The `grpc` transport: unary calls to each replica's ExpertService, tensors framed as raw bytes, with deadlines."""

from __future__ import annotations

import logging
from typing import Any

from gateway.dispatch.transports.interface import DispatchError, ExpertCall, ExpertReply
from gateway.dispatch.transports.retrying import (
    SHARE_MIN_BYTES,
    ReplicaCall,
    ReplicaDown,
    ReplicaSlow,
    ReplicaTransport,
    SharedBatch,
)
from protos import frame
from protos.channel import RpcSecurity, channel_options

logger = logging.getLogger(__name__)


class GrpcTransport(ReplicaTransport):
    """gRPC unary calls to each replica's ExpertService, all devices in flight at once, with deadlines.

    A replica that Ray restarted serves on a new port; the pool's probe reads it, and the replica's channel is
    replaced (one channel per replica, never one per port it ever had). With `security`, channels verify the
    servers' TLS certificate against its CA and every Forward carries the shared token.

    On the gateway's node a call whose rows reach `share_min_bytes` names the layer's batch in a file in
    /dev/shm (`protos/shared_batch.py`), written once per layer, and the group reads its rows there; the frame
    carries the row indices, ids and weights. The files are reused once a layer's calls are over. A group that
    cannot open the file (another user, another host behind the same node id) answers FAILED_PRECONDITION: the
    call goes again with its rows, and so do that replica's calls from then on."""

    def __init__(self, pool, timeout_s: float, deadline_s: float, max_message_bytes: int,
                 security: RpcSecurity | None = None, share_min_bytes: int | None = SHARE_MIN_BYTES) -> None:
        import grpc
        import ray

        from protos import expert_service_pb2 as pb
        from protos import expert_service_pb2_grpc as pb_grpc
        from protos.shared_batch import BatchWriter

        super().__init__(pool, timeout_s, deadline_s)
        self._grpc, self._pb, self._pb_grpc = grpc, pb, pb_grpc
        self._security = security or RpcSecurity()
        self._options = channel_options(max_message_bytes) + self._security.client_options()
        self._credentials = self._security.channel_credentials() if self._security.tls else None
        if self._security.token and not self._security.tls:
            logger.warning("rpc.token is set without TLS: the token crosses the network in plaintext")
        self._channels: dict[str, tuple[str, Any, Any]] = {}  # replica name -> (address, channel, stub)
        self.share_min_bytes = share_min_bytes
        self.node_id = ray.get_runtime_context().get_node_id()
        self._writer = BatchWriter()
        self._unshared: set[str] = set()  # replicas that could not read a shared batch

    # -- channels ------------------------------------------------------------------------------------------------
    def _stub(self, replica):
        known = self._channels.get(replica.name)
        if known is not None and known[0] == replica.grpc_address:
            return known[2]
        if known is not None:
            known[1].close()  # the replica restarted on another port
        if self._credentials is not None:
            channel = self._grpc.secure_channel(replica.grpc_address, self._credentials, options=self._options)
        else:
            channel = self._grpc.insecure_channel(replica.grpc_address, options=self._options)
        # Forward with the tensors framed (protos/frame.py): raw bytes each way, no protobuf bytes fields.
        self._channels[replica.name] = (replica.grpc_address, channel, channel.unary_unary(frame.METHOD))
        self._forget_removed()
        return self._channels[replica.name][2]

    def _forget_removed(self) -> None:
        """Close the channels of replicas that left the pool (scaled down or evicted)."""
        current = {r.name for replicas in self.pool.groups.values() for r in list(replicas)}
        for name in [n for n in self._channels if n not in current]:
            self._channels.pop(name)[1].close()

    @property
    def channels(self) -> int:
        return len(self._channels)

    # -- calls ---------------------------------------------------------------------------------------------------
    def _start(self, replica, flight: ReplicaCall):
        call = flight.call
        req = self._pb.ForwardRequest(layer=call.layer)
        if call.version is not None:
            req.placement_version = call.version
        file = self._shared_file(flight.shared) if flight.shared is not None and self._reads_shared(replica) else None
        if file is not None:
            req.shared.name = file.name
            frame.describe(call.hidden, req.shared.batch)
            frame.describe(call.rows, req.shared.rows)
            tensors = [call.rows, call.ids, call.weights]
            self.shared_calls += 1
        else:
            tensors = [call.device_rows(), call.ids, call.weights]
            frame.describe(tensors[0], req.hidden)
        frame.describe(call.ids, req.expert_ids)
        frame.describe(call.weights, req.weights)
        data = frame.encode(req, tensors)  # the one copy of the rows (and of a GPU tensor to host)
        # the token and the W3C traceparent ride in gRPC metadata
        metadata = (*self._security.call_metadata(), *(call.carrier.items() if call.carrier else ())) or None
        return self._stub(replica).future(data, timeout=self.timeout_s, metadata=metadata)

    def _reads_shared(self, replica) -> bool:
        return self._on_gateway_node(replica) and replica.name not in self._unshared

    def _shared_file(self, shared: SharedBatch):
        """The layer batch's file, written on first use; None when none could be made (the call sends rows)."""
        if shared.handle is None and not shared.failed:
            shared.handle = self._writer.acquire(shared.hidden)
            shared.failed = shared.handle is None
            self.shared_puts += not shared.failed
        return shared.handle

    def receive(self, calls: list[ExpertCall], handles: list[ReplicaCall]) -> list[ExpertReply]:
        """As the base class; then the layer's batch files are free for later layers (a call still running after
        its layer failed or timed out is an orphan: its answer is never read)."""
        try:
            return super().receive(calls, handles)
        finally:
            for shared in {id(f.shared): f.shared for f in handles if f.shared is not None}.values():
                if shared.handle is not None:
                    self._writer.release(shared.handle)
                    shared.handle = None

    def _wait(self, flight: ReplicaCall) -> ExpertReply:
        grpc = self._grpc
        try:
            resp = flight.future.result()
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.FAILED_PRECONDITION and flight.shared is not None \
                    and flight.replica.name not in self._unshared:
                logger.warning("replica %s cannot read shared layer batches (%s): sending it rows",
                               flight.replica.name, exc.details())
                self._unshared.add(flight.replica.name)
                flight.future = self._start(flight.replica, flight)  # the same replica, now with the rows
                return self._wait(flight)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ReplicaSlow(f"{code.name}: {exc.details()}") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise ReplicaDown(f"{code.name}: {exc.details()}") from None
            raise DispatchError(f"{code.name}: {exc.details()}") from None
        header, view = frame.decode(resp, self._pb.ForwardResponse)
        payload = frame.Payload(view)
        output = payload.take(header.output, "output")
        payload.finish()
        return ExpertReply(output, header.compute_ms)

    def _finished(self, flight: ReplicaCall) -> bool:
        return flight.future.done()  # past its deadline the client side of a gRPC call is over

    def _cancel(self, flight: ReplicaCall) -> None:
        flight.future.cancel()

    def _settle(self, flights: list[ReplicaCall], timeout_s: float) -> None:
        pass  # a cancelled gRPC call is over on the client side at once

    def close(self) -> None:
        for _, channel, _ in self._channels.values():
            channel.close()
        self._channels = {}
        super().close()
        self._writer.close()
