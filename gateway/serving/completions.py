"""POST /v1/completions with OpenAI's (and vLLM's) semantics: prompt lists, n, stop, logprobs, echo, penalties,
logit_bias, structured outputs, streaming with stream_options.include_usage."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from fastapi.responses import Response, StreamingResponse
from pydantic import Field

from gateway.serving.choices import (
    ApiError,
    Choice,
    check_model,
    deadline_of,
    decode,
    finish_choices,
    routed_experts,
    sse_stream,
    start_choices,
    token_text,
    usage_of,
    wants_routed_experts,
)
from gateway.serving.http_api import TRACE_ID_HEADER, GatewayState
from gateway.serving.openai_request import OpenAIRequest

UNSUPPORTED = {"best_of": "it samples best_of and returns the best by logprob; use n",
               "suffix": "the model has no fill-in-the-middle format"}


class CompletionRequest(OpenAIRequest):
    """The body of POST /v1/completions."""

    unsupported: ClassVar[dict[str, str]] = UNSUPPORTED

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None  # refused unless 1 (UNSUPPORTED), as is suffix
    suffix: str | None = None


def prompts_of(prompt: str | list) -> list[str | list[int]]:
    """The request's prompts: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt or isinstance(prompt[0], int):  # token ids (an empty list: the engine names the problem)
        return [prompt]
    return list(prompt)


def encode_prompts(state: GatewayState, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token ids of each prompt (text through the model's tokenizer); ApiError naming the prompt otherwise."""
    if not prompts:
        raise ApiError(400, "prompt: expected a string, a list of strings, token ids or a list of token-id lists")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if state.tokenizer is None:
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise ApiError(400, f"{where}: this model has no usable tokenizer.json (the server log says why); "
                                    "send token ids")
            p = state.tokenizer.encode(p)
        ids.append(list(p))
    return ids


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


async def _complete(state: GatewayState, body: CompletionRequest, headers: Mapping[str, str] | None) -> tuple:
    trace_id = None
    try:
        check_model(state, body.model)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options: only allowed with stream=true")
        ids = encode_prompts(state, prompts_of(body.prompt))
        choices, trace_id = start_choices(state, ids, body, body.max_tokens, body.logprobs, headers)
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


def _response(state: GatewayState, body: CompletionRequest, choices: list[Choice], echo: list | None,
              ids: list[list[int]], created: int) -> dict:
    out = []
    for c in choices:
        text = c.text if echo is None else echo[c.prompt_index][0] + c.text
        out.append({"index": c.index, "text": text, "token_ids": c.tokens,
                    "logprobs": _choice_logprobs(state, c, echo, ids), "finish_reason": c.finish_reason,
                    **({"routed_experts": routed_experts(state, c)} if wants_routed_experts(state, body) else {})})
    return {"id": f"cmpl-{choices[0].request.request_id}", "object": "text_completion", "created": created,
            "model": state.model_name, "choices": out, "usage": usage_of(choices, ids)}


def _chunk(state: GatewayState, choices: list[Choice], created: int, payload: list[dict]) -> str:
    return "data: " + json.dumps({"id": f"cmpl-{choices[0].request.request_id}", "object": "text_completion",
                                  "created": created, "model": state.model_name, "choices": payload}) + "\n\n"


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

    routed = wants_routed_experts(state, body)

    def closing(c: Choice) -> str:
        return _chunk(state, choices, created, [{"index": c.index, "text": c.pending_piece(final=True),
                                                 "token_ids": [], "logprobs": None, "finish_reason": c.finish_reason,
                                                 **({"routed_experts": routed_experts(state, c)} if routed else {})}])

    def usage() -> str | None:
        if body.stream_options is None or not body.stream_options.include_usage:
            return None
        return "data: " + json.dumps({"id": f"cmpl-{choices[0].request.request_id}", "object": "text_completion",
                                      "created": created, "model": state.model_name, "choices": [],
                                      "usage": usage_of(choices, ids)}) + "\n\n"

    return sse_stream(state, choices, deadline, opening, on_token, closing, usage)
