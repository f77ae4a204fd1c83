"""Tool calls in DeepSeek-V3's text format: the calls a chat completion wrote, parsed from its whole text or from its
streamed pieces (the same calls however the text is cut), and the llguidance grammar that forces valid calls when a
request's `tool_choice` is `required` or names a function.

The format (DeepSeek-V3 / V3-0324; model_core.chat_template holds the markers):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
    \\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Text before the calls (and after them) is the message's content. How a call is accepted depends on whether a grammar
wrote it (`stream_arguments`):

- grammar-forced (`required`, a named function): a call is accepted once its header (`function`, a tool's NAME, the
  opening fence) is complete; its arguments then stream as they come, up to the closing fence;
- `auto` (the model wrote what it liked): a call is accepted only whole, with NAME one of the request's tools and
  ARGS a JSON object; streaming sends it in one piece when its `<｜tool▁call▁end｜>` arrives.

A call that is not accepted (malformed, an unknown name, cut short in `auto`) ends the parsing: it and all the text
after it are content, as written, and the calls accepted before it stay calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from model_core.chat_template import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_MARKERS,
    TOOL_SEP,
)

HEAD = "function" + TOOL_SEP  # a call's type and separator, before its name
ARGS_OPEN = "\n```json\n"
ARGS_CLOSE = "\n```" + TOOL_CALL_END
NAME_CHARS = re.compile(r"[a-zA-Z0-9_-]{0,64}")
SPACE = " \t\r\n"  # allowed between calls (DeepSeek-V3 writes one newline)
# JSON without free whitespace, as structured outputs write it (gateway.serving.constraints.JSON_DEFAULTS).
COMPACT_JSON = {"whitespace_flexible": False}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # a tool without `parameters`


@dataclass(frozen=True)
class ToolCall:
    """One call as OpenAI answers it: `arguments` is the JSON text the model wrote."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedMessage:
    """A completion's text split into its content and its calls."""

    content: str
    calls: list[ToolCall]


@dataclass
class StreamDelta:
    """What one streamed piece adds: content text and OpenAI's `delta.tool_calls` entries (a call's first entry
    carries `id`, `type` and `function.name`; later ones `function.arguments` fragments)."""

    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def add_content(self, text: str) -> None:
        self.content += text

    def open_call(self, index: int, call_id: str, name: str) -> None:
        self.tool_calls.append({"index": index, "id": call_id, "type": "function",
                                "function": {"name": name, "arguments": ""}})

    def add_arguments(self, index: int, text: str) -> None:
        if not text:
            return
        if self.tool_calls and self.tool_calls[-1]["index"] == index:  # one entry per call and piece
            self.tool_calls[-1]["function"]["arguments"] += text
        else:
            self.tool_calls.append({"index": index, "function": {"arguments": text}})


def _is_json_object(text: str) -> bool:
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        return isinstance(json.loads(text, parse_constant=refuse), dict)
    except ValueError:
        return False


def _call_at(text: str, at: int, names: Collection[str], stream_arguments: bool) -> tuple[str, str, int] | None:
    """The call starting with TOOL_CALL_BEGIN at `at`: (name, arguments, where it ends), or None when not accepted."""
    head_start = at + len(TOOL_CALL_BEGIN)
    opened = text.find(ARGS_OPEN, head_start)
    if opened < 0:
        return None
    head = text[head_start:opened]
    name = head[len(HEAD):] if head.startswith(HEAD) else None
    if name not in names:
        return None
    start = opened + len(ARGS_OPEN)
    closed = text.find(ARGS_CLOSE, start)
    if closed < 0:
        return (name, text[start:], len(text)) if stream_arguments else None
    if not stream_arguments and not _is_json_object(text[start:closed]):
        return None
    return name, text[start:closed], closed + len(ARGS_CLOSE)


