"""Structured outputs: a request's JSON schema, regex, choice or grammar compiled by llguidance, and the token masks
that keep each constrained sequence inside its grammar while it shares a batched step with free ones.

Why llguidance (1.9.1): it computes a token bitmask per step from a lazy lexer and an Earley parser over the
tokenizer's token trie, so compiling a schema takes milliseconds and nothing is precompiled per vocabulary;
outlines-core builds a full token index per regex / schema first, and xgrammar needs torch, transformers and triton
from PyPI. It reads the model's tokenizer.json itself and has no dependencies.

Flow: `StructuredOutput` (what the request asked for, naming the field it came from) -> `GrammarCompiler.constraint`
compiles its grammar once (cached by text, so each choice of a request copies the same compiled matcher) -> each
sequence's `Constraint` fills its row of the step's bitmask (`fill_bitmask`, on the host), the runner masks the
logits on the device (`unpack_bitmask`) and samples, then `Constraint.advance` feeds the sampled token to the
matcher. A grammar that can take no more tokens ends its sequence (finish_reason "stop").
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llguidance
import torch

logger = logging.getLogger(__name__)

KINDS = ("json", "regex", "choice", "grammar")  # what a StructuredOutput's value is
# JSON without free whitespace between tokens ({"a":1,"b":"x"}): a sampled run of spaces or newlines can otherwise
# go on until max_tokens. A schema's own "x-guidance": {"whitespace_flexible": true} turns it back on.
JSON_DEFAULTS = {"whitespace_flexible": False}
MAX_CACHED = 64  # compiled grammars kept per model (the most recently used)


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's text must match. kind 'json': `value` is a JSON schema as JSON text; 'regex': a regular
    expression (Rust regex syntax, matching the whole text); 'choice': a JSON list of the allowed texts; 'grammar':
    a Lark grammar (llguidance's dialect) or a GBNF one. `field` is the request field it came from (named in
    errors: `response_format.json_schema.schema`, `guided_regex`, ...)."""

    kind: str
    value: str
    field: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.field}: kind={self.kind!r}, expected one of {KINDS}")
        if not isinstance(self.value, str) or not self.value:
            raise ValueError(f"{self.field}: expected a non-empty {self.kind}")

    @classmethod
    def of(cls, kind: str, value: Any, field: str) -> StructuredOutput:
        """From a request's value: a schema (object or JSON text) for 'json', a list of strings for 'choice', text
        for 'regex' and 'grammar'."""
        if kind == "json":
            return cls.json_schema(value, field)
        if kind == "choice":
            return cls.choice(value, field)
        return cls(kind, value, field)

    @classmethod
    def json_schema(cls, schema: dict | str, field: str) -> StructuredOutput:
        """A JSON schema given as an object or as JSON text (ValueError naming `field` otherwise)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ValueError(f"{field}: not valid JSON text ({exc})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"{field}: expected a JSON schema object, got {type(schema).__name__}")
        return cls("json", json.dumps(schema), field)  # property order kept: it is the output's

    @classmethod
    def choice(cls, options: list[str], field: str) -> StructuredOutput:
        """One of `options` exactly (each a non-empty string)."""
        if not isinstance(options, list) or not options:
            raise ValueError(f"{field}: expected a non-empty list of strings")
        for i, option in enumerate(options):
            if not isinstance(option, str) or not option:
                raise ValueError(f"{field}.{i}: expected a non-empty string")
        return cls("choice", json.dumps(options), field)

    def grammar(self) -> str:
        """llguidance's grammar text for it (ValueError naming the field when it is not even well-formed)."""
        try:
            if self.kind == "json":
                return llguidance.LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_DEFAULTS)
            return llguidance.grammar_from(self.kind, self.value)  # "grammar": Lark, or GBNF converted to Lark
        except ValueError as exc:
            raise ValueError(f"{self.field}: {exc}") from None


