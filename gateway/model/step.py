"""The step context passed explicitly through one forward: which sequences, at which positions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepBatch:
    """N new tokens from several sequences, flattened in sequence order.

    Sequence i contributes rows [offsets[i], offsets[i] + lengths[i]) at positions
    [starts[i], starts[i] + lengths[i]).
    """

    seq_ids: list[int]
    starts: list[int]
    lengths: list[int]
    device: torch.device | str = "cpu"  # where `positions` lives: the gateway's device
    offsets: list[int] = field(init=False)
    positions: torch.Tensor = field(init=False)  # [N] int64

    def __post_init__(self) -> None:
        if not (len(self.seq_ids) == len(self.starts) == len(self.lengths)):
            raise ValueError("StepBatch: seq_ids, starts and lengths must have the same length")
        offsets, pos, total = [], [], 0
        for start, n in zip(self.starts, self.lengths, strict=True):
            if n <= 0:
                raise ValueError(f"StepBatch: every sequence needs at least one new token, got {n}")
            offsets.append(total)
            pos.extend(range(start, start + n))
            total += n
        object.__setattr__(self, "offsets", offsets)
        # Built on the host and copied once: one transfer per step, not one per sequence.
        object.__setattr__(self, "positions", torch.tensor(pos, dtype=torch.long).to(self.device))

    @property
    def n_tokens(self) -> int:
        return int(self.positions.numel())

    def last_rows(self) -> list[int]:
        """Row of each sequence's last new token (the one whose logits sample the next token)."""
        return [o + n - 1 for o, n in zip(self.offsets, self.lengths, strict=True)]
