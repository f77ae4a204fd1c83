"""The request fields /v1/completions and /v1/chat/completions share, validated as OpenAI defines them."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.model.sampling import MAX_REPETITION, MIN_REPETITION, Penalties
from gateway.serving.constraints import StructuredOutput
from gateway.serving.sampling_params import SamplingParams

MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
# OpenAI completions parameters expertmesh refuses, and why (each is named in the 400); best_of 1 is the default.


def refuse_unsupported(data: Any, unsupported: dict[str, str]) -> Any:
    """A request body's check (pydantic, before fields): a parameter in `unsupported` set to anything but its
    empty default is refused, naming it and why."""
    if isinstance(data, dict):
        for name, why in unsupported.items():
            value = data.get(name)
            if value not in (None, [], {}, "") and not (name == "best_of" and value == 1):
                raise ValueError(f"{name}: not supported ({why})")
    return data


def refuse_lone_surrogates(data: Any, path: str = "") -> Any:
    """A request body's check (pydantic, before fields): every string in it, keys included, must be valid Unicode.
    JSON's \\ud800 escapes can carry half a UTF-16 pair, which no tokenizer can encode: refused, naming where
    (messages.0.content)."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{path or 'body'}: contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                             "escape): not valid Unicode text") from None
    elif isinstance(data, dict):
        for key, value in data.items():
            refuse_lone_surrogates(key, f"{path}.<key>" if path else "<key>")
            refuse_lone_surrogates(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            refuse_lone_surrogates(value, f"{path}.{i}")
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


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema (OpenAI's): the schema is always enforced, `strict` or not."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """response_format: text (free), json_object (any JSON object) or json_schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: expected exactly when type is 'json_schema'")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: one of json (a schema), regex, choice, grammar (Lark or GBNF), json_object."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


ANY_JSON_OBJECT = {"type": "object"}


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
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION, le=MAX_REPETITION)  # vLLM's extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None  # OpenAI's: a signed 64-bit integer
    user: str | None = None  # accepted and ignored, as OpenAI's end-user id
    return_routed_experts: bool = False  # SGLang's name: each choice carries the experts that served it
    logit_bias: dict[str, float] | None = None  # checked by SamplingParams: ids, [-100, 100]; the vocabulary
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's guided_* fields
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("seed")
    @classmethod
    def _seed_in_64_bits(cls, value: int | None) -> int | None:
        if value is not None and not -(2**63) <= value < 2**63:
            raise ValueError("expected null or an integer in [-2**63, 2**63 - 1] (a 64-bit seed)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        return refuse_unsupported(refuse_lone_surrogates(data), cls.unsupported)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """How each choice is sampled (ValueError naming the field if the engine's limits refuse it)."""
        return SamplingParams(max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, logprobs=logprobs,
                              penalties=Penalties(self.presence_penalty, self.frequency_penalty,
                                                  self.repetition_penalty),
                              logit_bias=self.logit_bias or (), structured=self.structured_output())

    def structured_output(self) -> StructuredOutput | None:
        """The one structured output the body asks for, if any (ValueError naming both fields when it asks for
        two: response_format json_object / json_schema, guided_json / regex / choice / grammar, structured_outputs)."""
        fmt, so = self.response_format, self.structured_outputs
        asked = [
            ("response_format", "json", ANY_JSON_OBJECT if fmt is not None and fmt.type == "json_object" else None),
            ("response_format.json_schema.schema", "json", fmt.json_schema.json_schema if fmt and fmt.json_schema
             else None),
            ("guided_json", "json", self.guided_json), ("guided_regex", "regex", self.guided_regex),
            ("guided_choice", "choice", self.guided_choice), ("guided_grammar", "grammar", self.guided_grammar)]
        if so is not None:
            asked += [(f"structured_outputs.{name}", kind, value) for name, kind, value in (
                ("json", "json", so.json_schema), ("regex", "regex", so.regex), ("choice", "choice", so.choice),
                ("grammar", "grammar", so.grammar),
                ("json_object", "json", ANY_JSON_OBJECT if so.json_object else None))]
        asked = [(field, kind, value) for field, kind, value in asked if value is not None]
        if len(asked) > 1:
            raise ValueError(f"{asked[1][0]}: cannot be combined with {asked[0][0]} (one structured output per "
                             "request)")
        return StructuredOutput.of(asked[0][1], asked[0][2], asked[0][0]) if asked else None