class Constraint:
    """One sequence's grammar state: an llguidance matcher advanced by every token the sequence samples."""

    def __init__(self, matcher: llguidance.LLMatcher, field: str) -> None:
        self.matcher, self.field = matcher, field

    def advance(self, token: int) -> str | None:
        """Feed a sampled token; returns why it failed (the mask should have made that impossible), else None."""
        if self.matcher.consume_token(token):
            return None
        return f"{self.field}: sampled token {token} was rejected by the grammar ({self.error()})"

    @property
    def complete(self) -> bool:
        """The text matches the grammar and no token can extend it: the sequence ends here."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    def error(self) -> str:
        return self.matcher.get_error().split("\n<state>")[0] or "no error"


class GrammarCompiler:
    """Compiles StructuredOutputs for one model: its tokenizer.json is read once into an llguidance tokenizer (on
    first use, so a server that never sees a constrained request pays nothing), and each distinct grammar is
    compiled once into a matcher that every sequence using it copies (MAX_CACHED kept, most recent first).
    Thread-safe: requests are compiled on the HTTP thread while the engine steps on its own."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_id: int | None) -> None:
        self.tokenizer_file = Path(model_dir, "tokenizer.json")
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self, field: str) -> llguidance.LLTokenizer:
        """The model's vocabulary as llguidance sees it (ValueError naming `field` when there is no usable
        tokenizer.json: structured outputs need one)."""
        with self._lock:
            if self._tokenizer is None:
                try:
                    text = self.tokenizer_file.read_text()
                    self._tokenizer = llguidance.LLTokenizer(text, n_vocab=self.vocab_size,
                                                             eos_token=self.eos_token_id)
                except Exception as exc:  # OSError, or llguidance's error for a tokenizer it cannot read
                    raise ValueError(f"{field}: structured outputs need the model's tokenizer.json, and "
                                     f"{self.tokenizer_file} is not usable ({exc})") from None
            return self._tokenizer

    def constraint(self, option: StructuredOutput) -> Constraint:
        """A fresh Constraint for one sequence; ValueError naming option.field with llguidance's reason when the
        grammar cannot be compiled (a bad schema, regex or grammar)."""
        key = (option.kind, option.value)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
        if compiled is None:
            compiled = self._compile(option)
            with self._lock:
                self._compiled[key] = compiled
                while len(self._compiled) > MAX_CACHED:
                    self._compiled.popitem(last=False)
        return Constraint(compiled.deep_copy(), option.field)

    def _compile(self, option: StructuredOutput) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer(option.field), option.grammar(), log_level=0)
        if matcher.is_error():
            raise ValueError(f"{option.field}: {matcher.get_error()}")
        for warning in matcher.get_grammar_warnings():
            logger.warning("%s: %s", option.field, warning)
        return matcher


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row of a token bitmask (one bit per token)."""
    return (vocab_size + 31) // 32


def fill_bitmask(constraints: list[Constraint], vocab_size: int, pin: bool = False) -> torch.Tensor:
    """The allowed next tokens of each constrained sequence, on the host: int32 [C, W] (bit t % 32 of word t // 32
    set: token t allowed); pin: page-locked, for an asynchronous copy to a GPU.

    Rows are filled one after another on the calling thread (llguidance releases the GIL meanwhile), not on
    llguidance's LLExecutor pool: a row takes microseconds (benchmarks/structured.py), and a pool's threads would
    compete with torch's own for the gateway's cores."""
    words = bitmask_words(vocab_size)
    bits = torch.empty((len(constraints), words), dtype=torch.int32, pin_memory=pin)
    for row, c in enumerate(constraints):
        c.matcher.unsafe_compute_mask_ptr(bits[row].data_ptr(), words * 4)
    return bits


def unpack_bitmask(bits: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """bits: int32 [C, W] host bitmask -> bool [C, V] on `device` (True: allowed), one copy to the device."""
    bits = bits.to(device, non_blocking=bits.is_pinned())
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    return ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab_size]  # [C, W, 32] -> [C, V]
