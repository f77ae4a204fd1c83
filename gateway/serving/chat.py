"""POST /v1/chat/completions: messages rendered with the checkpoint's chat template (tools too), then generated as
completions are (n, stop, logprobs, penalties, logit_bias, structured outputs, streaming with
stream_options.include_usage); with tools, each answer's tool calls parsed from its text (gateway.serving.tool_calls),
streamed as OpenAI's tool-call deltas."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastapi.responses import Response, StreamingResponse

from gateway.serving.chat_request import ChatRequest
from gateway.serving.choices import (
    ApiError,
    Choice,
    check_model,
    deadline_of,
    finish_choices,
    routed_experts,
    sse_stream,
    start_choices,
    token_text,
    usage_of,
    wants_routed_experts,
)
from gateway.serving.http_api import TRACE_ID_HEADER, GatewayState
from gateway.serving.tool_calls import (
    MarkerDecoder,
    ParsedMessage,
    StreamDelta,
    ToolCallStream,
    hidden_marker_ids,
    parse_tool_calls,
)
from model_core.chat_template import ChatTemplateError


def render(state: GatewayState, body: ChatRequest) -> list[int]:
    """The conversation's prompt ids through the checkpoint's chat template (ApiError 400 naming what is missing
    or what the template refused)."""
    if state.chat_template is None:
        raise ApiError(400, f"messages: model {state.model_name!r} has no chat template (tokenizer_config.json "
                            "chat_template or chat_template.jinja); use /v1/completions")
    if state.tokenizer is None:
        raise ApiError(400, f"messages: model {state.model_name!r} has no usable tokenizer.json (the server log "
                            "says why)")
    messages = [m.for_template() for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    try:
        text = state.chat_template.render(messages, add_generation_prompt=True, tools=tools)
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
        markers = hidden_marker_ids(state.tokenizer) if body.tool_mode != "none" else {}
        body.use_marker_tokens(markers)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        choices, trace_id = start_choices(state, [prompt], body, max_tokens_of(state, body, prompt), logprobs, headers)
        if markers:  # the tokenizer's decode drops them: the parser must see them
            for c in choices:
                c.tokenizer = MarkerDecoder(state.tokenizer, markers)
        created, deadline = int(time.time()), deadline_of(state)
        if body.stream:
            answer: Any = StreamingResponse(_stream(state, body, choices, [prompt], created, deadline),
                                            media_type="text/event-stream")
        else:
            await finish_choices(state, choices, deadline)
            answer = _response(state, body, choices, [prompt], created)
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


def _call_ids(choice: Choice) -> Callable[[int], str]:
    """A choice's call ids: call_<its request id>_<i>."""
    return lambda i: f"call_{choice.request.request_id}_{i}"


def _finish_reason(choice: Choice, calls: int) -> str | None:
    """OpenAI's `tool_calls` when the choice ended on its own (not cut by max_tokens) with calls, else its own."""
    return "tool_calls" if calls and choice.finish_reason == "stop" else choice.finish_reason


def _parsed(body: ChatRequest, choice: Choice) -> ParsedMessage:
    """The choice's content and calls; with tool_choice none (or no tools) all of its text is content."""
    if body.tool_mode == "none":
        return ParsedMessage(choice.text, [])
    return parse_tool_calls(choice.text, body.tool_names, body.tool_mode != "auto", _call_ids(choice))


def _message(parsed: ParsedMessage) -> dict:
    """OpenAI's assistant message: content null when there are calls and no text; tool_calls only when there are."""
    message: dict[str, Any] = {"role": "assistant",
                               "content": parsed.content if parsed.content or not parsed.calls else None}
    if parsed.calls:
        message["tool_calls"] = [call.to_openai() for call in parsed.calls]
    return message


def _response(state: GatewayState, body: ChatRequest, choices: list[Choice], ids: list[list[int]],
              created: int) -> dict:
    parsed = [_parsed(body, c) for c in choices]
    routed = wants_routed_experts(state, body)
    return {
        "id": f"chatcmpl-{choices[0].request.request_id}", "object": "chat.completion", "created": created,
        "model": state.model_name,
        "choices": [{"index": c.index, "message": _message(p), "logprobs": _logprobs(state, c, c.tokens, 0),
                     "finish_reason": _finish_reason(c, len(p.calls)), "token_ids": c.tokens,
                     **({"routed_experts": routed_experts(state, c)} if routed else {})}
                    for c, p in zip(choices, parsed, strict=True)],
        "usage": usage_of(choices, ids),
    }


def _delta(delta: StreamDelta, always_content: bool) -> dict:
    """A chunk's delta: its content (always_content: even empty, when it has no calls) and tool_calls entries."""
    out: dict[str, Any] = {}
    if delta.content or (always_content and not delta.tool_calls):
        out["content"] = delta.content
    if delta.tool_calls:
        out["tool_calls"] = delta.tool_calls
    return out


def _stream(state: GatewayState, body: ChatRequest, choices: list[Choice], ids: list[list[int]], created: int,
            deadline: float):
    """chat.completion.chunk events: the assistant role per choice, one delta per token (content, or with tools
    the content and tool-call deltas its text completes), a closing chunk per choice with its finish_reason, a usage
    chunk (stream_options.include_usage), then [DONE]."""
    head = {"id": f"chatcmpl-{choices[0].request.request_id}", "object": "chat.completion.chunk",
            "created": created, "model": state.model_name}
    parsers = {c.index: ToolCallStream(body.tool_names, body.tool_mode != "auto", _call_ids(c))
               for c in choices if body.tool_mode != "none"}

    def event(payload: list[dict], **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': payload, **extra})}\n\n"

    def parse(c: Choice, final: bool) -> StreamDelta:
        piece = c.pending_piece(final=final)
        parser = parsers.get(c.index)
        if parser is None:
            return StreamDelta(piece)
        delta = parser.feed(piece)
        if final:
            rest = parser.finish()
            delta.content += rest.content
            delta.tool_calls += rest.tool_calls
        return delta

    def on_token(c: Choice, token: int) -> str:
        return event([{"index": c.index, "delta": _delta(parse(c, final=False), always_content=True),
                       "token_ids": [token], "logprobs": _logprobs(state, c, [token], len(c.tokens) - 1),
                       "finish_reason": None}])

    routed = wants_routed_experts(state, body)

    def closing(c: Choice) -> str:
        delta = parse(c, final=True)
        calls = parsers[c.index].calls if c.index in parsers else 0
        return event([{"index": c.index, "delta": _delta(delta, always_content=False), "logprobs": None,
                       "finish_reason": _finish_reason(c, calls),
                       **({"routed_experts": routed_experts(state, c)} if routed else {})}])

    def usage() -> str | None:
        include = body.stream_options is not None and body.stream_options.include_usage
        return event([], usage=usage_of(choices, ids)) if include else None

    opening = [event([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}]) for c in choices]
    return sse_stream(state, choices, deadline, opening, on_token, closing, usage)
