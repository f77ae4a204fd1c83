"""The choices of one OpenAI request: submitted to the engine together, their tokens merged as they come, stop
strings found, usage counted, errors in OpenAI's shape, and the SSE stream both endpoints send."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response

from gateway.serving.http_api import GatewayState, error
from gateway.serving.openai_request import OpenAIRequest
from gateway.serving.scheduler import QueueFull, Request
from model_core.telemetry import client_trace_context, trace_id_of


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def response(self) -> Response:
        return error(self.status, self.message, self.kind)


@dataclass
class Choice:
    """One choice being generated: its request, what it has produced, and the stop strings that may end it."""

    index: int
    prompt_index: int
    request: Request
    queue: asyncio.Queue
    stop: list[str]
    tokenizer: Any
    tokens: list[int] = field(default_factory=list)  # generated tokens up to (with) the one that met a stop string
    streamed: int = 0  # characters of `text` already sent
    stopped: bool = False  # a stop string ended it
    _cut: int | None = None  # where the text ends (before the first stop string met)
    _decoded: tuple[int, str] = (0, "")  # (tokens decoded, their text): `text` decodes once per new token

    def feed(self, token: int) -> None:
        """A generated token; tokens after a stop string met are dropped (the engine is told to stop). A stop
        string not met before must end in the newest token, so only the last few tokens are decoded to look."""
        if self.stopped:
            return
        self.tokens.append(token)
        if not self.stop:
            return
        window = 4 * max(len(s) for s in self.stop) + 8  # bytes of the longest stop, with room for a split char
        tail = decode(self.tokenizer, self.tokens[-window:])
        if any(s in tail for s in self.stop):
            full = self._full_text()
            hits = [full.find(s) for s in self.stop if s in full]
            if hits:
                self._cut, self.stopped = min(hits), True

    def _full_text(self) -> str:
        if self._decoded[0] != len(self.tokens):
            self._decoded = (len(self.tokens), decode(self.tokenizer, self.tokens))
        return self._decoded[1]

    @property
    def text(self) -> str:
        """The generated text, cut before the stop string that ended it."""
        full = self._full_text()
        return full if self._cut is None else full[: self._cut]

    def pending_piece(self, final: bool) -> str:
        """Text to stream now: what is certain, holding back a half-decoded UTF-8 character and a tail that could
        still become a stop string (all of it once the choice is done)."""
        safe = self.text
        if not final and not self.stopped:
            safe = safe.removesuffix("\ufffd")
            for s in self.stop:
                for k in range(min(len(s) - 1, len(safe)), 0, -1):
                    if safe.endswith(s[:k]):
                        safe = safe[: len(safe) - k]
                        break
        piece = safe[self.streamed:] if len(safe) > self.streamed else ""
        self.streamed = max(self.streamed, len(safe))
        return piece

    @property
    def finish_reason(self) -> str | None:
        return "stop" if self.stopped else self.request.finish_reason


def decode(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens) if tokenizer is not None else ""


def token_text(tokenizer: Any, token: int) -> str:
    """A token's text for logprobs (vLLM's `token_id:N` form when the model has no tokenizer)."""
    return tokenizer.decode([token]) if tokenizer is not None else f"token_id:{token}"


def start_choices(state: GatewayState, ids: list[list[int]], body: OpenAIRequest, max_tokens: int,
                  logprobs: int | None, headers: Mapping[str, str] | None) -> tuple[list[Choice], str | None]:
    """Submit body.n choices per prompt, sampling by the body's SamplingParams (choice i·n + j samples with
    seed + i·n + j); all or none: a refused one cancels the others (ApiError 400 naming the prompt, 429 when the
    queue is full). Returns the choices and the trace id (tracing on: each choice's span continues the caller's
    `traceparent`)."""
    loop = state.engine_loop
    context = client_trace_context(headers) if loop.engine.telemetry.tracer is not None else None
    choices: list[Choice] = []
    try:
        params = body.sampling_params(max_tokens, logprobs)
        for i, prompt in enumerate(ids):
            for j in range(body.n):
                index = i * body.n + j
                try:
                    req, queue = loop.submit(prompt, asyncio.get_running_loop(), trace_context=context,
                                             params=params.for_choice(index))
                except ValueError as exc:
                    where = "" if len(ids) == 1 else f"prompt[{i}]: "
                    raise ValueError(where + str(exc).replace("max_new_tokens", "max_tokens")) from None
                choices.append(Choice(index, i, req, queue, body.stop, state.tokenizer))
    except (QueueFull, ValueError) as exc:
        for c in choices:
            loop.cancel(c.request)
        loop.stats.requests["rejected"] += 1
        if isinstance(exc, QueueFull):
            raise ApiError(429, str(exc), "rate_limit_error") from None
        raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens")) from None
    return choices, trace_id_of(choices[0].request.span)


async def finish_choices(state: GatewayState, choices: list[Choice], deadline: float) -> None:
    """Wait until every choice is done; ApiError 504 past the deadline (they are cancelled), 503 if one failed."""
    loop = state.engine_loop
    try:
        async for _ in stream_tokens(state, choices, deadline):
            pass
    except asyncio.TimeoutError:
        for c in choices:
            loop.expire(c.request)
        raise ApiError(504, timeout_message(state, choices), "timeout_error") from None
    finally:
        for c in choices:
            loop.cancel(c.request)  # a no-op when it finished; stops generation if the client went away
    failed = next((c.request for c in choices if c.request.error), None)
    if failed is not None:
        raise ApiError(503, f"request {failed.request_id} failed: {failed.error}", "server_error")


def deadline_of(state: GatewayState) -> float:
    return time.monotonic() + state.engine_loop.engine.config.scheduler.request_timeout_s


def check_model(state: GatewayState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ApiError(404, f"model={model!r}: this server serves {state.model_name!r}", "not_found_error")


async def stream_tokens(state: GatewayState, choices: list[Choice], deadline: float):
    """Yields (choice, token) as the engine produces them, across every choice, until each is done; a choice that
    meets a stop string is stopped in the engine (its later tokens are dropped)."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        while True:
            kind, value = await choice.queue.get()
            await merged.put((choice, kind, value))
            if kind == "done":
                return

    pumps = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            choice, kind, value = await asyncio.wait_for(merged.get(), max(deadline - time.monotonic(), 0.0))
            if kind == "done":
                remaining -= 1
                continue
            if choice.stopped:
                continue
            choice.feed(value)
            if choice.stopped:
                state.engine_loop.cancel(choice.request, "stop")
            yield choice, value
    finally:
        for p in pumps:
            p.cancel()


