"""`expertmesh plan --calibrate`: measure a transport's per-call and per-byte cost and an expert group's compute,
through a real deployment (its actors, its codec, its server), for the cost model's local rates."""

from __future__ import annotations

import statistics
import time

import torch

from router_service.cost_model import ExpertRate, TransportRate, fit_least_squares

ROW_SIZES = (1, 8, 64, 256, 1024)  # token rows per calibration call


def _call(engine, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """One device-0 call through the engine's transport: (wall seconds, the group's compute ms)."""
    transport = engine.backend.transport
    version = engine.backend.placement.version
    start = time.perf_counter()
    sent = transport.send(0, layer, hidden, ids, weights, None, version)
    transport.flush()
    (reply,) = transport.receive([(0, layer, sent)])
    return time.perf_counter() - start, reply.compute_ms


def measure_transport(engine, runs: int = 15, sizes: tuple[int, ...] = ROW_SIZES) -> TransportRate:
    """Round trips of device batches whose experts are all elsewhere (ids -1: the group checks, computes nothing
    and answers zeros of the same shape), so the time is the transport's: the codec, the call and the reply.
    Fitted as call_us + us_per_mb · MB moved (out + back), on the median of `runs` calls per size."""
    spec, layer = engine.spec, engine.spec.moe_layers[0]
    gen = torch.Generator().manual_seed(0)
    points = []
    for n in sizes:
        hidden = torch.randn(n, spec.hidden_size, generator=gen).to(engine.model.dtype)
        ids = torch.full((n, spec.top_k), -1, dtype=torch.long)
        weights = torch.rand(n, spec.top_k, generator=gen)
        _call(engine, layer, hidden, ids, weights)  # warm-up
        wall = statistics.median(_call(engine, layer, hidden, ids, weights)[0] for _ in range(runs))
        moved = n * spec.hidden_size * hidden.element_size() * 2 + ids.numel() * 8 + weights.numel() * 4
        points.append(([1.0, moved / 1e6], wall * 1e6))
    call_us, us_per_mb = fit_least_squares(points)
    return TransportRate(call_us=round(max(call_us, 0.0), 1), us_per_mb=round(max(us_per_mb, 0.0), 1))


def measure_experts(engine, runs: int = 11, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> ExpertRate:
    """The group's own compute time (ExpertReply.compute_ms) for device batches where each of h experts gets
    exactly r rows, for every r in `rows` and h in 2, 4 and 8 × top_k experts; one least-squares fit of
    cost(r, h) = base + h · per_expert(r) over all of them (median of `runs` calls per shape)."""
    spec, layer = engine.spec, engine.spec.moe_layers[0]
    k = spec.top_k
    counts = sorted({min(m * k, spec.n_routed_experts // k * k) for m in (2, 4, 8)})
    gen = torch.Generator().manual_seed(1)
    points = []
    for i, r in enumerate(rows):
        for h in counts:
            experts = torch.randperm(spec.n_routed_experts, generator=gen)[:h]
            # Round-robin slots: any k consecutive ones are distinct experts; each expert gets r of them.
            ids = experts.repeat(r).view(-1, k)  # [r·h/k, k]
            hidden = torch.randn(ids.shape[0], spec.hidden_size, generator=gen).to(engine.model.dtype)
            weights = torch.rand(ids.shape, generator=gen)
            _call(engine, layer, hidden, ids, weights)
            cost_us = statistics.median(_call(engine, layer, hidden, ids, weights)[1] for _ in range(runs)) * 1e3
            x = [0.0] * (1 + len(rows))
            x[0], x[1 + i] = 1.0, float(h)
            points.append((x, cost_us))
    base, *per = fit_least_squares(points)
    return ExpertRate(base_us=round(max(base, 0.0), 1),
                      per_expert_us=tuple((float(r), round(max(t, 0.0), 1)) for r, t in zip(rows, per, strict=True)))


def calibrate_local(model: str, dtype: str = "bfloat16", transports: tuple[str, ...] = ("ray", "grpc"),
                    ) -> tuple[dict[str, TransportRate], ExpertRate | None]:
    """Start a one-group deployment of `model` over each transport (on the Ray that is running, else an embedded
    one), measure its round trips, and measure the expert compute through the first; then close each."""
    import ray

    from gateway import Engine
    from gateway.config import DeploymentConfig
    from gateway.model.kv_cache import CacheConfig

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    rates: dict[str, TransportRate] = {}
    experts = None
    for backend in transports:
        config = DeploymentConfig(model=model, dtype=dtype, backend=backend, devices=1,
                                  cache=CacheConfig(max_tokens=1024))
        with Engine.from_config(config) as engine:
            rates[backend] = measure_transport(engine)
            if experts is None:
                experts = measure_experts(engine)
    return rates, experts
