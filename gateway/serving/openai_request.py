"""The request fields /v1/completions and /v1/chat/completions share, validated as OpenAI defines them."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.model.sampling import MAX_REPETITION, MIN_REPETITION, Penalties
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
                                                  self.repetition_penalty))