def usage_of(choices: list[Choice], ids: list[list[int]]) -> dict:
    prompt_tokens = sum(len(p) for p in ids)
    completion = sum(len(c.tokens) for c in choices)
    # OpenAI's prompt-caching field: prompt positions the prefix cache supplied, each prompt counted once (the
    # least any of its choices was given).
    cached = sum(min(min(c.request.cached_prompt, len(ids[i])) for c in choices if c.prompt_index == i)
                 for i in range(len(ids)))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def timeout_message(state: GatewayState, choices: list[Choice]) -> str:
    limit = state.engine_loop.engine.config.scheduler.request_timeout_s
    made = sum(len(c.tokens) for c in choices)
    return (f"request {choices[0].request.request_id}: no result within scheduler.request_timeout_s={limit:g} s "
            f"({made} tokens generated); cancelled")


def wants_routed_experts(state: GatewayState, body: OpenAIRequest) -> bool:
    """The request asked for its routed experts, or the server returns them always
    (tracing.return_routed_experts)."""
    return body.return_routed_experts or state.engine_loop.engine.config.tracing.return_routed_experts


def routed_experts(state: GatewayState, choice: Choice) -> dict:
    """A finished choice's routed experts, from its routing trace (what GET /v1/routing/{request_id} answers):
    `expert_ids` [tokens, moe_layers, top_k] logical expert ids (the shape of vLLM's return-routed-experts and
    SGLang's return_routed_experts) with `devices` beside them (the group that computed each pair). Tokens are
    the positions the model routed for this choice: the prompt, then each generated token but the last (which no
    forward has read); positions the prefix cache supplied carry -1 (another request routed them)."""
    request_id = choice.request.request_id
    try:
        trace = state.engine_loop.engine.routing_trace(request_id)
    except KeyError:  # evicted already (tracing.routing_trace_capacity / routing_trace_max_mb)
        return {"request_id": request_id, "error": "routing trace evicted before the answer was written; raise "
                                                   "tracing.routing_trace_capacity or routing_trace_max_mb"}
    ids = trace.ids
    return {"request_id": request_id, "layers": trace.layers, "shape": list(ids.shape),
            "prompt_tokens": trace.prompt_tokens, "expert_ids": ids.tolist(), "devices": trace.devices.tolist()}


def error_event(message: str, kind: str) -> str:
    """A server-sent event carrying an error in OpenAI's shape (a stream cannot change its 200 any more)."""
    return f"data: {json.dumps({'error': {'message': message, 'type': kind, 'param': None, 'code': None}})}\n\n"


async def sse_stream(state: GatewayState, choices: list[Choice], deadline: float, opening: list[str],
                     on_token: Callable[[Choice, int], str], closing: Callable[[Choice], str],
                     usage: Callable[[], str | None]):
    """The server-sent events of one API request: `opening`, an event per generated token (on_token), then each
    choice's closing event and usage() (None: none), then [DONE]. Past the deadline or when a choice failed it
    ends with an error event; a client that goes away (the generator closed early) cancels every choice."""
    loop = state.engine_loop
    try:
        for event in opening:
            yield event
        try:
            async for c, token in stream_tokens(state, choices, deadline):
                yield on_token(c, token)
        except asyncio.TimeoutError:
            for c in choices:
                loop.expire(c.request)
            yield error_event(timeout_message(state, choices), "timeout_error")
            yield "data: [DONE]\n\n"
            return
        failed = next((c.request for c in choices if c.request.error), None)
        if failed is not None:
            yield error_event(f"request {failed.request_id} failed: {failed.error}", "server_error")
        else:
            for c in choices:
                yield closing(c)
            last = usage()
            if last is not None:
                yield last
        yield "data: [DONE]\n\n"
    finally:  # the client disconnected or every choice ended (then a no-op)
        for c in choices:
            loop.cancel(c.request)
