"""The OpenAI-compatible HTTP API (FastAPI): the app, errors in OpenAI's shape, API keys, models, health, routing
traces, scaling and Prometheus metrics (completions: gateway/serving/completions.py)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.serving.engine_loop import EngineLoop
from gateway.serving.request_checks import REQUEST_ID_LENGTH, REQUEST_ID_SHAPE

logger = logging.getLogger(__name__)
TRACE_ID_HEADER = "x-trace-id"


MAX_ERROR_CHARS = 2000  # an error message longer than this is cut (it may quote what the client sent)
NAMED_PROBLEM = re.compile(r"([A-Za-z_][\w.<>]*): ")  # a whole-body check's message: "<field>: <problem>"
ERROR_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          headers: Mapping[str, str] | None = None, param: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}. The message is cut at
    MAX_ERROR_CHARS and any text that is not valid UTF-8 (a lone surrogate) is escaped, so an error can always be
    sent whatever it quotes."""
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + f"... ({len(message) - MAX_ERROR_CHARS} more characters)"
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"message": safe, "type": kind, "param": param, "code": code}
    return JSONResponse(status_code=status, content={"error": body}, headers=headers)


def authorize(expected_key: str | None, authorization: str | None) -> JSONResponse | None:
    """None when the request may pass (no key configured, or `Authorization: Bearer <expected_key>`), else the
    401 to answer. The key is compared in constant time and never logged or echoed."""
    if expected_key is None:
        return None
    scheme, _, sent = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not sent.strip():
        return error(401, "missing API key: send it as 'Authorization: Bearer <key>'", "invalid_request_error",
                     "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(sent.strip().encode("utf-8"), expected_key.encode("utf-8")):
        return error(401, "incorrect API key provided", "invalid_request_error", "invalid_api_key",
                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return None


@dataclass(frozen=True)
class Access:
    """What the HTTP guard enforces: the API key of /v1/* (None: open), the admin key of /admin/* (None: the admin
    routes are off) and the largest request body read."""

    api_key: str | None = None
    admin_key: str | None = None
    max_request_bytes: int = 4 << 20


class RequestGuard:
    """ASGI middleware in front of the routes: /v1/* without the API key and /admin/* without the admin key get
    401 (403 while no admin key is configured), a body over max_request_bytes gets 413, all before the body is
    parsed or validated. access() is read per request, so its owner (a Serve replica) sets it after the app is
    built."""

    def __init__(self, app: Any, access: Callable[[], Access]) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        access, path = self.access(), _route_path(scope)
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        denied = None
        if path.startswith("/admin/"):
            denied = (error(403, "the admin API is off: configure server.admin_key (or server.admin_key_file, "
                                 "EXPERTMESH_ADMIN_KEY) to use /admin/*", "permission_error")
                      if access.admin_key is None else authorize(access.admin_key, authorization))
        elif path.startswith("/v1/"):
            denied = authorize(access.api_key, authorization)
        if denied is None:
            receive, denied = await _bounded_body(headers, receive, access.max_request_bytes)
        if denied is not None:
            await denied(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _bounded_body(headers: dict, receive: Any, limit: int) -> tuple[Any, JSONResponse | None]:
    """Read the request body up front (at most `limit` bytes) and replay it to the app; 413 past the limit (by
    Content-Length at once, else once the bytes read pass it)."""
    too_large = error(413, f"request body: larger than server.max_request_bytes={limit}", "invalid_request_error")
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return receive, too_large
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        if size > limit:
            return receive, too_large
        if not message.get("more_body", False):
            break

    async def replay() -> dict:
        return messages.pop(0) if messages else await receive()

    return replay, None


def _route_path(scope: dict) -> str:
    """The path below the app's mount point (Ray Serve's route_prefix arrives as root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


@dataclass
class GatewayState:
    """What the handlers need: the engine loop, the model's name, its tokenizer (None: ids only) and chat template
    (None: no /v1/chat/completions)."""

    engine_loop: EngineLoop
    model_name: str
    tokenizer: Any = None
    chat_template: Any = None


def create_app(access: Callable[[], Access] | None = None) -> FastAPI:
    """The FastAPI app with 400s for malformed or invalid bodies and the RequestGuard enforcing access() (keys,
    body size; None: Access(), an open API with the admin routes off); a host (the Ray Serve deployment) adds the
    routes as methods that call the handlers with its GatewayState."""
    app = FastAPI(title="expertmesh", version="0.1.0")
    app.add_middleware(RequestGuard, access=access or Access)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [(_field_of(e), _problem_of(e)) for e in exc.errors()]
        return error(400, "; ".join(f"{f}: {p}" for f, p in problems), param=problems[0][0] if problems else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405, ...
        kind = ERROR_TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error")
        message = str(exc.detail)
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow", "?")
            message = f"method {request.method}: not allowed on this route (allowed: {allowed})"
        elif exc.status_code == 404 and message == "Not Found":
            message = "not found: no route at this path (the API is under /v1/: completions, chat/completions, models)"
        return error(exc.status_code, message, kind, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:  # a bug: logged, answered in OpenAI's shape
        logger.error("unhandled %s in an HTTP handler", type(exc).__name__, exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); see the gateway log", "server_error")

    return app


def _field_of(problem: dict) -> str:
    """A validation problem's field, as a request writes it: messages.0.content, prompt, body (the whole); a
    whole-body check names its field first ("best_of: not supported ...")."""
    where = ".".join(str(p) for p in problem["loc"] if p != "body")
    if problem["type"] == "json_invalid":
        return "body"
    if not where and problem["type"] == "value_error":
        named = NAMED_PROBLEM.match(problem["msg"].removeprefix("Value error, "))
        return named.group(1) if named else "body"
    return where or "body"


def _problem_of(problem: dict) -> str:
    """What is wrong, in words (pydantic's, or a check's message without the field it starts with)."""
    kind, where = problem["type"], [p for p in problem["loc"] if p != "body"]
    if kind == "json_invalid":
        position = problem["loc"][-1] if len(problem["loc"]) > 1 else "?"
        return f"not valid JSON ({problem.get('ctx', {}).get('error', 'JSON decode error')} at character {position})"
    if not where and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "expected a JSON object (sent with Content-Type: application/json)"
    message = problem["msg"].removeprefix("Value error, ")
    named = NAMED_PROBLEM.match(message) if not where and kind == "value_error" else None
    return message[named.end():] if named else message


def ready(state: GatewayState | None) -> JSONResponse:
    if state is None:
        return JSONResponse(status_code=503, content={"status": "loading"})
    return JSONResponse(content={"status": "ready", "model": state.model_name})


def models(state: GatewayState) -> dict:
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "owned_by": "expertmesh"}]}


def routing(state: GatewayState, request_id: str) -> Any:
    """GET /v1/routing/{request_id}: the request's routing trace. An id not of the shape the engine issues is
    answered 404 without being echoed (it can be any length)."""
    if not REQUEST_ID_SHAPE.fullmatch(request_id):
        return error(404, f"request_id: not a request id of this server (expected {REQUEST_ID_LENGTH} lowercase hex "
                          "digits: a completion's id is cmpl-<request id>)", "not_found_error", param="request_id")
    try:
        return state.engine_loop.engine.routing_trace(request_id).to_json()
    except KeyError as exc:
        return error(404, str(exc.args[0]), "not_found_error", param="request_id")


class ScaleRequest(BaseModel):
    """POST /admin/scale."""

    model_config = ConfigDict(extra="forbid")

    group: int = Field(ge=0)
    replicas: int = Field(ge=1, le=64)


async def scale(state: GatewayState, body: ScaleRequest) -> Any:
    """Change a group's replica count while serving (blocks this request, not the others)."""
    engine = state.engine_loop.engine
    try:
        live = await asyncio.to_thread(engine.scale, body.group, body.replicas)
    except ValueError as exc:
        return error(400, str(exc))
    return {"group": body.group, "replicas": len(live), "replica_ids": live}


def metrics(state: GatewayState) -> PlainTextResponse:
    return PlainTextResponse(prometheus_text(state.engine_loop), media_type="text/plain; version=0.0.4")


def prometheus_text(loop: EngineLoop) -> str:
    """Prometheus exposition text from the loop's counters and the engine's metrics snapshot. A scrape only reads:
    it polls no replica probe and changes no state (the engine loop polls)."""
    m, stats = loop.engine.metrics(), loop.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP expertmesh_{name} {help_text}")
        lines.append(f"# TYPE expertmesh_{name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"expertmesh_{name}{{{label_text}}} {value}" if labels else f"expertmesh_{name} {value}")

    uptime = max(time.time() - stats.started, 1e-9)
    rss = _resident_memory_bytes()
    if rss is not None:
        metric("process_resident_memory_bytes", "gauge", "Resident memory of this gateway process.", [({}, rss)])
    metric("requests_total", "counter", "Completion requests by outcome.",
           [({"status": k}, v) for k, v in stats.requests.items()])
    metric("generated_tokens_total", "counter", "Tokens generated.", [({}, stats.tokens_generated)])
    metric("tokens_per_second", "gauge", "Generated tokens per second since start.",
           [({}, stats.tokens_generated / uptime)])
    metric("queue_depth", "gauge", "Requests waiting for admission.", [({}, m.queue_depth)])
    metric("running_sequences", "gauge", "Sequences in the running batch.", [({}, m.running)])
    metric("steps_total", "counter", "Engine steps.", [({}, stats.steps)])
    cache = m.cache
    metric("cache_blocks", "gauge", "Blocks of the paged latent cache, by state.",
           [({"state": "free"}, cache["free_blocks"]), ({"state": "used"}, cache["blocks"] - cache["free_blocks"])])
    metric("cache_block_tokens", "gauge", "Tokens per latent-cache block.", [({}, cache["block_size"])])
    metric("preemptions_total", "counter", "Sequences whose cache was taken back for others (then recomputed).",
           [({}, m.preemptions)])
    metric("prefix_cache_tokens_total", "counter", "Prompt tokens looked up in the prefix cache, and those found.",
           [({"result": "queried"}, cache["prefix_queried_tokens"]), ({"result": "hit"}, cache["prefix_hit_tokens"])])
    metric("step_seconds_total", "counter", "Time spent in engine steps.", [({}, stats.step_seconds)])
    metric("expert_tokens_total", "counter", "Tokens routed to each expert, per MoE layer.",
           [({"layer": layer, "expert": e}, c) for layer, counts in m.tokens_per_expert.items()
            for e, c in enumerate(counts)])
    metric("expert_balancedness", "gauge", "Mean over max expert load per layer (1 = perfectly even).",
           [({"layer": layer}, sum(counts) / len(counts) / max(counts) if max(counts) > 0 else 0.0)
            for layer, counts in m.tokens_per_expert.items()])
    metric("device_tokens_total", "counter", "Token rows dispatched to each device, per MoE layer.",
           [({"layer": layer, "device": d}, c) for layer, counts in m.device_tokens.items()
            for d, c in enumerate(counts)])
    metric("dispatch_calls_total", "counter", "Expert-group calls.", [({}, m.dispatch_calls)])
    metric("dispatch_seconds_total", "counter", "Wall time of layer dispatches (send to combine).",
           [({}, m.dispatch_seconds)])
    metric("dispatch_layers_total", "counter", "Layer dispatches.", [({}, m.dispatch_layers)])
    metric("placement_version", "gauge", "Version of the expert placement in use (re-placements raise it).",
           [({}, m.placement_version)])
    metric("redundant_expert_slots", "gauge", "Expert copies beyond one per expert, per MoE layer.",
           [({"layer": layer}, n) for layer, n in m.redundant_slots.items()])
    metric("rearrangements_total", "counter", "Placements switched to while serving.", [({}, m.rearrangements)])
    metric("rearrangement_failures_total", "counter", "Re-placements that failed (the old placement kept serving).",
           [({}, m.rearrangement_failures)])
    replicas = m.replicas
    if replicas is not None:
        metric("group_replicas", "gauge", "Live replicas per expert group.",
               [({"group": d}, n) for d, n in replicas.live.items()])
        metric("replica_restarts_total", "counter", "Expert-group actors Ray restarted after a failure.",
               [({}, replicas.restarts)])
        metric("replicas_evicted_total", "counter", "Replicas removed (and replaced) after staying down.",
               [({}, replicas.evicted)])
        metric("dispatch_retries_total", "counter", "Dispatch calls re-sent after a replica failed.",
               [({}, m.dispatch_retries)])
        metric("replica_inflight", "gauge", "Dispatch calls in flight on each expert-group replica.",
               [({"group": g, "replica": i}, n) for (g, i), n in replicas.inflight.items()])
    if m.balance is not None:
        metric("bias_version", "gauge", "Version of the live balancing bias in use.", [({}, m.balance["bias_version"])])
        metric("router_unreachable", "gauge", "1 when the router service cannot be reached.",
               [({}, int(m.balance["router_unreachable"]))])
    return "\n".join(lines) + "\n"


def _resident_memory_bytes() -> int | None:
    """This process's resident set size from /proc/self/statm (Linux); None where there is no /proc."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
