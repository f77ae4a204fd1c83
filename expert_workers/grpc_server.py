"""gRPC transport for one ExpertGroup: an async ExpertService servicer and a server on its own event-loop thread."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from expert_workers.expert_group import ExpertGroup, PlacementVersionMissing, select_rows
from expert_workers.merging import CallMerger
from expert_workers.spans import traced_run
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos import frame
from protos.channel import MAX_MESSAGE_BYTES, TOKEN_METADATA_KEY, RpcSecurity, bearer, channel_options
from protos.codec import NAMES, proto_to_tensor, tensor_to_proto
from protos.shared_batch import BatchReader, SharedBatchUnreadable

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExpertService"].full_name  # "expertmesh.v1.ExpertService"
START_TIMEOUT_S = 30.0
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = ("0.0.0.0", "::")
CALL_THREADS = 16  # calls decoded and waiting in the CallMerger at once (as many as a Ray actor's max_concurrency)


def bind_and_advertise(bind: str | None, joined_cluster: bool, node_ip: str) -> tuple[str, str]:
    """(host to bind, host clients must dial) for an expert group's server.

    bind: the deployment's `rpc.bind`. None: the node's IP when the deployment joined a Ray cluster (groups
    may run on other hosts), loopback when Ray is embedded (everything on this host). "0.0.0.0" / "::" bind
    every interface and advertise the node's IP; any other IP or hostname is bound and advertised as given.
    """
    if bind is None:
        host = node_ip if joined_cluster else LOOPBACK
        return host, host
    if bind in ALL_INTERFACES:
        return bind, node_ip
    return bind, bind


def host_port(host: str, port: int) -> str:
    """`host:port` as gRPC parses it (IPv6 literals in brackets)."""
    try:
        v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        v6 = False
    return f"[{host}]:{port}" if v6 else f"{host}:{port}"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects ExpertService calls that lack the shared token with UNAUTHENTICATED; health checks stay open
    (a probe needs no secret, and they reveal only SERVING / NOT_SERVING). Never logs or returns the token."""

    def __init__(self, token: str) -> None:
        self._expected = bearer(token).encode()
        self._guarded = f"/{SERVICE_NAME}/"

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(self._guarded):
            return await continuation(handler_call_details)
        sent = [v for k, v in handler_call_details.invocation_metadata or () if k == TOKEN_METADATA_KEY]
        if len(sent) == 1 and isinstance(sent[0], str) and hmac.compare_digest(sent[0].encode(), self._expected):
            return await continuation(handler_call_details)
        reason = "no token" if not sent else "a wrong token"
        return grpc.unary_unary_rpc_method_handler(_rejecter(method, reason))


