"""SamplingParams: how one request's tokens are generated, validated once, shared by submit, generate and HTTP."""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gateway.model.sampling import MAX_LOGIT_BIAS, Penalties, is_number
from gateway.serving.constraints import GrammarCompiler, StructuredOutput
from gateway.serving.scheduler import Request

MAX_LOGPROBS = 20  # top tokens a request may ask logprobs for (vLLM's default limit; OpenAI's completions allow 5)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes (a negative seed wraps around)


@dataclass(frozen=True)
class SamplingParams:
    """max_new_tokens: tokens to generate at most; temperature 0 (or below 1e-5, as in vLLM) is greedy, else top_p
    nucleus sampling; seed: a per-request generator (None: the global one), an integer in SEED_RANGE; stop_at_eos:
    end after the model's eos token (kept in the output); penalties: presence / frequency / repetition
    (gateway.model.sampling); logprobs: book the model's logprob of each sampled token and of the `logprobs` most
    likely ones (0 to MAX_LOGPROBS) in `request.token_logprobs`; logit_bias: OpenAI's {token id: bias in [-100, 100]}
    added to the logits (ids as integers or as the digit strings JSON keys are; kept as sorted (id, bias) pairs);
    structured: the grammar the text must match (gateway.serving.constraints), compiled when a request is built.

    Errors name the field and its value (`logit_bias.12345: ...`).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    penalties: Penalties = Penalties()
    logprobs: int | None = None
    logit_bias: Mapping[int | str, float] | tuple[tuple[int, float], ...] = ()
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: expected a positive integer")
        if not is_number(self.temperature) or not 0 <= self.temperature <= sys.float_info.max:
            raise ValueError(f"temperature={self.temperature!r}: expected a finite number >= 0")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: expected 0 < top_p <= 1")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed={self.seed!r}: expected null or an integer in [-2**63, 2**64 - 1]")
        if not isinstance(self.stop_at_eos, bool):
            raise ValueError(f"stop_at_eos={self.stop_at_eos!r}: expected true or false")
        if not isinstance(self.penalties, Penalties):
            raise ValueError(f"penalties={self.penalties!r}: expected a Penalties")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs={self.logprobs!r}: expected null or an integer in [0, {MAX_LOGPROBS}]")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured={self.structured!r}: expected a StructuredOutput")

    @classmethod
    def of(cls, params: SamplingParams | None = None, **fields: Any) -> SamplingParams:
        """`params` (default: SamplingParams()) with the given fields replaced; a None field keeps its value (so
        `penalties=None` or `seed=None` mean the defaults). An unknown field is a TypeError naming it."""
        if params is not None and not isinstance(params, cls):
            raise TypeError(f"params={params!r}: expected a SamplingParams (sampling settings go by keyword)")
        base = params if params is not None else cls()
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"{unknown[0]}: not a sampling setting (expected one of "
                            f"{[f.name for f in dataclasses.fields(cls)]})")
        given = {name: value for name, value in fields.items() if value is not None}
        return dataclasses.replace(base, **given) if given else base

    def request(self, request_id: str, prompt: list[int], eos_token_id: int | None, device: torch.device,
                on_token: Callable | None = None, on_finish: Callable | None = None, *, vocab_size: int | None = None,
                grammars: GrammarCompiler | None = None) -> Request:
        """A Request generating by these params; its generator and logit_bias live on the gateway's `device`, where
        sampling runs (see gateway.model.sampling on seeds across devices). vocab_size: the model's, which
        logit_bias ids must be below; grammars: compiles `structured` (ValueError naming the field when it cannot)."""
        stop_eos = self.stop_at_eos and eos_token_id is not None
        bias = None
        if self.logit_bias:
            outside = [t for t, _ in self.logit_bias if vocab_size is not None and t >= vocab_size]
            if outside:
                raise ValueError(f"logit_bias.{outside[0]}: token id outside [0, vocab_size={vocab_size})")
            ids, values = zip(*self.logit_bias, strict=True)
            bias = (torch.tensor(ids, dtype=torch.long, device=device),
                    torch.tensor(values, dtype=torch.float32, device=device))
        constraint = None
        if self.structured is not None:
            if grammars is None:
                raise ValueError(f"{self.structured.field}: structured outputs need the engine's GrammarCompiler")
            constraint = grammars.constraint(self.structured)
        return Request(
            request_id=request_id, prompt=list(prompt), max_new_tokens=self.max_new_tokens,
            temperature=float(self.temperature), top_p=float(self.top_p),
            stop_ids=frozenset([eos_token_id]) if stop_eos else frozenset(),
            generator=None if self.seed is None else torch.Generator(device).manual_seed(self.seed),
            on_token=on_token, on_finish=on_finish, penalties=self.penalties, logprobs=self.logprobs,
            logit_bias=bias, constraint=constraint)

    def for_choice(self, index: int) -> SamplingParams:
        """The params of the index-th request of a batch: seeded ones sample with seed + index (a ValueError naming
        seed when that leaves SEED_RANGE)."""
        if self.seed is None or index == 0:
            return self
        if self.seed + index > SEED_RANGE[1]:
            raise ValueError(f"seed={self.seed}: choice {index} samples with seed + {index}, past the largest seed "
                             "2**64 - 1")
        return dataclasses.replace(self, seed=self.seed + index)


def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs: ids non-negative integers (or their digit strings), biases
    numbers in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]; ValueError naming the entry (`logit_bias.12345: ...`)."""
    if isinstance(bias, tuple):
        bias = dict(bias)
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias={bias!r}: expected a map of token id to bias")
    pairs = {}
    for key, value in bias.items():
        token = key if _is_int(key) else int(key) if isinstance(key, str) and re.fullmatch("[0-9]{1,18}", key) else None
        if token is None or token < 0:
            raise ValueError(f"logit_bias.{str(key)[:40]}: expected a token id (a non-negative integer)")
        if not is_number(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias.{key}: {value!r}, expected a number in [{-MAX_LOGIT_BIAS:g}, "
                             f"{MAX_LOGIT_BIAS:g}]")
        if token in pairs:
            raise ValueError(f"logit_bias.{key}: token {token} given twice")
        pairs[token] = float(value)
    return tuple(sorted(pairs.items()))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
