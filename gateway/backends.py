"""Expert backends: the dispatcher/combiner that sends each layer's routed tokens to the expert groups."""

from __future__ import annotations

import time
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

    def set_tracer(self, tracer) -> None: ...

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> PendingExperts:
        """hidden: [T, H]; topk_ids: [T, K] global expert ids; topk_weights: [T, K] float32."""
        ...

    def close(self) -> None: ...


class _PendingCombine:
    def __init__(self, transport: Transport, layer: int, batches: list[DeviceBatch], sent: list[Any],
                 shape: tuple[int, int], dtype: torch.dtype, spans: list | None, stats: DispatchStats,
                 started: float) -> None:
        self.transport, self.layer, self.batches, self.sent = transport, layer, batches, sent
        self.shape, self.dtype, self.spans = shape, dtype, spans
        self.stats, self.started = stats, started
        self.replies: list[ExpertReply] = []

    def wait(self) -> torch.Tensor:
        pending = [(b.device, self.layer, s) for b, s in zip(self.batches, self.sent, strict=True)]
        try:
            self.replies = self.transport.receive(pending)
        finally:
            if self.spans:
                for span, reply in zip(self.spans, self.replies or [None] * len(self.spans), strict=True):
                    if reply is not None and span.is_recording():
                        span.set_attribute("expertmesh.bytes_received",
                                           reply.output.numel() * reply.output.element_size())
                        span.set_attribute("expertmesh.compute_ms", reply.compute_ms)
                    span.end()
        out = combine(*self.shape, self.batches, [r.output for r in self.replies], self.dtype)
        self.stats.layers += 1
        self.stats.wait_seconds += time.perf_counter() - self.started
        return out


class DispatchingBackend:
    """One dispatch plan per layer, all devices' batches in flight at once, partial sums scatter-added back.

    The local, Ray and gRPC deployments differ only in `transport`.
    """

    def __init__(self, placement: Placement, transport: Transport, on_close: Callable[[], None] | None = None) -> None:
        self.placement = placement
        self.transport = transport
        self.expert_device = placement.device_tensor()
        self.stats = DispatchStats(placement.n_devices)
        self.tracer = None  # set by the engine when tracing is on: one CLIENT span per device per layer
        self.pool = None  # the replica pool, for Ray-backed deployments
        self._on_close = on_close

    def set_tracer(self, tracer) -> None:
        """Trace dispatches (None: off). In-process groups record their server spans with the same tracer."""
        self.tracer = tracer
        self.transport.tracer = tracer

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> PendingExperts:
        started = time.perf_counter()
        batches = plan_dispatch(topk_ids, topk_weights, self.expert_device, self.placement.n_devices)
        if self.tracer is None:
            sent = [self.transport.send(b.device, layer, hidden[b.rows], b.ids, b.weights) for b in batches]
            spans = None
        else:
            sent, spans = self._send_traced(layer, hidden, batches)
        self.transport.flush()
        self.stats.record(layer, batches, hidden.element_size(), hidden.shape[1])
        return _PendingCombine(self.transport, layer, batches, sent, tuple(hidden.shape), hidden.dtype, spans,
                               self.stats, started)

    def _send_traced(self, layer: int, hidden: torch.Tensor, batches: list[DeviceBatch]) -> tuple[list, list]:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        from model_core.telemetry import inject_context

        sent, spans = [], []
        for b in batches:
            rows = hidden[b.rows]
            span = self.tracer.start_span(f"dispatch device {b.device}", kind=SpanKind.CLIENT)
            if span.is_recording():  # an unsampled trace pays for no attributes
                span.set_attributes({
                    "expertmesh.layer": layer, "expertmesh.device": b.device, "expertmesh.tokens": int(b.rows.numel()),
                    "expertmesh.experts_hit": int(torch.unique(b.ids[b.ids >= 0]).numel()),
                    "expertmesh.bytes_sent": int(rows.numel() * rows.element_size()
                                                 + b.ids.numel() * b.ids.element_size()
                                                 + b.weights.numel() * b.weights.element_size()),
                })
            with trace.use_span(span, end_on_exit=False):
                carrier = inject_context()
            sent.append(self.transport.send(b.device, layer, rows, b.ids, b.weights, carrier))
            spans.append(span)
        return sent, spans

    def close(self) -> None:
        self.transport.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
