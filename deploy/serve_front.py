"""The HTTP front of the Serve application: a stateless relay that forwards each request to a gateway replica through
a streaming DeploymentHandle, so that a gateway dying mid-response ends only its own requests, each with a clear
error (never a stream that just stops); the gateway side runs its FastAPI app in process for the relay."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

logger = logging.getLogger(__name__)

GATEWAY_HEADER = "x-expertmesh-gateway"
EVENT_STREAM = b"text/event-stream"
TRIES = 3  # a request no byte of which reached the client: first gateway, then up to two others
# Sent again on another gateway when the first died before answering: same request, same answer (greedy or seeded),
# and the client never saw the first. Other POSTs (admin changes) are answered 503 instead: the client decides.
RETRIED_POSTS = frozenset({"/v1/completions", "/v1/chat/completions"})
LOST = (RayActorError, ReplicaUnavailableError)  # the gateway replica's process is gone (or unreachable)


@dataclass(frozen=True)
class RelayRequest:
    """One HTTP request as the front read it: the ASGI scope's fields a gateway's app needs, and the whole body
    (at most server.max_request_bytes + 1 bytes: the gateway's guard answers 413 past the limit)."""

    method: str
    path: str
    raw_path: bytes
    root_path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    client: tuple[str, int] | None
    server: tuple[str, int | None] | None
    scheme: str
    http_version: str
    body: bytes

    @classmethod
    def of(cls, scope: dict, body: bytes) -> RelayRequest:
        client, server = scope.get("client"), scope.get("server")
        return cls(scope["method"], scope["path"], scope.get("raw_path") or scope["path"].encode(),
                   scope.get("root_path", ""), scope.get("query_string", b""),
                   [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])],
                   tuple(client) if client else None, tuple(server) if server else None,
                   scope.get("scheme", "http"), scope.get("http_version", "1.1"), body)

    def scope(self) -> dict:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": self.http_version,
                "method": self.method, "scheme": self.scheme, "path": self.path, "raw_path": self.raw_path,
                "root_path": self.root_path, "query_string": self.query_string, "headers": list(self.headers),
                "client": self.client, "server": self.server, "state": {}}

    @property
    def retried(self) -> bool:
        """Whether another gateway may answer it when the first died before a byte reached the client."""
        return self.method in ("GET", "HEAD") or (self.method == "POST" and self.path in RETRIED_POSTS)


@dataclass(frozen=True)
class ResponseStart:
    """The first item of a relayed response: its status and headers."""

    status: int
    headers: list[tuple[bytes, bytes]]

    @property
    def event_stream(self) -> bool:
        return any(k.lower() == b"content-type" and v.startswith(EVENT_STREAM) for k, v in self.headers)

    @property
    def gateway(self) -> str | None:
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == GATEWAY_HEADER.encode()), None)


async def relay_asgi(app: Callable[..., Awaitable[None]], request: RelayRequest
                     ) -> AsyncIterator[ResponseStart | bytes]:
    """Run `app` (ASGI) on `request` in this process: yields the ResponseStart, then body bytes, every body message
    already queued joined into one item (fewer items for the handle to carry when the reader lags). Closing the
    generator early (the front cancelled it: its client went away) tells the app the client disconnected, then
    cancels it: its streams cancel their engine requests as for any disconnect."""
    queue: asyncio.Queue[dict | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_read = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(request.scope(), receive, queue.put)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        ended = answered = False  # ended: no more body; answered: the app sent its last body message
        while not ended and (message := await queue.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [(bytes(k), bytes(v)) for k, v in message.get("headers", [])])
                continue
            chunks, more, following = [message.get("body", b"")], message.get("more_body", False), message
            while more and not queue.empty():
                following = queue.get_nowait()
                if following is None:  # the app returned (or raised) mid-body: `await task` says which
                    more = False
                    break
                chunks.append(following.get("body", b""))
                more = following.get("more_body", False)
            ended, answered = not more, not more and following is not None
            body = b"".join(chunks)
            if body:
                yield body
        try:
            await task
        except Exception:  # noqa: BLE001
            if not answered:
                raise  # the front answers 500 (or ends the stream with an error event)
            # Answered in full already (Starlette's error middleware sends its 500, then raises again for the log)
            logger.exception("%s %s: the app raised after answering", request.method, request.path)
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=10)


def lost_event(gateway: str | None, exc: BaseException) -> bytes:
    """The error event ending a stream whose gateway stopped (OpenAI's error shape; [DONE] follows, as after the
    gateway's own error events)."""
    error = {"message": f"the gateway serving this request stopped ({gateway or 'unknown replica'}: "
                        f"{_last_line(exc)}); the tokens sent so far stand, send the request again for the rest",
             "type": "server_error", "param": None, "code": "gateway_lost"}
    return f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()


