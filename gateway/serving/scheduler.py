"""Continuous batching: requests join and leave the running batch at every step, under a token budget."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; the HTTP layer answers 429."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 8192  # tokens per forward step (prefill tokens + one per running sequence)
    max_running: int = 64  # sequences decoding at once
    max_waiting: int = 256  # queued requests before new ones are refused
    request_timeout_s: float = 600.0  # an HTTP request still unanswered after this is cancelled (504)

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_running", "max_waiting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"scheduler.{name}={value!r}: expected an integer >= 1")
        timeout = self.request_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"scheduler.request_timeout_s={timeout!r}: expected a number of seconds > 0")


@dataclass
class Request:
    """One sequence's generation state; callbacks run on the engine's thread."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    on_token: Callable[[Request, int], None] | None = None
    on_finish: Callable[[Request], None] | None = None
    output: list[int] = field(default_factory=list)
    seq_id: int = -1
    error: str | None = None
    finish_reason: str | None = None  # "length" | "stop" | "error" | "cancelled"
    span: object = None  # its OpenTelemetry span while tracing is on

    @property
    def cached(self) -> int:
        """Positions already in the latent cache (prompt + generated tokens fed back)."""
        return len(self.prompt) + max(len(self.output) - 1, 0) if self.output else 0

    def next_input(self) -> list[int]:
        """Tokens this request feeds to the next step: its prompt first, then its last generated token."""
        return list(self.prompt) if not self.output else [self.output[-1]]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def fail(self, error: str) -> None:
        self.error, self.finish_reason = error, "error"


class Scheduler:
    """Two queues and one `schedule()` that reads top to bottom (after nano-vllm).

    Each step runs every running sequence's next token, then admits waiting prompts in arrival order while
    the token budget and the running limit allow. A prompt larger than the whole budget runs alone.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"queue full: {len(self.waiting)} requests waiting (scheduler.max_waiting)")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Request], list[Request]]:
        """(decodes, prefills) for the next step; prefills move from waiting to running."""
        decodes = list(self.running)
        budget = self.config.max_batch_tokens - len(decodes)
        prefills: list[Request] = []
        while self.waiting and len(self.running) + len(prefills) < self.config.max_running:
            need = len(self.waiting[0].prompt)
            if need > budget and (decodes or prefills):
                break
            prefills.append(self.waiting.popleft())
            budget -= need
        self.running.extend(prefills)
        return decodes, prefills

    def retire(self, finished: list[Request]) -> None:
        gone = {id(r) for r in finished}
        self.running = [r for r in self.running if id(r) not in gone]
