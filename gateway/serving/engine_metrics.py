"""EngineMetrics: what a metrics scrape reports about an engine, copied out as plain data (reading changes nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from gateway.dispatch.replica_choice import PoolSnapshot


class MetricsSource(Protocol):
    """What a scrape reads of an engine (the Engine is one): read-only attributes, no calls that change state."""

    scheduler: Any  # Scheduler: waiting, running, preemptions
    cache: Any  # PagedLatentCache: stats()
    routing_summary: Any  # RoutingSummary: tokens_per_expert
    backend: Any  # Dispatcher: stats, placement, pool, transport
    spec: Any  # ModelSpec: moe_layers
    balance: Any  # BalanceClient or None
    rearrangements: int
    rearrangement_failures: int


@dataclass(frozen=True)
class EngineMetrics:
    """One engine's counters and gauges at one moment; per-layer values are keyed by MoE layer."""

    queue_depth: int  # requests waiting for admission
    running: int  # sequences in the running batch
    preemptions: int
    cache: dict  # PagedLatentCache.stats(): blocks, free_blocks, block_size, prefix_queried_tokens, prefix_hit_tokens
    tokens_per_expert: dict[int, list[int]]  # routed tokens per expert
    device_tokens: dict[int, list[int]]  # token rows dispatched per device
    dispatch_calls: int
    dispatch_seconds: float  # wall time of layer dispatches, send to combine
    dispatch_layers: int
    placement_version: int
    redundant_slots: dict[int, int]  # expert copies beyond one per expert
    rearrangements: int
    rearrangement_failures: int
    replicas: PoolSnapshot | None  # None: no replica pool (local backend)
    dispatch_retries: int  # calls re-sent after a replica failed (0 without a pool)
    balance: dict | None  # BalanceClient.metrics(); None: balancing off

    @classmethod
    def of(cls, engine: MetricsSource) -> EngineMetrics:
        scheduler, dispatch, placement = engine.scheduler, engine.backend.stats, engine.backend.placement
        pool = engine.backend.pool
        return cls(
            queue_depth=len(scheduler.waiting), running=len(scheduler.running), preemptions=scheduler.preemptions,
            cache=engine.cache.stats(),
            tokens_per_expert={layer: counts.tolist()
                               for layer, counts in engine.routing_summary.tokens_per_expert.items()},
            device_tokens={layer: counts.tolist() for layer, counts in dispatch.tokens.items()},
            dispatch_calls=dispatch.calls, dispatch_seconds=dispatch.wait_seconds, dispatch_layers=dispatch.layers,
            placement_version=placement.version,
            redundant_slots={layer: placement.redundant_slots(layer) for layer in engine.spec.moe_layers},
            rearrangements=engine.rearrangements, rearrangement_failures=engine.rearrangement_failures,
            replicas=pool.snapshot() if pool is not None else None,
            dispatch_retries=engine.backend.transport.retries if pool is not None else 0,
            balance=engine.balance.metrics() if engine.balance is not None else None,
        )