def parse_tool_calls(text: str, names: Collection[str], stream_arguments: bool,
                     call_id: Callable[[int], str]) -> ParsedMessage:
    """A whole completion's content and calls (see the module's docstring); call_id(i) names the i-th call."""
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(TOOL_CALLS_BEGIN, pos)) >= 0:
        content.append(text[pos:start])
        pos, unaccepted = start + len(TOOL_CALLS_BEGIN), start
        while True:
            at = len(text) - len(text[pos:].lstrip(SPACE))
            if text.startswith(TOOL_CALLS_END, at):
                pos = at + len(TOOL_CALLS_END)
                break
            call = _call_at(text, at, names, stream_arguments) if text.startswith(TOOL_CALL_BEGIN, at) else None
            if call is None:
                content.append(text[unaccepted:])
                return ParsedMessage("".join(content), calls)
            name, arguments, pos = call
            calls.append(ToolCall(call_id(len(calls)), name, arguments))
            unaccepted = pos
    content.append(text[pos:])
    return ParsedMessage("".join(content), calls)


def _held(text: str, marker: str) -> int:
    """Characters at the end of `text` that could be the start of `marker` (held back while streaming)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _viable_head(text: str) -> bool:
    """Whether `text` can still grow into a call's header `function<｜tool▁sep｜>NAME\\n```json\\n`."""
    if HEAD.startswith(text):
        return True
    if not text.startswith(HEAD):
        return False
    name = NAME_CHARS.match(text, len(HEAD))
    return name is not None and ARGS_OPEN.startswith(text[name.end():])


class ToolCallStream:
    """The incremental parser: feed() the pieces of a completion's text as they are streamed, finish() at its end;
    the deltas, joined, are what parse_tool_calls finds in the whole text, however it was cut. Text that may be the
    start of a marker is held back until the next piece tells."""

    def __init__(self, names: Collection[str], stream_arguments: bool, call_id: Callable[[int], str]) -> None:
        self.names, self.stream_arguments, self.call_id = names, stream_arguments, call_id
        self.state = "content"  # content | section (between calls) | head | arguments | rest (all content)
        self.pending = ""  # received, not yet decided
        self.unaccepted = ""  # decided to belong to calls not yet accepted: content if they never are
        self.calls = 0  # calls accepted so far
        self.name = ""  # the current call's

    def feed(self, piece: str) -> StreamDelta:
        delta = StreamDelta()
        self.pending += piece
        while self._advance(delta, final=False):
            pass
        return delta

    def finish(self) -> StreamDelta:
        """Everything still held back, decided as the text's end decides it."""
        delta = StreamDelta()
        while self._advance(delta, final=True):
            pass
        return delta

    def _advance(self, delta: StreamDelta, final: bool) -> bool:
        """Decide what the pending text allows; True when the state changed (call again)."""
        text = self.pending
        if self.state == "content":
            start = text.find(TOOL_CALLS_BEGIN)
            if start >= 0:
                delta.add_content(text[:start])
                return self._move("section", text[start + len(TOOL_CALLS_BEGIN):], TOOL_CALLS_BEGIN)
            cut = len(text) - (0 if final else _held(text, TOOL_CALLS_BEGIN))
            delta.add_content(text[:cut])
            self.pending = text[cut:]
            return False
        if self.state == "section":
            rest = text.lstrip(SPACE)
            if rest.startswith(TOOL_CALLS_END):
                self.unaccepted = ""
                return self._move("content", rest[len(TOOL_CALLS_END):])
            if rest.startswith(TOOL_CALL_BEGIN):
                skipped = text[: len(text) - len(rest)]
                return self._move("head", rest[len(TOOL_CALL_BEGIN):], self.unaccepted + skipped + TOOL_CALL_BEGIN)
            if not final and (TOOL_CALLS_END.startswith(rest) or TOOL_CALL_BEGIN.startswith(rest)):
                return False
            return self._malformed(delta)
        if self.state == "head":
            opened = text.find(ARGS_OPEN)
            if opened < 0:
                return False if not final and _viable_head(text) else self._malformed(delta)
            head = text[:opened]
            name = head[len(HEAD):] if head.startswith(HEAD) else None
            if name not in self.names:
                return self._malformed(delta)
            self.name = name
            self._move("arguments", text[opened + len(ARGS_OPEN):], self.unaccepted + text[:opened + len(ARGS_OPEN)])
            if self.stream_arguments:  # the grammar wrote it: the call is certain from here
                self._accept(delta, "")
            return True
        if self.state == "arguments":
            closed = text.find(ARGS_CLOSE)
            if closed >= 0:
                if self.stream_arguments:
                    delta.add_arguments(self.calls - 1, text[:closed])
                elif _is_json_object(text[:closed]):
                    self._accept(delta, text[:closed])
                else:
                    return self._malformed(delta)
                self.unaccepted = ""
                return self._move("section", text[closed + len(ARGS_CLOSE):])
            if not self.stream_arguments:
                return self._malformed(delta) if final else False
            cut = len(text) - (0 if final else _held(text, ARGS_CLOSE))
            delta.add_arguments(self.calls - 1, text[:cut])
            self.pending = text[cut:]
            return False
        delta.add_content(text)  # rest
        self.pending = ""
        return False

    def _move(self, state: str, pending: str, unaccepted: str | None = None) -> bool:
        self.state, self.pending = state, pending
        if unaccepted is not None:
            self.unaccepted = unaccepted
        return True

    def _accept(self, delta: StreamDelta, arguments: str) -> None:
        delta.open_call(self.calls, self.call_id(self.calls), self.name)
        delta.add_arguments(self.calls, arguments)
        self.calls += 1
        self.unaccepted = ""

    def _malformed(self, delta: StreamDelta) -> bool:
        delta.add_content(self.unaccepted + self.pending)
        self.unaccepted, self.pending, self.state = "", "", "rest"
        return False


