"""Expert backends: where the gateway sends routed tokens. The first one runs the experts in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from expert_workers.expert_group import ExpertGroup
from model_core.spec import ModelSpec


class PendingExperts(Protocol):
    """A dispatched layer whose routed output is not needed yet (the gateway computes shared experts meanwhile)."""

    def wait(self) -> torch.Tensor:
        """The summed routed-expert output, [T, H] in token order."""
        ...


class ExpertBackend(Protocol):
    """Computes routed experts for one MoE layer of a batch of tokens."""

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> PendingExperts:
        """hidden: [T, H]; topk_ids: [T, K] global expert ids; topk_weights: [T, K] float32."""
        ...

    def close(self) -> None: ...


class _Done:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value


class LocalExpertBackend:
    """Every routed expert in one in-process ExpertGroup: the reference the distributed backends must match."""

    def __init__(self, model_dir: str | Path, spec: ModelSpec, dtype: torch.dtype) -> None:
        self.group = ExpertGroup(model_dir, list(range(spec.n_routed_experts)), dtype=dtype, spec=spec)

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> PendingExperts:
        return _Done(self.group.forward(layer, hidden, topk_ids, topk_weights))

    def close(self) -> None:
        self.group = None
