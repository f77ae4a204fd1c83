"""Continuous batching over a paged cache: chunked prefill under token budgets, preemption when the cache is full."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gateway.config import SchedulerConfig
from gateway.model.kv_cache import CacheFull, PagedLatentCache
from gateway.model.sampling import Penalties

if TYPE_CHECKING:
    from gateway.serving.constraints import Constraint


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; the HTTP layer answers 429."""


@dataclass(eq=False)  # identity: the queues find and remove a request by who it is
class Request:
    """One sequence's generation state; callbacks run on the engine's thread."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    penalties: Penalties = Penalties()
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids [K], biases [K]) on the device
    constraint: Constraint | None = None  # its structured output's grammar state, advanced by each sampled token
    logprobs: int | None = None  # report the model's logprob of each sampled token and of this many top tokens
    # Per generated token, when `logprobs` is set: (its logprob, [(token id, logprob)] of the top tokens).
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    on_token: Callable[[Request, int], None] | None = None
    on_finish: Callable[[Request], None] | None = None
    output: list[int] = field(default_factory=list)
    seq_id: int = -1
    computed: int = 0  # positions in the latent cache (prompt, then generated tokens fed back)
    scheduled: int = 0  # positions this step computes
    cached_prompt: int = 0  # positions the prefix cache supplied at the last admission
    preemptions: int = 0  # times its cache was taken back (it is then recomputed)
    error: str | None = None
    finish_reason: str | None = None  # "length" | "stop" | "error" | "cancelled"
    span: object = None  # its OpenTelemetry span while tracing is on

    @property
    def tokens(self) -> list[int]:
        """Every token the model has to have seen for the next sample: the prompt, then the generated ones."""
        return self.prompt + self.output

    def next_input(self) -> list[int]:
        """The tokens this step feeds: the next `scheduled` positions not yet in the cache (without building
        prompt + output every step)."""
        lo, hi, n = self.computed, self.computed + self.scheduled, len(self.prompt)
        return self.prompt[lo:hi] + self.output[max(lo - n, 0) : max(hi - n, 0)]

    @property
    def ready_to_sample(self) -> bool:
        """Whether, once this step has run, every position is cached (the last row's logits give a new token)."""
        return self.computed + self.scheduled == len(self.prompt) + len(self.output)

    @property
    def grammar_complete(self) -> bool:
        """Whether its structured output's grammar can take no more tokens: its text is complete, it ends."""
        return self.constraint is not None and self.constraint.complete

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def fail(self, error: str) -> None:
        self.error, self.finish_reason = error, "error"


class Scheduler:
    """Two queues, a paged cache and one `schedule()` that reads top to bottom (after nano-vllm and vLLM).

    Each step: every decoding sequence's next token; then prefill chunks of running sequences still reading
    their prompt; then waiting prompts in arrival order, all under the token budgets (a prompt longer than
    scheduler.max_prefill_tokens is prefilled in chunks over several steps, so decoding never stalls behind
    it). When the cache cannot hold a running sequence's next tokens, the most recently admitted sequence is
    preempted: its blocks are freed and it returns to the head of the queue, to be recomputed (prompt and
    generated tokens) when there is room again.
    """

    def __init__(self, config: SchedulerConfig, cache: PagedLatentCache) -> None:
        self.config = config
        self.cache = cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self._seq_ids = itertools.count()

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"queue full: {len(self.waiting)} requests waiting (scheduler.max_waiting)")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stalled(self) -> list[Request]:
        """Running requests with no position left to compute: ones forwarded but never given a token (after a
        failure in between). `schedule()` would never pick them again."""
        return [r for r in self.running if len(r.prompt) + len(r.output) <= r.computed]

    def schedule(self) -> list[Request]:
        """The requests in the next step, each with `scheduled` positions to compute; their cache is reserved.
        Admitted requests move from waiting to running."""
        budget, prefill = self.config.max_batch_tokens, self.config.max_prefill_tokens
        batch: list[Request] = []
        decoding = [r for r in self.running if len(r.prompt) + len(r.output) - r.computed == 1]
        chunking = [r for r in self.running if len(r.prompt) + len(r.output) - r.computed > 1]
        for r in decoding + chunking:
            if r not in self.running:  # preempted below for an older sequence's room
                continue
            remaining = len(r.prompt) + len(r.output) - r.computed
            n = 1 if remaining == 1 else min(remaining, budget, prefill)
            if n < 1 or n > budget:
                continue
            if not self._make_room(r, r.computed + n, batch):
                continue
            r.scheduled = n
            batch.append(r)
            budget -= n
            prefill -= n if remaining > 1 else 0
        while self.waiting and len(self.running) < self.config.max_running and min(budget, prefill) > 0:
            r = self.waiting[0]
            if r.seq_id < 0:
                r.seq_id = next(self._seq_ids)
            tokens = r.tokens
            try:  # room for the prefix cache's hit plus a first chunk of what is left
                r.computed = r.cached_prompt = self.cache.allocate(r.seq_id, tokens=tokens,
                                                                   chunk=min(budget, prefill))
            except CacheFull:
                break  # running sequences free blocks as they finish
            n = min(len(tokens) - r.computed, budget, prefill)
            self.waiting.popleft()
            self.running.append(r)
            r.scheduled = n
            batch.append(r)
            budget -= n
            prefill -= n
        return batch

    def _make_room(self, r: Request, total: int, scheduled: list[Request]) -> bool:
        """Reserve cache for r's first `total` positions, preempting the newest running sequences not already in
        this step while the pool is short (r itself when none is left). Returns whether r keeps running."""
        while not self.cache.can_reserve(r.seq_id, total):
            taken = {id(x) for x in scheduled}
            victim = next((x for x in reversed(self.running) if x is not r and id(x) not in taken), r)
            self.preempt(victim)
            if victim is r:
                return False
        self.cache.reserve(r.seq_id, total)
        return True

    def preempt(self, r: Request) -> None:
        """Take a running request's cache back; it waits at the head of the queue and is recomputed."""
        self.running.remove(r)
        self.cache.free(r.seq_id)
        r.computed = r.scheduled = 0
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    def retire(self, finished: list[Request]) -> None:
        gone = {id(r) for r in finished}
        self.running = [r for r in self.running if id(r) not in gone]