def _rejecter(method: str, reason: str):
    async def reject(request: bytes, context: grpc.aio.ServicerContext) -> None:
        logger.warning("rejected %s from %s: %s", method, context.peer(), reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: missing or wrong token")

    return reject


@dataclass(frozen=True)
class Malformed:
    """What `_lenient` hands a method for bytes that do not parse as its request message."""

    message: str


def _lenient(message_type):
    """A request deserializer that returns Malformed, naming the message and the parse error, instead of raising."""
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Malformed(f"{message_type.DESCRIPTOR.full_name}: not a valid protobuf message ({exc})")

    return parse


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    """ExpertService over one ExpertGroup; bad requests become INVALID_ARGUMENT, bugs INTERNAL.

    Each call is decoded and computed on a worker thread, never on the event loop: the loop stays free (health
    checks answer while a batch computes), and calls from several gateways meet in `merger`, which computes those
    for the same layer and placement version in one pass.
    """

    def __init__(self, group: ExpertGroup, tracer=None, merger: CallMerger | None = None) -> None:
        self.group = group
        self.tracer = tracer  # an OpenTelemetry tracer, or None when tracing is off
        self.merger = merger if merger is not None else CallMerger(group)
        self._executor = ThreadPoolExecutor(max_workers=CALL_THREADS, thread_name_prefix="expert-call")
        self._batches = BatchReader()  # layer batches a gateway on this host left in /dev/shm

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's methods. Requests that are not protobuf are answered INVALID_ARGUMENT naming the message
        (grpc's own deserializer would end them UNKNOWN); ForwardFramed takes and returns bytes."""
        def method(fn, request_type, response_type):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=_lenient(request_type),
                                                       response_serializer=response_type.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Forward": method(self.Forward, pb.ForwardRequest, pb.ForwardResponse),
            "Describe": method(self.Describe, pb.DescribeRequest, pb.DescribeReply),
            "ForwardFramed": grpc.unary_unary_rpc_method_handler(self.ForwardFramed),  # bytes in, bytes out
        })

    async def Forward(self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext) -> pb.ForwardResponse:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await self._serve(self._forward, request, context)

    async def ForwardFramed(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Forward with the tensors framed (protos/frame.py): bytes in, bytes out, no protobuf bytes fields."""
        return await self._serve(self._forward_framed, data, context)

    async def _serve(self, fn, request, context: grpc.aio.ServicerContext):
        """Run fn(request, carrier, arrived) on a worker thread; errors become status codes."""
        loop = asyncio.get_running_loop()
        carrier = None
        if self.tracer is not None:
            carrier = {k: v for k, v in (context.invocation_metadata() or ()) if k in ("traceparent", "tracestate")}
        arrived = time.perf_counter()
        try:
            return await loop.run_in_executor(self._executor, fn, request, carrier, arrived)
        except PlacementVersionMissing as exc:  # not a bad request: this replica has not caught up (yet)
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except SharedBatchUnreadable as exc:  # the gateway sends the rows instead
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except ValueError as exc:  # CodecError, ExpertRequestError and missing fields
            logger.info("Forward rejected: %s", exc)
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Exception as exc:
            logger.exception("Forward failed")
            code, message = grpc.StatusCode.INTERNAL, f"expert forward failed: {type(exc).__name__}: {exc}"
        await context.abort(code, message)

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeReply:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        g = self.group
        return pb.DescribeReply(
            device=g.device,
            expert_ids=g.expert_ids,
            moe_layers=g.spec.moe_layers,
            hidden_size=g.spec.hidden_size,
            dtype=NAMES[g.dtype],
            weight_bytes=g.weight_bytes,
            model_type=g.spec.model_type,
        )

    def _forward(self, request: pb.ForwardRequest, carrier: dict | None = None, arrived: float = 0.0
                 ) -> pb.ForwardResponse:
        self._check_fields(request)
        hidden = proto_to_tensor(request.hidden, "hidden")
        ids = proto_to_tensor(request.expert_ids, "expert_ids")
        weights = proto_to_tensor(request.weights, "weights")
        result = self._run(request, hidden, ids, weights, carrier, arrived)
        response = pb.ForwardResponse(compute_ms=result.compute_ms)
        tensor_to_proto(result.output, out=response.output)
        return response

    def _forward_framed(self, data: bytes, carrier: dict | None = None, arrived: float = 0.0) -> bytes:
        request, view = frame.decode(data, pb.ForwardRequest)
        self._check_fields(request, framed=True)
        payload = frame.Payload(view)
        if request.HasField("shared"):  # the rows of a batch in shared memory: read in place
            rows = payload.take(request.shared.rows, "shared.rows")
            hidden = select_rows(self._batches.batch(request.shared), rows)
        else:
            hidden = payload.take(request.hidden, "hidden")
        ids = payload.take(request.expert_ids, "expert_ids")
        weights = payload.take(request.weights, "weights")
        payload.finish()
        result = self._run(request, hidden, ids, weights, carrier, arrived)
        response = pb.ForwardResponse(compute_ms=result.compute_ms)
        frame.describe(result.output, response.output)
        return frame.encode(response, [result.output])

    @staticmethod
    def _check_fields(request: pb.ForwardRequest, framed: bool = False) -> None:
        """hidden, expert_ids and weights are required; a framed request may name a shared batch instead of
        hidden (never both)."""
        shared = framed and request.HasField("shared")
        if shared and request.HasField("hidden"):
            raise ValueError("hidden and shared: a ForwardRequest carries one of them, not both")
        if not framed and request.HasField("shared"):
            raise ValueError("shared: only ForwardFramed reads a shared batch")
        for field in ("expert_ids", "weights") if shared else ("hidden", "expert_ids", "weights"):
            if not request.HasField(field):
                raise ValueError(f"{field}: missing from ForwardRequest")

    def _run(self, request: pb.ForwardRequest, hidden, ids, weights, carrier: dict | None, arrived: float):
        queue_ms = (time.perf_counter() - arrived) * 1e3 if arrived else 0.0  # waiting for a worker thread
        version = request.placement_version if request.HasField("placement_version") else None
        return traced_run(self.group, self.tracer, carrier, "grpc", request.layer, hidden, ids, weights, queue_ms,
                          version, merger=self.merger)


class ExpertServer:
    """A grpc.aio server for one group on `bind_host` (OS-chosen port), with the standard health service.

    `address` is what clients dial: `advertised_host` (see `bind_and_advertise`) and the port. With
    `security` it serves TLS and/or demands the shared token. It runs its own event loop in a background
    thread, so synchronous code and Ray actors can start it. `merger`: the replica's CallMerger (the one its Ray
    calls go through too); a new one over `group` when None.
    """

    def __init__(self, group: ExpertGroup, max_message_bytes: int = MAX_MESSAGE_BYTES, tracer=None,
                 bind_host: str = LOOPBACK, advertised_host: str | None = None,
                 security: RpcSecurity | None = None, merger: CallMerger | None = None) -> None:
        if advertised_host in ALL_INTERFACES or (advertised_host is None and bind_host in ALL_INTERFACES):
            raise ValueError(f"advertised_host={advertised_host!r}: clients cannot dial a wildcard address; "
                             f"pass the node's IP (bind_host={bind_host!r})")
        self.group = group
        self.tracer = tracer
        self.merger = merger if merger is not None else CallMerger(group)
        self.options = channel_options(max_message_bytes)
        self.bind_host = bind_host
        self.advertised_host = advertised_host or bind_host
        self.security = security or RpcSecurity()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._servicer: ExpertServicer | None = None
        self._health: health_aio.HealthServicer | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("ExpertServer.address: the server is not started")
        return host_port(self.advertised_host, self.port)

    def start(self) -> int:
        """Bind, start serving and return the port; blocks until the server accepts calls."""
        with self._lock:
            if self._loop is not None:
                raise RuntimeError(f"ExpertServer.start: already serving on port {self.port}")
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._run_loop, name="expert-grpc-server", daemon=True)
            self._thread.start()
            try:
                self.port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(START_TIMEOUT_S)
            except BaseException:
                self._stop_locked(grace=0.0)
                raise
        logger.info("ExpertServer for experts %s serving on %s (bound to %s; tls %s, token %s)",
                    self.group.expert_ids, self.address, self.bind_host, "on" if self.security.tls else "off",
                    "required" if self.security.token else "off")
        return self.port

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving (in-flight calls get `grace` seconds), stop the loop and join the thread; idempotent."""
        with self._lock:
            self._stop_locked(grace)

    def __enter__(self) -> ExpertServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def _serve(self) -> int:
        self._servicer = ExpertServicer(self.group, self.tracer, self.merger)
        self._health = health_aio.HealthServicer()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        sec = self.security
        interceptors = [TokenInterceptor(sec.token)] if sec.token else []
        self._server = grpc.aio.server(options=self.options, interceptors=interceptors)
        self._server.add_generic_rpc_handlers((self._servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        where = host_port(self.bind_host, 0)
        if sec.tls:
            port = self._server.add_secure_port(where, sec.server_credentials())
        else:
            port = self._server.add_insecure_port(where)
        if port == 0:
            raise RuntimeError(f"ExpertServer.start: could not bind {where}")
        await self._server.start()
        return port

    async def _shutdown(self, grace: float) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)

    def _stop_locked(self, grace: float) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(grace), loop).result(grace + START_TIMEOUT_S)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            if self._servicer is not None:
                self._servicer.close()
            self._loop = self._thread = self._server = self._servicer = self._health = None
            self.port = None
