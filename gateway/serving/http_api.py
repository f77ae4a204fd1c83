"""The OpenAI-compatible HTTP API (FastAPI): completions with SSE streaming, models, health, Prometheus metrics,
API keys, and the client's W3C trace context."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.serving.engine_loop import EngineLoop
from gateway.serving.scheduler import QueueFull
from model_core.telemetry import client_trace_context, trace_id_of

PROTECTED_PREFIXES = ("/v1/", "/admin/")  # what the API key guards; /health, /ready and /metrics stay open
TRACE_ID_HEADER = "x-trace-id"


class CompletionRequest(BaseModel):
    """POST /v1/completions (the subset of OpenAI's fields expertmesh implements; others are rejected)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    seed: int | None = None
    user: str | None = None


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape: {"error": {"message", "type", "code"?}}."""
    body: dict[str, Any] = {"message": message, "type": kind}
    if code is not None:
        body["code"] = code
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


class ApiKeyMiddleware:
    """Answers 401 to /v1/* and /admin/* requests without the API key, before their bodies are read or
    validated. api_key() gives the key in force (None: open), read per request so its owner sets it after the
    app is built."""

    def __init__(self, app: Any, api_key: Callable[[], str | None]) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _route_path(scope).startswith(PROTECTED_PREFIXES):
            headers = dict(scope.get("headers") or [])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            denied = authorize(self.api_key(), authorization)
            if denied is not None:
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope: dict) -> str:
    """The path below the app's mount point (Ray Serve's route_prefix arrives as root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


@dataclass
class GatewayState:
    """What the handlers need: the engine loop, the model's name, its tokenizer (None: ids only)."""

    engine_loop: EngineLoop
    model_name: str
    tokenizer: Any = None


def create_app(api_key: Callable[[], str | None] | None = None) -> FastAPI:
    """The FastAPI app with 400s for malformed or invalid bodies and, given api_key (a callable giving the key in
    force, None: open), 401s for /v1/* and /admin/* requests without it; a host (the Ray Serve deployment) adds
    the routes as methods that call the handlers below with its GatewayState."""
    app = FastAPI(title="expertmesh", version="0.1.0")
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                             for e in exc.errors())
        return error(400, problems)

    return app


def ready(state: GatewayState | None) -> JSONResponse:
    if state is None:
        return JSONResponse(status_code=503, content={"status": "loading"})
    return JSONResponse(content={"status": "ready", "model": state.model_name})


def models(state: GatewayState) -> dict:
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "owned_by": "expertmesh"}]}


async def completions(state: GatewayState, body: CompletionRequest, headers: Mapping[str, str] | None = None,
                      response: Response | None = None) -> Any:
    """POST /v1/completions: JSON, or server-sent events when body.stream.

    headers: the HTTP request's; with tracing on, the request's span continues the caller's `traceparent` /
    `tracestate` (a malformed one is ignored: a new trace starts) and the answer carries the trace id in
    `x-trace-id` (on `response`, FastAPI's, when the answer is a plain dict).
    """
    result = await _complete(state, body, headers)
    if isinstance(result, tuple):
        result, trace_id = result
        target = result if isinstance(result, Response) else response
        if trace_id is not None and target is not None:
            target.headers[TRACE_ID_HEADER] = trace_id
    return result


async def _complete(state: GatewayState, body: CompletionRequest, headers: Mapping[str, str] | None) -> Any:
    """The completion, with its trace id once a request was submitted: (answer, trace id or None)."""
    loop = state.engine_loop
    if body.model is not None and body.model != state.model_name:
        return error(404, f"model={body.model!r}: this server serves {state.model_name!r}", "not_found_error")
    if isinstance(body.prompt, str):
        if state.tokenizer is None:
            return error(400, "prompt: this model has no tokenizer.json; send token ids")
        prompt = state.tokenizer.encode(body.prompt)
    else:
        prompt = body.prompt
    tracing = loop.engine.telemetry.tracer is not None
    try:
        req, queue = loop.submit(prompt, asyncio.get_running_loop(), max_new_tokens=body.max_tokens,
                                 temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                 trace_context=client_trace_context(headers) if tracing else None)
    except QueueFull as exc:
        loop.stats.requests["rejected"] += 1
        return error(429, str(exc), "rate_limit_error")
    except ValueError as exc:
        loop.stats.requests["rejected"] += 1
        return error(400, str(exc).replace("max_new_tokens", "max_tokens"))  # the API's name for it
    trace_id = trace_id_of(req.span)
    created = int(time.time())
    deadline = time.monotonic() + loop.engine.config.scheduler.request_timeout_s
    if body.stream:
        stream = _stream(req, queue, state, created, deadline)
        return StreamingResponse(stream, media_type="text/event-stream"), trace_id
    try:
        while (await _next(queue, deadline))[0] != "done":
            pass
    except asyncio.TimeoutError:
        loop.expire(req)
        return error(504, _timeout_message(req, state), "timeout_error"), trace_id
    finally:
        loop.cancel(req)  # a no-op when it finished; stops generation if the client went away
    if req.error:
        return error(503, f"request {req.request_id} failed: {req.error}", "server_error"), trace_id
    return _completion(req, state, created), trace_id


def routing(state: GatewayState, request_id: str) -> Any:
    """GET /v1/routing/{request_id}: the request's routing trace."""
    try:
        return state.engine_loop.engine.routing_trace(request_id).to_json()
    except KeyError as exc:
        return error(404, str(exc.args[0]), "not_found_error")


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


def _text(state, tokens: list[int]) -> str:
    return state.tokenizer.decode(tokens) if state.tokenizer is not None else ""


def _completion(req, state, created: int) -> dict:
    return {
        "id": f"cmpl-{req.request_id}", "object": "text_completion", "created": created, "model": state.model_name,
        "choices": [{"index": 0, "text": _text(state, req.output), "token_ids": req.output, "logprobs": None,
                     "finish_reason": req.finish_reason}],
        "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.output),
                  "total_tokens": len(req.prompt) + len(req.output),
                  # OpenAI's prompt-caching field: prompt positions the prefix cache supplied (not recomputed)
                  "prompt_tokens_details": {"cached_tokens": min(req.cached_prompt, len(req.prompt))}},
    }


async def _next(queue: asyncio.Queue, deadline: float) -> tuple[str, Any]:
    """The request's next event; asyncio.TimeoutError once its deadline (time.monotonic) has passed, so no
    client waits forever on an engine that stalled."""
    return await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0.0))


def _timeout_message(req, state: GatewayState) -> str:
    limit = state.engine_loop.engine.config.scheduler.request_timeout_s
    return (f"request {req.request_id}: no result within scheduler.request_timeout_s={limit:g} s "
            f"({len(req.output)} tokens generated); cancelled")


async def _stream(req, queue: asyncio.Queue, state, created: int, deadline: float):
    """Server-sent events: one chunk per token, a final chunk with finish_reason and usage, then [DONE]."""
    try:
        async for event in _events(req, queue, state, created, deadline):
            yield event
    finally:  # the client disconnected (the generator is closed early) or the request ended: a no-op then
        state.engine_loop.cancel(req)


async def _events(req, queue: asyncio.Queue, state, created: int, deadline: float):
    emitted, tokens = "", []
    while True:
        try:
            kind, value = await _next(queue, deadline)
        except asyncio.TimeoutError:
            state.engine_loop.expire(req)
            error_event = {"error": {"message": _timeout_message(req, state), "type": "timeout_error"}}
            yield f"data: {json.dumps(error_event)}\n\n"
            yield "data: [DONE]\n\n"
            return
        if kind == "done":
            break
        tokens.append(value)
        text = _text(state, tokens)
        piece = "" if text.endswith("\ufffd") else text[len(emitted):]  # hold back a half-decoded UTF-8 char
        emitted += piece
        chunk = {"id": f"cmpl-{req.request_id}", "object": "text_completion", "created": created,
                 "model": state.model_name,
                 "choices": [{"index": 0, "text": piece, "token_ids": [value], "finish_reason": None}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    if req.error:
        yield f"data: {json.dumps({'error': {'message': req.error, 'type': 'server_error'}})}\n\n"
    else:
        final = _completion(req, state, created)
        final["choices"][0]["text"] = _text(state, req.output)[len(emitted):]
        final["choices"][0]["token_ids"] = []
        yield f"data: {json.dumps(final)}\n\n"
    yield "data: [DONE]\n\n"


def prometheus_text(loop: EngineLoop) -> str:
    """Prometheus exposition text, built from the engine's live counters at scrape time."""
    engine, stats = loop.engine, loop.stats
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
    metric("queue_depth", "gauge", "Requests waiting for admission.", [({}, len(engine.scheduler.waiting))])
    metric("running_sequences", "gauge", "Sequences in the running batch.", [({}, len(engine.scheduler.running))])
    metric("steps_total", "counter", "Engine steps.", [({}, stats.steps)])
    cache = engine.cache.stats()
    metric("cache_blocks", "gauge", "Blocks of the paged latent cache, by state.",
           [({"state": "free"}, cache["free_blocks"]), ({"state": "used"}, cache["blocks"] - cache["free_blocks"])])
    metric("cache_block_tokens", "gauge", "Tokens per latent-cache block.", [({}, cache["block_size"])])
    metric("preemptions_total", "counter", "Sequences whose cache was taken back for others (then recomputed).",
           [({}, engine.scheduler.preemptions)])
    metric("prefix_cache_tokens_total", "counter", "Prompt tokens looked up in the prefix cache, and those found.",
           [({"result": "queried"}, cache["prefix_queried_tokens"]), ({"result": "hit"}, cache["prefix_hit_tokens"])])
    metric("step_seconds_total", "counter", "Time spent in engine steps.", [({}, stats.step_seconds)])
    summary = engine.routing_summary
    metric("expert_tokens_total", "counter", "Tokens routed to each expert, per MoE layer.",
           [({"layer": layer, "expert": e}, int(c)) for layer, counts in summary.tokens_per_expert.items()
            for e, c in enumerate(counts.tolist())])
    metric("expert_balancedness", "gauge", "Mean over max expert load per layer (1 = perfectly even).",
           [({"layer": layer}, (counts.float().mean() / counts.max()).item() if counts.max() > 0 else 0.0)
            for layer, counts in summary.tokens_per_expert.items()])
    dispatch = engine.backend.stats
    metric("device_tokens_total", "counter", "Token rows dispatched to each device, per MoE layer.",
           [({"layer": layer, "device": d}, int(c)) for layer, counts in dispatch.tokens.items()
            for d, c in enumerate(counts.tolist())])
    metric("dispatch_calls_total", "counter", "Expert-group calls.", [({}, dispatch.calls)])
    metric("dispatch_seconds_total", "counter", "Wall time of layer dispatches (send to combine).",
           [({}, dispatch.wait_seconds)])
    metric("dispatch_layers_total", "counter", "Layer dispatches.", [({}, dispatch.layers)])
    placement = engine.backend.placement
    metric("placement_version", "gauge", "Version of the expert placement in use (re-placements raise it).",
           [({}, placement.version)])
    metric("redundant_expert_slots", "gauge", "Expert copies beyond one per expert, per MoE layer.",
           [({"layer": layer}, placement.redundant_slots(layer)) for layer in engine.spec.moe_layers])
    metric("rearrangements_total", "counter", "Placements switched to while serving.", [({}, engine.rearrangements)])
    metric("rearrangement_failures_total", "counter", "Re-placements that failed (the old placement kept serving).",
           [({}, engine.rearrangement_failures)])
    pool = engine.backend.pool
    if pool is not None:
        pool.poll()  # apply what background probes of failed replicas found
        metric("group_replicas", "gauge", "Live replicas per expert group.",
               [({"group": d}, len(pool.live(d))) for d in sorted(pool.groups)])
        metric("replica_restarts_total", "counter", "Expert-group actors Ray restarted after a failure.",
               [({}, pool.restarts)])
        metric("replicas_evicted_total", "counter", "Replicas removed (and replaced) after staying down.",
               [({}, pool.evicted)])
        metric("dispatch_retries_total", "counter", "Dispatch calls re-sent after a replica failed.",
               [({}, engine.backend.transport.retries)])
        metric("replica_inflight", "gauge", "Dispatch calls in flight on each expert-group replica.",
               [({"group": g, "replica": i}, n) for (g, i), n in sorted(pool.inflight().items())])
    if engine.balance is not None:
        m = engine.balance.metrics()
        metric("bias_version", "gauge", "Version of the live balancing bias in use.", [({}, m["bias_version"])])
        metric("router_unreachable", "gauge", "1 when the router service cannot be reached.",
               [({}, int(m["router_unreachable"]))])
    return "\n".join(lines) + "\n"


def _resident_memory_bytes() -> int | None:
    """This process's resident set size from /proc/self/statm (Linux); None where there is no /proc."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
