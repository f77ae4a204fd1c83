"""How dispatched bytes move: in-process calls, Ray actor calls (numpy via the object store), gRPC unary calls."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from expert_workers.expert_group import PlacementVersionMissing
from expert_workers.spans import traced_run
from gateway.dispatch.replica_pool import NoLiveReplica
from protos import frame
from protos.channel import RpcSecurity, channel_options
from protos.codec import NAMES, numpy_to_tensor, tensor_to_numpy

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
             carrier: dict[str, str] | None = None, version: int | None = None,
             rows: torch.Tensor | None = None) -> Any:
        """hidden: the device's rows [n, H], or with `rows` ([n] indices) the layer's whole batch [T, H] (the
        dispatcher's way: a transport gathers the rows where it copies them anyway, or shares the batch);
        carrier: W3C trace context for the expert group's server span (None when tracing is off); version:
        the placement version the ids follow (the group serves the call from that version's experts)."""
        ...

    def flush(self) -> None: ...

    def receive(self, pending: list[tuple[int, int, Any]]) -> list[ExpertReply]: ...

    def close(self) -> None: ...


def take_rows(hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The device's rows of a layer's batch (Transport.send's `rows`), or hidden itself when rows is None
    (index_select: about 3× faster than advanced indexing on CPU, from 8 to 2048 rows)."""
    return hidden if rows is None else hidden.index_select(0, rows)


class LocalTransport:
    """Expert groups in this process: the reference path (no bytes move)."""

    def __init__(self, groups: list) -> None:
        self.groups = groups
        self.tracer = None

    def send(self, device, layer, hidden, ids, weights, carrier=None, version=None, rows=None):
        result = traced_run(self.groups[device], self.tracer, carrier, "local", layer, take_rows(hidden, rows), ids,
                            weights, version=version)
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

    replica: Any
    handle: Any
    args: tuple
    dtype: torch.dtype


@dataclass
class _SharedBatch:
    """A layer's whole hidden batch, put at most once for all of the layer's calls that read it (`handle`: Ray's
    ObjectRef, or gRPC's BatchFile; it stays valid while any of their calls may be sent again)."""

    hidden: torch.Tensor
    handle: Any = None
    failed: bool = False  # it could not be put (no room): the calls carry their rows


class _ReplicaDown(RuntimeError):
    """The replica's actor died or restarts: send the call again (another replica, or the restarted one)."""


class _ReplicaSlow(RuntimeError):
    """The call ran past `timeout_s`: the replica may still be computing it, so never send it there again."""


class _ReplicaTransport:
    """Shared retry logic over a replica pool (expert compute is pure, so sending a call again is safe).

    - A replica that died or restarts: the call goes again to a live replica, or waits for the restarted one,
      until `deadline_s` has passed; the pool probes the failed replica without blocking the caller.
    - A replica that did not answer within `timeout_s`: the call goes to another replica if the group has
      one; it is never queued again behind itself on the same serial actor (that would double the load of an
      overloaded actor). With no other replica the call fails with the timeout named.
    - Every call's in-flight count is released exactly once, whatever happens to the other calls of the layer.
    """

    def __init__(self, pool, timeout_s: float, deadline_s: float) -> None:
        self.pool, self.timeout_s, self.deadline_s = pool, timeout_s, deadline_s
        self.retries = 0
        self.tracer = None
        self._orphans: list[_Call] = []  # timed-out calls still running on their replica
        # Shared layer batches (Ray's object store, or a file in /dev/shm for gRPC): off unless a transport sets
        # share_min_bytes, the smallest rows-of-one-call size that reads the shared batch instead.
        self.share_min_bytes: int | None = None
        self.node_id: str | None = None  # the gateway's Ray node: replicas on it can read a shared batch
        self.shared_puts = 0  # layer batches put where the replicas on the gateway's node read them
        self.shared_calls = 0  # calls that read one
        self._batch: _SharedBatch | None = None  # this layer's, until flush()

    def flush(self) -> None:
        self._batch = None  # each send is already in flight; the next layer's calls share the next layer's batch

    def _layer_batch(self, hidden: torch.Tensor, rows: torch.Tensor | None) -> _SharedBatch | None:
        """The layer's shared batch for a call whose rows reach share_min_bytes (one for all of the layer's
        calls, put when the first call that reads it is made), or None: the call carries its rows."""
        if rows is None or self.share_min_bytes is None \
                or rows.numel() * hidden.shape[1] * hidden.element_size() < self.share_min_bytes:
            return None
        if self._batch is None or self._batch.hidden is not hidden:
            self._batch = _SharedBatch(hidden)
        return self._batch

    def _on_gateway_node(self, replica) -> bool:
        return replica.node_id is not None and replica.node_id == self.node_id

    def _submit(self, device: int, args: tuple, dtype: torch.dtype, avoid: tuple = (), strict: bool = False,
                deadline: float | None = None) -> _Call:
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
        try:
            return _Call(replica, self._call(replica, args), args, dtype)
        except Exception:
            self.pool.release(replica)
            raise

    def receive(self, pending):
        """Every call's reply, in order. After the first call that fails for good, the rest are abandoned
        (released, cancelled where the transport can) and the failure is raised."""
        self._sweep_orphans()
        replies, failure, abandoned = [], None, []
        for device, layer, call in pending:
            if failure is not None:
                abandoned.append(call)
                continue
            try:
                replies.append(self._result(device, layer, call))
            except DispatchError as exc:
                failure = exc
            except Exception as exc:  # a bug or an unexpected client error: still abandon the rest cleanly
                failure = DispatchError(f"group {device}, layer {layer}: {_describe(exc)}")
                failure.__cause__ = exc
        if failure is not None:
            self._abandon(abandoned)
            raise failure
        return replies

    def _result(self, device: int, layer: int, call: _Call) -> ExpertReply:
        deadline, pause = time.monotonic() + self.deadline_s, 0.05
        slow: tuple = ()  # replicas that timed out on this call: it is never sent to them again
        while True:
            try:
                reply = self._wait(call)
            except _ReplicaDown as exc:
                self.pool.release(call.replica)
                self.pool.failed(call.replica)
                self.retries += 1
                if time.monotonic() > deadline:
                    raise DispatchError(f"group {device}, layer {layer}: no replica answered within "
                                        f"{self.deadline_s}s (last error: {exc})") from None
                logger.warning("group %d layer %d: replica %s failed (%s); retrying", device, layer,
                               call.replica.name, exc)
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                call = self._submit(device, call.args, call.dtype, avoid=(call.replica, *slow), deadline=deadline)
                continue
            except _ReplicaSlow as exc:
                self._orphan(call)
                slow = (*slow, call.replica)
                late = f"group {device}, layer {layer}: replica {call.replica.name} did not answer within " \
                       f"rpc.timeout_s={self.timeout_s}s ({exc})"
                if time.monotonic() > deadline:
                    raise DispatchError(f"{late}; rpc.replica_deadline_s={self.deadline_s}s has passed") from None
                try:
                    call = self._submit(device, call.args, call.dtype, avoid=slow, strict=True)
                except NoLiveReplica:
                    raise DispatchError(f"{late}; no other replica can take the call") from None
                self.retries += 1
                logger.warning("group %d layer %d: replica %s timed out; sent to replica %s", device, layer,
                               slow[-1].name, call.replica.name)
                continue
            except Exception as exc:
                self.pool.release(call.replica)
                raise DispatchError(f"group {device}, layer {layer}: {_describe(exc)}") from exc
            self.pool.release(call.replica)
            self.pool.answered(call.replica)
            return reply

    def _orphan(self, call: _Call) -> None:
        """A timed-out call keeps its replica's in-flight count until it really ends (see _sweep_orphans)."""
        self._orphans.append(call)

    def _sweep_orphans(self) -> None:
        still = []
        for call in self._orphans:
            if self._finished(call):
                self.pool.release(call.replica)
            else:
                still.append(call)
        self._orphans = still

    def _abandon(self, calls: list[_Call]) -> None:
        """Calls of a layer that already failed: cancel what can be, wait briefly for the rest, release them."""
        for call in calls:
            self._cancel(call)
        self._settle(calls, min(self.timeout_s, 5.0))
        self._orphans.extend(calls)
        self._sweep_orphans()

    def close(self) -> None:
        for call in self._orphans:
            self._cancel(call)
            self.pool.release(call.replica)
        self._orphans = []
        self.pool = None


def numpy_args(layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               carrier: dict[str, str] | None, version: int | None = None, rows: torch.Tensor | None = None) -> tuple:
    """ExpertGroupActor.forward_packed's arguments: host numpy views (the codec makes the one copy off a GPU).
    hidden: the device's rows; or with `rows`, the layer's shared batch, and the rows go in hidden's place."""
    return (layer, tensor_to_numpy(hidden if rows is None else rows), tensor_to_numpy(ids), tensor_to_numpy(weights),
            NAMES[hidden.dtype], carrier, version)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# Ray passes an argument up to this size inside the call itself, and puts a larger one in the object store: a
# call whose rows reach it reads the layer's shared batch instead (gRPC uses the same default; not tuned for it).
SHARE_MIN_BYTES = int(os.environ.get("RAY_max_direct_call_object_size", 100 * 1024))


class RayTransport(_ReplicaTransport):
    """Ray actor calls carrying numpy views (never pickled torch tensors): the object store reads them zero-copy.

    Each call packs its arguments into one (Ray serializes one argument instead of seven). A call whose hidden
    rows Ray would put in the object store anyway (`share_min_bytes`, Ray's inline limit) reads the layer's whole
    batch from shared memory instead, when its replica runs on the gateway's node: the batch is put once for
    every such call of the layer, and each call names its rows. That replaces one gather and one object-store
    copy per call with one copy per layer. A replica on another node gets its rows, as before (it would otherwise
    pull the whole batch over the network)."""

    def __init__(self, pool, timeout_s: float, deadline_s: float, share_min_bytes: int | None = SHARE_MIN_BYTES
                 ) -> None:
        """share_min_bytes: the smallest rows-of-one-call size that reads the shared batch (None: never share)."""
        import ray

        super().__init__(pool, timeout_s, deadline_s)
        self._ray = ray
        self.share_min_bytes = share_min_bytes
        self.node_id = ray.get_runtime_context().get_node_id()

    def send(self, device, layer, hidden, ids, weights, carrier=None, version=None, rows=None):
        args = (layer, hidden, rows, ids, weights, carrier, version, self._layer_batch(hidden, rows))
        return self._submit(device, args, hidden.dtype)

    def _call(self, replica, args):
        layer, hidden, rows, ids, weights, carrier, version, shared = args
        if shared is not None and self._on_gateway_node(replica):
            if shared.handle is None:
                shared.handle = self._ray.put(tensor_to_numpy(shared.hidden))
                self.shared_puts += 1
            self.shared_calls += 1
            packed = numpy_args(layer, hidden, ids, weights, carrier, version, rows)
            return replica.actor.forward_packed.remote(packed, shared.handle)
        packed = numpy_args(layer, take_rows(hidden, rows), ids, weights, carrier, version)
        return replica.actor.forward_packed.remote(packed)

    def _wait(self, call: _Call) -> ExpertReply:
        ray = self._ray
        try:
            out, counts, ms = ray.get(call.handle, timeout=self.timeout_s)
        except PlacementVersionMissing as exc:  # restarted with its old placement: it adopts the current one
            raise _ReplicaDown(str(exc).splitlines()[-1]) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise _ReplicaDown(_describe(exc)) from None
        except ray.exceptions.GetTimeoutError:
            raise _ReplicaSlow(f"no reply in {self.timeout_s}s") from None
        return ExpertReply(numpy_to_tensor(out, call.dtype), counts, ms)

    def _finished(self, call: _Call) -> bool:
        return bool(self._ray.wait([call.handle], timeout=0)[0])

    def _cancel(self, call: _Call) -> None:
        pass  # a sync actor runs a started call to its end; its in-flight count is released when it does

    def _settle(self, calls: list[_Call], timeout_s: float) -> None:
        if calls:
            self._ray.wait([c.handle for c in calls], num_returns=len(calls), timeout=timeout_s)


class RayDagTransport:
    """One Ray Compiled Graph over one replica per group: a layer's batches leave in a single execute() over
    shared-memory channels instead of one actor call each (DESIGN.md measured ~5× less per-call overhead).

    Fixed topology: one replica per group, no run-time scaling. When an actor dies the graph is torn down;
    the next layer waits (up to `deadline_s`) for Ray to restart the actor, compiles the graph again and runs
    the failed layer once more (expert compute is pure). If that fails the call fails with the reason."""

    def __init__(self, pool, timeout_s: float, deadline_s: float) -> None:
        import ray

        self._ray, self.pool, self.timeout_s, self.deadline_s = ray, pool, timeout_s, deadline_s
        self.n_devices = len(pool.groups)
        self.retries = 0
        self.rebuilds = 0
        self.tracer = None
        self._staged: dict[int, tuple] = {}
        self._inputs: list = []
        self._dtypes: dict[int, torch.dtype] = {}
        self._ref = None
        self.dag = self._compile()

    def _compile(self):
        from ray.dag import InputNode, MultiOutputNode

        actors = [self.pool.live(d)[0].actor for d in range(self.n_devices)]
        with InputNode() as inp:
            dag = MultiOutputNode([a.forward_dag.bind(inp[d]) for d, a in enumerate(actors)])
        return dag.experimental_compile()

    def send(self, device, layer, hidden, ids, weights, carrier=None, version=None, rows=None):
        hidden = take_rows(hidden, rows)
        self._staged[device] = numpy_args(layer, hidden, ids, weights, carrier, version)
        self._dtypes[device] = hidden.dtype
        return device

    def flush(self) -> None:
        """Run the graph once for every batch staged since the last flush (devices without tokens get None)."""
        self._inputs = [self._staged.get(d) for d in range(self.n_devices)]
        self._staged = {}
        try:
            self._ref = self.dag.execute(*self._inputs) if self.dag is not None else None
        except Exception as exc:  # the graph is broken (an actor died): receive() rebuilds it
            logger.warning("compiled graph execute failed (%s); will rebuild", _describe(exc))
            self._ref = None

    def receive(self, pending):
        layer = pending[0][1] if pending else "?"
        try:
            if self._ref is None:
                raise RuntimeError("the compiled graph is down")
            ref, self._ref = self._ref, None
            results = self._ray.get(ref, timeout=self.timeout_s)
        except Exception as exc:
            results = self._rebuild_and_rerun(layer, exc)
        replies = []
        for device, _, _ in pending:
            out, counts, ms = results[device]
            replies.append(ExpertReply(numpy_to_tensor(out, self._dtypes[device]), counts, ms))
        return replies

    def _rebuild_and_rerun(self, layer, failure: Exception) -> list:
        """Tear the graph down, wait for every actor to serve again, compile anew and run the layer again."""
        ray = self._ray
        logger.warning("compiled graph, layer %s: %s; rebuilding it", layer, _describe(failure))
        self.retries += 1
        self._teardown()
        deadline = time.monotonic() + self.deadline_s
        actors = [self.pool.live(d)[0].actor for d in range(self.n_devices)]
        while True:
            try:
                ray.get([a.describe.remote() for a in actors], timeout=max(0.1, deadline - time.monotonic()))
                self.dag = self._compile()
                results = ray.get(self.dag.execute(*self._inputs), timeout=self.timeout_s)
                self.rebuilds += 1
                return results
            except Exception as exc:
                self._teardown()
                if time.monotonic() > deadline:
                    raise DispatchError(
                        f"compiled graph, layer {layer}: an expert actor failed ({_describe(failure)}) and the graph "
                        f"could not be rebuilt within rpc.replica_deadline_s={self.deadline_s}s "
                        f"(last error: {_describe(exc)})") from exc
                time.sleep(0.2)

    def _teardown(self) -> None:
        dag, self.dag, self._ref = self.dag, None, None
        if dag is not None:
            try:
                dag.teardown()
            except Exception as exc:  # a graph whose actor died may fail to tear down cleanly
                logger.info("compiled graph teardown: %s", _describe(exc))

    def close(self) -> None:
        self._teardown()


class GrpcTransport(_ReplicaTransport):
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

    def send(self, device, layer, hidden, ids, weights, carrier=None, version=None, rows=None):
        # the token and the W3C traceparent ride in gRPC metadata
        metadata = (*self._security.call_metadata(), *(carrier.items() if carrier else ())) or None
        args = (layer, hidden, rows, ids, weights, version, metadata, self._layer_batch(hidden, rows))
        return self._submit(device, args, hidden.dtype)

    def _call(self, replica, args):
        layer, hidden, rows, ids, weights, version, metadata, shared = args
        req = self._pb.ForwardRequest(layer=layer)
        if version is not None:
            req.placement_version = version
        file = self._shared_file(shared) if shared is not None and self._reads_shared(replica) else None
        if file is not None:
            req.shared.name = file.name
            frame.describe(hidden, req.shared.batch)
            frame.describe(rows, req.shared.rows)
            tensors = [rows, ids, weights]
            self.shared_calls += 1
        else:
            tensors = [take_rows(hidden, rows), ids, weights]
            frame.describe(tensors[0], req.hidden)
        frame.describe(ids, req.expert_ids)
        frame.describe(weights, req.weights)
        data = frame.encode(req, tensors)  # the one copy of the rows (and of a GPU tensor to host)
        return self._stub(replica).future(data, timeout=self.timeout_s, metadata=metadata)

    def _reads_shared(self, replica) -> bool:
        return self._on_gateway_node(replica) and replica.name not in self._unshared

    def _shared_file(self, shared: _SharedBatch):
        """The layer batch's file, written on first use; None when none could be made (the call sends rows)."""
        if shared.handle is None and not shared.failed:
            shared.handle = self._writer.acquire(shared.hidden)
            shared.failed = shared.handle is None
            self.shared_puts += not shared.failed
        return shared.handle

    def receive(self, pending):
        """As the base class; then the layer's batch files are free for later layers (a call still running after
        its layer failed or timed out is an orphan: its answer is never read)."""
        try:
            return super().receive(pending)
        finally:
            for shared in {id(c.args[-1]): c.args[-1] for _, _, c in pending if c.args[-1] is not None}.values():
                if shared.handle is not None:
                    self._writer.release(shared.handle)
                    shared.handle = None

    def _wait(self, call: _Call) -> ExpertReply:
        grpc = self._grpc
        try:
            resp = call.handle.result()
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.FAILED_PRECONDITION and call.args[-1] is not None \
                    and call.replica.name not in self._unshared:
                logger.warning("replica %s cannot read shared layer batches (%s): sending it rows", call.replica.name,
                               exc.details())
                self._unshared.add(call.replica.name)
                call.handle = self._call(call.replica, call.args)  # the same replica, now with the rows
                return self._wait(call)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise _ReplicaSlow(f"{code.name}: {exc.details()}") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise _ReplicaDown(f"{code.name}: {exc.details()}") from None
            raise DispatchError(f"{code.name}: {exc.details()}") from None
        header, view = frame.decode(resp, self._pb.ForwardResponse)
        payload = frame.Payload(view)
        output = payload.take(header.output, "output")
        payload.finish()
        return ExpertReply(output, list(header.tokens_per_expert), header.compute_ms)

    def _finished(self, call: _Call) -> bool:
        return call.handle.done()  # past its deadline the client side of a gRPC call is over

    def _cancel(self, call: _Call) -> None:
        call.handle.cancel()

    def _settle(self, calls: list[_Call], timeout_s: float) -> None:
        pass  # a cancelled gRPC call is over on the client side at once

    def close(self) -> None:
        for _, channel, _ in self._channels.values():
            channel.close()
        self._channels = {}
        super().close()
        self._writer.close()