def error_response(status: int, message: str, code: str) -> tuple[ResponseStart, bytes]:
    """A whole error response in OpenAI's 4-field shape, written by the front (no gateway answered)."""
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}}).encode()
    return ResponseStart(status, [(b"content-type", b"application/json"),
                                  (b"content-length", str(len(body)).encode())]), body


class Relay:
    """Forwards requests to the gateway deployment (a DeploymentHandle); a plain object, testable with any handle
    whose `options(stream=True).relay.remote(request)` gives an async iterator."""

    def __init__(self, gateway: Any, max_request_bytes: int) -> None:
        self.gateway, self.max_request_bytes = gateway, max_request_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        body = await self._read_body(receive)
        if body is None:
            return
        request = RelayRequest.of(scope, body)
        for attempt in range(1, TRIES + 1):
            outcome = await self._try(request, send)
            if outcome is None:
                return
            if not request.retried or attempt == TRIES:
                break
            logger.warning("%s %s: gateway lost before answering (%s); trying another (%d/%d)", request.method,
                           request.path, _last_line(outcome), attempt + 1, TRIES)
        start, data = error_response(503, f"no gateway answered: the gateway serving this request stopped before "
                                          f"answering ({_last_line(outcome)}); send it again", "gateway_lost")
        await _send_whole(send, start, data)

    async def _read_body(self, receive: Callable) -> bytes | None:
        """The body, cut at max_request_bytes + 1: enough for the gateway's guard to refuse it, naming the limit;
        None when the client went away first."""
        chunks, size, more = [], 0, True
        while more and size <= self.max_request_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        return b"".join(chunks)[:self.max_request_bytes + 1]

    async def _try(self, request: RelayRequest, send: Callable) -> BaseException | None:
        """Relay one attempt. None: answered (or ended with an error event); else the error that lost the gateway
        before any byte reached the client (the caller may try another)."""
        answer = self.gateway.options(stream=True).relay.remote(request)
        items = aiter(answer)
        start: ResponseStart | None = None
        held: list[bytes] = []
        ended = False
        try:
            while True:
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    ended = True
                    break
                except LOST as exc:
                    ended = True
                    if start is None or not start.event_stream:
                        return exc
                    logger.warning("%s %s: gateway %s lost mid-stream: %s", request.method, request.path,
                                   start.gateway, _last_line(exc))
                    await send({"type": "http.response.body", "body": lost_event(start.gateway, exc),
                                "more_body": False})
                    return None
                except Exception as exc:  # noqa: BLE001 - the gateway's relay failed (a bug): still an end
                    ended = True
                    logger.exception("%s %s: the gateway's relay failed", request.method, request.path)
                    await self._failed(send, start, exc)
                    return None
                # A send that fails (the client went away) raises out of here; the finally stops the gateway's work.
                if isinstance(item, ResponseStart):
                    start = item
                    if start.event_stream:  # streamed through as it comes; anything else is sent whole
                        await send({"type": "http.response.start", "status": start.status, "headers": start.headers})
                elif start is not None and start.event_stream:
                    await send({"type": "http.response.body", "body": item, "more_body": True})
                else:
                    held.append(item)
        finally:
            if not ended:  # cancelled (the client went away) or the client's connection failed
                answer.cancel()
        if start is None:
            return RuntimeError("the gateway ended its answer without a response")
        if start.event_stream:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await _send_whole(send, start, b"".join(held))
        return None

    @staticmethod
    async def _failed(send: Callable, start: ResponseStart | None, exc: BaseException) -> None:
        message = f"the gateway failed: {_last_line(exc)}"
        if start is not None and start.event_stream:
            error = {"message": message, "type": "server_error", "param": None, "code": "gateway_error"}
            await send({"type": "http.response.body", "more_body": False,
                        "body": f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()})
        else:
            await _send_whole(send, *error_response(500, message, "gateway_error"))


async def _send_whole(send: Callable, start: ResponseStart, body: bytes) -> None:
    await send({"type": "http.response.start", "status": start.status, "headers": start.headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


async def _front_asgi(scope: dict, receive: Callable, send: Callable) -> None:
    """The front replica's ASGI app: HTTP goes to its Relay; lifespan is acknowledged (nothing to start)."""
    if scope["type"] == "http":
        await serve.get_replica_context().servable_object.relay(scope, receive, send)
    elif scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})


def _front_app() -> Callable[..., Awaitable[None]]:
    return _front_asgi


@serve.deployment(name="expertmesh-front", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0, "num_gpus": 0})
@serve.ingress(_front_app)
class FrontDeployment:
    """The application's HTTP ingress: holds no request state, so a gateway replica dying ends only the requests it
    served, each with a clear error; the front's own replicas do nothing but relay bytes."""

    def __init__(self, gateway: Any, max_request_bytes: int) -> None:
        self.relay = Relay(gateway, max_request_bytes)
