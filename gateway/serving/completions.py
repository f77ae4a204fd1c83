"""POST /v1/completions with OpenAI's (and vLLM's) semantics: prompt lists, n, stop, logprobs, echo, penalties,
streaming with stream_options.include_usage."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from fastapi.responses import Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from gateway.model.sampling import Penalties
from gateway.serving.http_api import TRACE_ID_HEADER, GatewayState, error
from gateway.serving.scheduler import QueueFull, Request
from model_core.telemetry import client_trace_context, trace_id_of

MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
# OpenAI completions parameters expertmesh refuses, and why (each is named in the 400); best_of 1 is the default.
UNSUPPORTED = {"best_of": "it samples best_of and returns the best by logprob; use n",
               "suffix": "the model has no fill-in-the-middle format", "logit_bias": "not implemented"}


def refuse_unsupported(data: Any, unsupported: dict[str, str]) -> Any:
    """A request body's check (pydantic, before fields): a parameter in `unsupported` set to anything but its
    empty default is refused, naming it and why."""
    if isinstance(data, dict):
        for name, why in unsupported.items():
            value = data.get(name)
            if value not in (None, [], {}, "") and not (name == "best_of" and value == 1):
                raise ValueError(f"{name}: not supported ({why})")
    return data


def stop_strings(value: str | list[str] | None) -> list[str]:
    """`stop` as a list: one string, up to MAX_STOP, none empty."""
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ValueError(f"expected at most {MAX_STOP} non-empty strings")
    return stops


StopStrings = Annotated[str | list[str] | None, AfterValidator(stop_strings)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """The sampling fields /v1/completions and /v1/chat/completions share; a subclass's `unsupported` parameters
    are refused by name, unknown fields too."""

    model_config = ConfigDict(extra="forbid")
    unsupported: ClassVar[dict[str, str]] = {}

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: StopStrings = Field(None, validate_default=True)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # vLLM's extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None  # accepted and ignored, as OpenAI's end-user id

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        return refuse_unsupported(data, cls.unsupported)

    @property
    def penalties(self) -> Penalties:
        return Penalties(self.presence_penalty, self.frequency_penalty, self.repetition_penalty)


class CompletionRequest(OpenAIRequest):
    """The body of POST /v1/completions."""

    unsupported: ClassVar[dict[str, str]] = UNSUPPORTED

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None  # refused unless 1 (UNSUPPORTED), as are suffix and logit_bias
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


def prompts_of(prompt: str | list) -> list[str | list[int]]:
    """The request's prompts: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt or isinstance(prompt[0], int):  # token ids (an empty list: the engine names the problem)
        return [prompt]
    return list(prompt)


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


def logprobs_block(tokenizer: Any, entries: list[tuple[float | None, list[tuple[int, float]]]], tokens: list[int],
                   offset: int) -> dict:
    """OpenAI's completions logprobs object for `tokens`, whose text starts at character `offset`."""
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets, at = [], offset
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {"tokens": texts, "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [{token_text(tokenizer, i): v for i, v in top} if lp is not None else None
                             for lp, top in entries],
            "text_offset": offsets}


async def completions(state: GatewayState, body: CompletionRequest, headers: Mapping[str, str] | None = None,
                      response: Response | None = None) -> Any:
    """POST /v1/completions: JSON, or server-sent events when body.stream.

    headers: the HTTP request's; with tracing on, each choice's span continues the caller's `traceparent` /
    `tracestate` (a malformed one is ignored: a new trace starts) and the answer carries the trace id in
    `x-trace-id` (on `response`, FastAPI's, when the answer is a plain dict).
    """
    result, trace_id = await _complete(state, body, headers)
    target = result if isinstance(result, Response) else response
    if trace_id is not None and target is not None:
        target.headers[TRACE_ID_HEADER] = trace_id
    return result


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def response(self) -> Response:
        return error(self.status, self.message, self.kind)


@dataclass(frozen=True)
class Sampling:
    """How every choice of one API request is generated."""

    max_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int | None
    penalties: Penalties
    logprobs: int | None  # top tokens to report per generated token; None: no logprobs
    stop: list[str]


