"""POST /v1/chat/completions: messages rendered with the checkpoint's chat template, then generated as completions
are (n, stop, logprobs, penalties, logit_bias, structured outputs, streaming with stream_options.include_usage)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.serving.choices import (
    ApiError,
    Choice,
    check_model,
    deadline_of,
    finish_choices,
    sse_stream,
    start_choices,
    token_text,
    usage_of,
)
from gateway.serving.http_api import TRACE_ID_HEADER, GatewayState
from gateway.serving.openai_request import OpenAIRequest
from model_core.chat_template import ChatTemplateError

# OpenAI chat parameters expertmesh refuses, and why (each is named in the 400).
UNSUPPORTED = {
    "tools": "no tool calling", "tool_choice": "no tool calling", "functions": "no function calling",
    "function_call": "no function calling", "parallel_tool_calls": "no tool calling",
    "audio": "text only", "modalities": "text only",
    "prediction": "no predicted outputs", "web_search_options": "no web search",
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(OpenAIRequest):
    """The body of POST /v1/chat/completions."""

    unsupported: ClassVar[dict[str, str]] = UNSUPPORTED

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def render(state: GatewayState, body: ChatRequest) -> list[int]:
    """The conversation's prompt ids through the checkpoint's chat template (ApiError 400 naming what is missing
    or what the template refused)."""
    if state.chat_template is None:
        raise ApiError(400, f"messages: model {state.model_name!r} has no chat template (tokenizer_config.json "
                            "chat_template or chat_template.jinja); use /v1/completions")
    if state.tokenizer is None:
        raise ApiError(400, f"messages: model {state.model_name!r} has no usable tokenizer.json (the server log "
                            "says why)")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    try:
        text = state.chat_template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise ApiError(400, str(exc)) from None
    return state.tokenizer.encode(text, add_bos=False)  # the template writes the special tokens it wants


def max_tokens_of(state: GatewayState, body: ChatRequest, prompt: list[int]) -> int:
    """max_completion_tokens (OpenAI's current name), else max_tokens, else what the context and cache leave."""
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None:
        return asked
    engine = state.engine_loop.engine
    room = min(engine.spec.max_position_embeddings, engine.cache.capacity_tokens) - len(prompt)
    return max(room, 1)


async def chat_completions(state: GatewayState, body: ChatRequest, headers: Mapping[str, str] | None = None,
                           response: Response | None = None) -> Any:
    """POST /v1/chat/completions: JSON, or server-sent chat.completion.chunk events when body.stream."""
    trace_id = None
    try:
        check_model(state, body.model)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options: only allowed with stream=true")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs: only allowed with logprobs=true")
        prompt = render(state, body)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        choices, trace_id = start_choices(state, [prompt], body, max_tokens_of(state, body, prompt), logprobs, headers)
        created, deadline = int(time.time()), deadline_of(state)
        if body.stream:
            answer: Any = StreamingResponse(_stream(state, body, choices, [prompt], created, deadline),
                                            media_type="text/event-stream")
        else:
            await finish_choices(state, choices, deadline)
            answer = _response(state, choices, [prompt], created)
    except ApiError as exc:
        answer = exc.response()
    target = answer if isinstance(answer, Response) else response
    if trace_id is not None and target is not None:
        target.headers[TRACE_ID_HEADER] = trace_id
    return answer


def _logprob_entry(tokenizer: Any, token: int, logprob: float) -> dict:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _logprobs(state: GatewayState, choice: Choice, tokens: list[int], start: int) -> dict | None:
    """OpenAI's chat logprobs ({content: [{token, logprob, bytes, top_logprobs}]}) of `tokens`, the choice's
    generated tokens from position `start`."""
    if choice.request.logprobs is None:
        return None
    entries = choice.request.token_logprobs[start : start + len(tokens)]
    return {"content": [{**_logprob_entry(state.tokenizer, t, lp),
                         "top_logprobs": [_logprob_entry(state.tokenizer, i, v) for i, v in top]}
                        for t, (lp, top) in zip(tokens, entries, strict=True)]}


def _response(state: GatewayState, choices: list[Choice], ids: list[list[int]], created: int) -> dict:
    return {
        "id": f"chatcmpl-{choices[0].request.request_id}", "object": "chat.completion", "created": created,
        "model": state.model_name,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": _logprobs(state, c, c.tokens, 0), "finish_reason": c.finish_reason,
                     "token_ids": c.tokens} for c in choices],
        "usage": usage_of(choices, ids),
    }


def _stream(state: GatewayState, body: ChatRequest, choices: list[Choice], ids: list[list[int]], created: int,
            deadline: float):
    """chat.completion.chunk events: the assistant role per choice, one content delta per token, a closing chunk
    per choice with its finish_reason, a usage chunk (stream_options.include_usage), then [DONE]."""
    head = {"id": f"chatcmpl-{choices[0].request.request_id}", "object": "chat.completion.chunk",
            "created": created, "model": state.model_name}

    def event(payload: list[dict], **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': payload, **extra})}\n\n"

    def on_token(c: Choice, token: int) -> str:
        return event([{"index": c.index, "delta": {"content": c.pending_piece(final=False)}, "token_ids": [token],
                       "logprobs": _logprobs(state, c, [token], len(c.tokens) - 1), "finish_reason": None}])

    def closing(c: Choice) -> str:
        rest = c.pending_piece(final=True)
        return event([{"index": c.index, "delta": {"content": rest} if rest else {}, "logprobs": None,
                       "finish_reason": c.finish_reason}])

    def usage() -> str | None:
        include = body.stream_options is not None and body.stream_options.include_usage
        return event([], usage=usage_of(choices, ids)) if include else None

    opening = [event([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}]) for c in choices]
    return sse_stream(state, choices, deadline, opening, on_token, closing, usage)
