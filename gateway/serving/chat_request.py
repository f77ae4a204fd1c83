"""The body of POST /v1/chat/completions: messages (tool calls and tool results included), tools and tool_choice,
validated as OpenAI defines them, each refusal naming its field."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

import llguidance
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from gateway.serving.constraints import JSON_DEFAULTS, StructuredOutput
from gateway.serving.openai_request import OpenAIRequest
from gateway.serving.tool_calls import tool_call_grammar

# OpenAI chat parameters expertmesh refuses, and why (each is named in the 400).
UNSUPPORTED = {
    "functions": "deprecated by OpenAI: use tools", "function_call": "deprecated by OpenAI: use tool_choice",
    "audio": "text only", "modalities": "text only",
    "prediction": "no predicted outputs", "web_search_options": "no web search",
}
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str  # JSON text, as the model wrote it


class AssistantToolCall(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"]
    function: CalledFunction


class Message(BaseModel):
    """One message of the conversation; `content` may be null only on an assistant message with tool_calls."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (null only on an assistant message with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls: only on assistant messages, not role {self.role!r}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: required on a tool message (the id of the call it answers)")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError(f"tool_call_id: only on tool messages, not role {self.role!r}")
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template reads it (the keys transformers' apply_chat_template is given)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted; a forced call's arguments follow the schema either way

    @field_validator("name")
    @classmethod
    def _name_is_an_identifier(cls, value: str) -> str:
        if not TOOL_NAME.fullmatch(value):
            raise ValueError(f"{value[:80]!r}: expected 1-64 characters of a-z, A-Z, 0-9, _ and -")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters_compile(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """A JSON schema of an object that llguidance compiles (a forced call's arguments follow it)."""
        if value is None:
            return None
        if value.get("type", "object") != "object":
            raise ValueError(f"expected a JSON schema of an object (type 'object'), got type {value['type']!r}")
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(value), defaults=JSON_DEFAULTS)
        problem = llguidance.LLMatcher.validate_grammar(grammar)
        if problem:
            raise ValueError(f"not a JSON schema the grammar engine can enforce ({problem.splitlines()[0]})")
        return value


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    """tool_choice naming one function: the answer is exactly one call of it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: ChosenFunction


class ChatRequest(OpenAIRequest):
    """The body of POST /v1/chat/completions."""

    unsupported: ClassVar[dict[str, str]] = UNSUPPORTED

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # null or absent: true, as OpenAI's default
    _marker_ids: dict[str, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _tool_choice_fits_the_tools(self) -> ChatRequest:
        names = [t.function.name for t in self.tools or []]
        if self.tool_choice is not None and not names:
            raise ValueError("tool_choice: only allowed with tools (none given)")
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"tools.{i}.function.name: {name!r} is given twice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice.function.name: {self.tool_choice.function.name!r} is not one of the "
                             f"tools ({', '.join(names)})")
        return self

    @property
    def tool_mode(self) -> str:
        """'none' (no tools, or tool_choice none: nothing parsed), 'auto' (the model chooses, its calls parsed),
        'required' or 'named' (a grammar forces calls)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice in (None, "auto"):
            return "auto"
        return "required" if self.tool_choice == "required" else "named"

    @property
    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or []]

    def use_marker_tokens(self, marker_ids: dict[str, int]) -> None:
        """The tool-call markers that are single special tokens of the model (tool_calls.hidden_marker_ids): a
        forcing grammar names those tokens by id."""
        self._marker_ids = dict(marker_ids)

    def structured_output(self) -> StructuredOutput | None:
        """The tool-call grammar when tool_choice is required or names a function (ValueError naming both fields
        when another structured output is asked too), else what OpenAIRequest finds."""
        asked = super().structured_output()
        if self.tool_mode not in ("required", "named"):
            return asked
        if asked is not None:
            raise ValueError(f"tool_choice: a {self.tool_mode} tool call cannot be combined with {asked.field} "
                             "(both constrain the text)")
        chosen = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        tools = {t.function.name: t.function.parameters for t in self.tools or []
                 if chosen is None or t.function.name == chosen}
        parallel = self.parallel_tool_calls is not False and chosen is None
        return StructuredOutput("grammar", tool_call_grammar(tools, parallel, self._marker_ids), "tool_choice")
