"""scheduler.micro_batches 'auto': choose 1 or 2 ping-pong micro-batches from step times measured while serving.

Whether staggering two halves through the layers helps depends on where the time goes: it hides an expert hop
behind the other half's attention only when the gateway and the groups have their own cores or GPUs, and costs
twice the calls per layer either way. So 'auto' does not guess: a probe round serves `probe` pairs of steps, one
step with each setting back to back, and keeps the setting whose steps took fewer seconds per token (the median
over the pairs of their ratio: neighbouring steps serve nearly the same batch, so a prefill chunk or a growing
batch moves both sides of a pair alike). A round that confirms the choice doubles the time to the next (up to
`max_period` steps), so a settled deployment spends ever less of its time on the losing setting; a round that
flips it starts over at `period`. Tokens do not depend on the setting (in float32; see README), so switching is
safe at any step boundary.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class MicroBatchChooser:
    """Probes 1 and 2 micro-batches in pairs of steps, then serves the faster until the next probe round."""

    period: int = 512  # steps from one probe round to the next after a round that changed the choice
    probe: int = 8  # pairs of steps (1 then 2 micro-batches) per round
    max_period: int = 8192  # the longest gap, reached by rounds that keep confirming the choice
    choice: int = 1  # the setting served outside probes
    gap: int = 0  # steps from this round's start to the next one's (0: `period`)
    rounds: int = 0  # probe rounds completed
    _step: int = 0
    _round_at: int = 0  # the step the current or next probe round starts at
    _pair: list[float] = field(default_factory=list)  # seconds per token of the current pair's steps so far
    _ratios: list[float] = field(default_factory=list)  # per pair: 2 micro-batches' time ÷ 1's, per token

    def __post_init__(self) -> None:
        if not 0 < 2 * self.probe <= self.period <= self.max_period:
            raise ValueError(f"micro-batch probing: expected 0 < 2·probe ≤ period ≤ max_period, got probe="
                             f"{self.probe}, period={self.period}, max_period={self.max_period}")
        self.gap = self.gap or self.period

    def next_setting(self) -> int:
        """The micro-batches for the coming step: 1, 2, 1, 2, … in a round's first 2·probe steps."""
        position = self._step - self._round_at
        if 0 <= position < 2 * self.probe:
            return 1 + position % 2
        return self.choice

    def record(self, setting: int, seconds: float, tokens: int) -> None:
        """The step just served with `setting` took `seconds` for `tokens` tokens; a round's last pair decides."""
        position = self._step - self._round_at
        self._step += 1
        if not 0 <= position < 2 * self.probe:
            return
        if position % 2 == 0:
            self._pair = []
        if tokens > 0 and len(self._pair) == position % 2:  # a pair counts only if both of its steps ran tokens
            self._pair.append(seconds / tokens)
            if len(self._pair) == 2 and self._pair[0] > 0:
                self._ratios.append(self._pair[1] / self._pair[0])
        if position == 2 * self.probe - 1:
            self._decide()

    def _decide(self) -> None:
        if self._ratios:
            best = 2 if statistics.median(self._ratios) < 1.0 else 1
            self.gap = min(2 * self.gap, self.max_period) if best == self.choice else self.period
            self.choice = best
        self.rounds += 1
        self._round_at += self.gap
        self._ratios = []