def hidden_marker_ids(tokenizer: Any) -> dict[str, int]:
    """The tool-call markers that are one token each which `tokenizer.decode` drops (a DeepSeek checkpoint's special
    tokens), by text; none for the generated byte tokenizer, which writes them as plain text."""
    found = {}
    for marker in TOOL_MARKERS:
        ids = tokenizer.encode(marker, add_bos=False)
        if len(ids) == 1 and tokenizer.decode(ids) == "":
            found[marker] = ids[0]
    return found


class MarkerDecoder:
    """A tokenizer whose decode keeps the hidden markers' text (so the parser sees the calls); otherwise `inner`."""

    def __init__(self, inner: Any, marker_ids: Mapping[str, int]) -> None:
        self.inner = inner
        self.texts = {i: text for text, i in marker_ids.items()}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.inner.encode(text, add_bos=add_bos)

    def decode(self, ids: list[int]) -> str:
        parts, run = [], []
        for token in ids:
            if token in self.texts:
                parts += [self.inner.decode(run), self.texts[token]]
                run = []
            else:
                run.append(token)
        return "".join(parts) + self.inner.decode(run)


def tool_call_grammar(tools: Mapping[str, dict | None], parallel: bool, marker_ids: Mapping[str, int]) -> str:
    """llguidance's Lark grammar of a tool-call section calling `tools` (name -> its `parameters` JSON schema, None:
    no parameters): one call, or (parallel) one or more joined by a newline, each call's arguments compact JSON valid
    against its schema. A marker in `marker_ids` is that special token (`<[id]>`), the others plain text."""
    def marker(text: str) -> str:
        return f"<[{marker_ids[text]}]>" if text in marker_ids else json.dumps(text, ensure_ascii=False)

    more = ' ("\\n" call)*' if parallel else ""
    lines = ["%llguidance {}", f"start: {marker(TOOL_CALLS_BEGIN)} call{more} {marker(TOOL_CALLS_END)}",
             "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, (name, schema) in enumerate(tools.items()):
        schema = dict(schema if schema is not None else NO_PARAMETERS)
        schema["x-guidance"] = {**COMPACT_JSON, **(schema.get("x-guidance") or {})}
        lines += [f'call_{i}: {marker(TOOL_CALL_BEGIN)} "function" {marker(TOOL_SEP)} '
                  f'{json.dumps(name + ARGS_OPEN)} args_{i} "\\n```" {marker(TOOL_CALL_END)}',
                  f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}"]
    return "\n".join(lines) + "\n"
