"""Expert backends: the dispatcher/combiner that sends each layer's routed tokens to the expert groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from gateway.dispatch import DeviceBatch, DispatchStats, combine, plan_dispatch
from gateway.transports import ExpertReply, Transport
from router_service.placement import Placement


class PendingExperts(Protocol):
    """A dispatched layer whose routed output is not needed yet (the gateway computes shared experts meanwhile)."""

    def wait(self) -> torch.Tensor:
        """The summed routed-expert output, [T, H] in token order."""
        ...


class ExpertBackend(Protocol):
    """Computes routed experts for one MoE layer of a batch of tokens."""

    placement: Placement

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> PendingExperts:
        """hidden: [T, H]; topk_ids: [T, K] global expert ids; topk_weights: [T, K] float32."""
        ...

    def close(self) -> None: ...


class _PendingCombine:
    def __init__(self, transport: Transport, layer: int, batches: list[DeviceBatch], sent: list[Any],
                 shape: tuple[int, int], dtype: torch.dtype) -> None:
        self.transport, self.layer, self.batches, self.sent = transport, layer, batches, sent
        self.shape, self.dtype = shape, dtype
        self.replies: list[ExpertReply] = []

    def wait(self) -> torch.Tensor:
        pending = [(b.device, self.layer, s) for b, s in zip(self.batches, self.sent, strict=True)]
        self.replies = self.transport.receive(pending)
        return combine(*self.shape, self.batches, [r.output for r in self.replies], self.dtype)


class DispatchingBackend:
    """One dispatch plan per layer, all devices' batches in flight at once, partial sums scatter-added back.

    The local, Ray and gRPC deployments differ only in `transport`.
    """

    def __init__(self, placement: Placement, transport: Transport, on_close: Callable[[], None] | None = None) -> None:
        self.placement = placement
        self.transport = transport
        self.expert_device = placement.device_tensor()
        self.stats = DispatchStats(placement.n_devices)
        self._on_close = on_close

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> PendingExperts:
        batches = plan_dispatch(topk_ids, topk_weights, self.expert_device, self.placement.n_devices)
        sent = [self.transport.send(b.device, layer, hidden[b.rows], b.ids, b.weights) for b in batches]
        self.stats.record(layer, batches, hidden.element_size(), hidden.shape[1])
        return _PendingCombine(self.transport, layer, batches, sent, tuple(hidden.shape), hidden.dtype)

    def close(self) -> None:
        self.transport.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