def encode_prompts(state: GatewayState, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token ids of each prompt (text through the model's tokenizer); ApiError naming the prompt otherwise."""
    if not prompts:
        raise ApiError(400, "prompt: expected a string, a list of strings, token ids or a list of token-id lists")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if state.tokenizer is None:
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise ApiError(400, f"{where}: this model has no tokenizer.json; send token ids")
            p = state.tokenizer.encode(p)
        ids.append(list(p))
    return ids


def start_choices(state: GatewayState, ids: list[list[int]], sampling: Sampling,
                  headers: Mapping[str, str] | None) -> tuple[list[Choice], str | None]:
    """Submit n choices per prompt (choice i·n + j samples with seed + i·n + j); all or none: a refused one
    cancels the others (ApiError 400 naming the prompt, 429 when the queue is full). Returns the choices and the
    trace id (tracing on: each choice's span continues the caller's `traceparent`)."""
    loop = state.engine_loop
    context = client_trace_context(headers) if loop.engine.telemetry.tracer is not None else None
    choices: list[Choice] = []
    try:
        for i, prompt in enumerate(ids):
            for j in range(sampling.n):
                index = i * sampling.n + j
                try:
                    req, queue = loop.submit(
                        prompt, asyncio.get_running_loop(), max_new_tokens=sampling.max_tokens,
                        temperature=sampling.temperature, top_p=sampling.top_p, trace_context=context,
                        seed=None if sampling.seed is None else sampling.seed + index,
                        penalties=sampling.penalties, logprobs=sampling.logprobs)
                except ValueError as exc:
                    where = "" if len(ids) == 1 else f"prompt[{i}]: "
                    raise ValueError(where + str(exc).replace("max_new_tokens", "max_tokens")) from None
                choices.append(Choice(index, i, req, queue, sampling.stop, state.tokenizer))
    except (QueueFull, ValueError) as exc:
        for c in choices:
            loop.cancel(c.request)
        loop.stats.requests["rejected"] += 1
        if isinstance(exc, QueueFull):
            raise ApiError(429, str(exc), "rate_limit_error") from None
        raise ApiError(400, str(exc)) from None
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
        raise ApiError(504, _timeout_message(state, choices), "timeout_error") from None
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


async def _complete(state: GatewayState, body: CompletionRequest, headers: Mapping[str, str] | None) -> tuple:
    trace_id = None
    try:
        check_model(state, body.model)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options: only allowed with stream=true")
        ids = encode_prompts(state, prompts_of(body.prompt))
        sampling = Sampling(body.max_tokens, body.temperature, body.top_p, body.n, body.seed, body.penalties,
                            body.logprobs, body.stop)
        choices, trace_id = start_choices(state, ids, sampling, headers)
        echo = await _echo(state, body, ids)
        created, deadline = int(time.time()), deadline_of(state)
        if body.stream:
            events = _stream(state, body, choices, echo, ids, created, deadline)
            return StreamingResponse(events, media_type="text/event-stream"), trace_id
        await finish_choices(state, choices, deadline)
    except ApiError as exc:
        return exc.response(), trace_id
    return _response(state, body, choices, echo, ids, created), trace_id


async def _echo(state: GatewayState, body: CompletionRequest, ids: list[list[int]]) -> list[tuple[str, Any]] | None:
    """Per prompt, with echo: its text and, when logprobs are asked for, its positions' logprobs (scored in one
    forward of its own, on a worker thread)."""
    if not body.echo:
        return None
    engine = state.engine_loop.engine
    out = []
    for prompt in ids:
        scored = None
        if body.logprobs is not None:
            scored = await asyncio.to_thread(engine.prompt_logprobs, prompt, body.logprobs)
        out.append((decode(state.tokenizer, prompt), scored))
    return out


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


def _choice_logprobs(state: GatewayState, choice: Choice, echo: list | None, ids: list[list[int]]) -> dict | None:
    """The whole choice's logprobs: the echoed prompt's (when echo) then its generated tokens'."""
    req = choice.request
    if req.logprobs is None:
        return None
    generated = req.token_logprobs[: len(choice.tokens)]
    if echo is None:
        return logprobs_block(state.tokenizer, generated, choice.tokens, 0)
    prompt = ids[choice.prompt_index]
    prompt_text, scored = echo[choice.prompt_index]
    head = logprobs_block(state.tokenizer, scored, prompt, 0)
    tail = logprobs_block(state.tokenizer, generated, choice.tokens, len(prompt_text))
    return {k: head[k] + tail[k] for k in head}


def usage_of(choices: list[Choice], ids: list[list[int]]) -> dict:
    prompt_tokens = sum(len(p) for p in ids)
    completion = sum(len(c.tokens) for c in choices)
    # OpenAI's prompt-caching field: prompt positions the prefix cache supplied, each prompt counted once (the
    # least any of its choices was given).
    cached = sum(min(min(c.request.cached_prompt, len(ids[i])) for c in choices if c.prompt_index == i)
                 for i in range(len(ids)))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def _response(state: GatewayState, body: CompletionRequest, choices: list[Choice], echo: list | None,
              ids: list[list[int]], created: int) -> dict:
    out = []
    for c in choices:
        text = c.text if echo is None else echo[c.prompt_index][0] + c.text
        out.append({"index": c.index, "text": text, "token_ids": c.tokens,
                    "logprobs": _choice_logprobs(state, c, echo, ids), "finish_reason": c.finish_reason})
    return {"id": f"cmpl-{choices[0].request.request_id}", "object": "text_completion", "created": created,
            "model": state.model_name, "choices": out, "usage": usage_of(choices, ids)}


def _timeout_message(state: GatewayState, choices: list[Choice]) -> str:
    limit = state.engine_loop.engine.config.scheduler.request_timeout_s
    made = sum(len(c.tokens) for c in choices)
    return (f"request {choices[0].request.request_id}: no result within scheduler.request_timeout_s={limit:g} s "
            f"({made} tokens generated); cancelled")


def _chunk(state: GatewayState, choices: list[Choice], created: int, payload: list[dict]) -> str:
    return "data: " + json.dumps({"id": f"cmpl-{choices[0].request.request_id}", "object": "text_completion",
                                  "created": created, "model": state.model_name, "choices": payload}) + "\n\n"


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
            event = {"error": {"message": _timeout_message(state, choices), "type": "timeout_error"}}
            yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
            return
        failed = next((c.request for c in choices if c.request.error), None)
        if failed is not None:
            yield f"data: {json.dumps({'error': {'message': failed.error, 'type': 'server_error'}})}\n\n"
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


def _stream(state: GatewayState, body: CompletionRequest, choices: list[Choice], echo: list | None,
            ids: list[list[int]], created: int, deadline: float):
    """text_completion chunks: the echoed prompt per choice (with echo), one per token, a closing chunk per choice
    with its finish_reason, a usage chunk (stream_options.include_usage), then [DONE]."""
    logprobs = body.logprobs is not None
    offsets = {c.index: 0 for c in choices}  # text_offset of each choice's next chunk
    opening = []
    for c in choices if echo is not None else []:
        text, scored = echo[c.prompt_index]
        lp = logprobs_block(state.tokenizer, scored, ids[c.prompt_index], 0) if logprobs else None
        offsets[c.index] = len(text)
        opening.append(_chunk(state, choices, created, [{"index": c.index, "text": text, "token_ids": [],
                                                         "logprobs": lp, "finish_reason": None}]))

    def on_token(c: Choice, token: int) -> str:
        piece = c.pending_piece(final=False)
        lp = None
        if logprobs:
            lp = logprobs_block(state.tokenizer, [c.request.token_logprobs[len(c.tokens) - 1]], [token],
                                offsets[c.index])
        offsets[c.index] += len(piece)
        return _chunk(state, choices, created, [{"index": c.index, "text": piece, "token_ids": [token],
                                                 "logprobs": lp, "finish_reason": None}])

    def closing(c: Choice) -> str:
        return _chunk(state, choices, created, [{"index": c.index, "text": c.pending_piece(final=True),
                                                 "token_ids": [], "logprobs": None, "finish_reason": c.finish_reason}])

    def usage() -> str | None:
        if body.stream_options is None or not body.stream_options.include_usage:
            return None
        return "data: " + json.dumps({"id": f"cmpl-{choices[0].request.request_id}", "object": "text_completion",
                                      "created": created, "model": state.model_name, "choices": [],
                                      "usage": usage_of(choices, ids)}) + "\n\n"

    return sse_stream(state, choices, deadline, opening, on_token, closing, usage)
