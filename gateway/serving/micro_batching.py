"""scheduler.micro_batches 'auto': choose 1 or 2 ping-pong micro-batches from step times measured while serving.

Whether staggering two halves through the layers helps depends on where the time goes: it hides an expert hop
behind the other half's attention only when the gateway and the groups have their own cores or GPUs, and costs
twice the calls per layer either way. So 'auto' does not guess: every `period` steps it serves `probe` steps with
each setting in turn and keeps the one whose steps took fewer seconds per token. Tokens do not depend on the
setting (in float32; see README), so switching is safe at any step boundary.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class MicroBatchChooser:
    """Alternates probes of 1 and 2 micro-batches, then serves the faster until the next probe round."""

    period: int = 512  # steps between probe rounds
    probe: int = 8  # steps measured per setting in a round
    choice: int = 1  # the setting served outside probes
    _step: int = 0
    _samples: dict[int, list[float]] = field(default_factory=lambda: {1: [], 2: []})

    def next_setting(self) -> int:
        """The micro-batches for the coming step: probing (1, 2, 1, 2, …) in the round's first 2·probe steps."""
        position = self._step % self.period
        if position < 2 * self.probe:
            return 1 + position % 2
        return self.choice

    def record(self, setting: int, seconds: float, tokens: int) -> None:
        """The step just served with `setting` took `seconds` for `tokens` tokens; a round's last probe decides."""
        position = self._step % self.period
        self._step += 1
        if position >= 2 * self.probe or tokens <= 0:
            return
        self._samples[setting].append(seconds / tokens)
        if position == 2 * self.probe - 1:
            if self._samples[1] and self._samples[2]:
                one, two = (statistics.median(self._samples[m]) for m in (1, 2))
                self.choice = 2 if two < one else 1
            self._samples = {1: [], 2: []}
