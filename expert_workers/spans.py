"""Server spans around an ExpertGroup's forward, one per call, shared by the transports' shells (nothing happens when
tracing is off)."""

from __future__ import annotations

import torch

from expert_workers.expert_group import ExpertGroup, ExpertResult
from expert_workers.merging import CallMerger
from model_core.telemetry import extract_context


def traced_run(
    group: ExpertGroup, tracer, carrier: dict[str, str] | None, transport: str, layer: int, hidden: torch.Tensor,
    ids: torch.Tensor, weights: torch.Tensor, queue_ms: float = 0.0, version: int | None = None,
    merger: CallMerger | None = None,
) -> ExpertResult:
    """group.run (placement `version`, None: the group's current one), or merger.run (the replica's CallMerger over
    `group`: computed with the calls waiting beside it), inside an `expert_group.forward` SERVER span continuing the
    gateway's trace (W3C carrier)."""
    run = group.run if merger is None else merger.run
    if tracer is None:
        return run(layer, hidden, ids, weights, version)
    from opentelemetry.trace import SpanKind

    with tracer.start_as_current_span("expert_group.forward", context=extract_context(carrier),
                                      kind=SpanKind.SERVER) as span:
        result = run(layer, hidden, ids, weights, version)
        if not span.is_recording():
            return result
        span.set_attributes({
            "expertmesh.layer": layer, "expertmesh.device": group.device, "expertmesh.transport": transport,
            "expertmesh.tokens": int(hidden.shape[0]),
            "expertmesh.experts_hit": int((result.tokens_per_expert > 0).sum()),
            "expertmesh.compute_ms": result.compute_ms, "expertmesh.queue_ms": queue_ms,
            "expertmesh.merged_calls": result.merged_calls,
            "expertmesh.bytes_received": int(hidden.numel() * hidden.element_size() + ids.numel() * ids.element_size()
                                             + weights.numel() * weights.element_size()),
            "expertmesh.bytes_sent": int(result.output.numel() * result.output.element_size()),
        })
        return result
