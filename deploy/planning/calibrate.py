"""`expertmesh plan --calibrate`: measure the machine at hand for the planner's hardware file.

Three measurements, each written into the file with where its value came from (`hardware_yaml`):
- `measure_machine`: the matmul rate and memory-copy bandwidth of this machine's GPU (or CPU);
- `measure_transport`: each transport's per-call and per-MB cost, through a real one-group deployment (its actors,
  its codec, its server);
- `measure_experts`: an expert group's compute per call and per expert hit, through the same deployment.
The link rates, latencies and node size are not measured: they are copied from the base hardware file.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from deploy.planning.hardware import ExpertRate, Hardware, TransportRate
from gateway.dispatch.transports import ExpertCall

ROW_SIZES = (1, 8, 64, 256, 1024)  # token rows per calibration call


def measure_machine(base: Hardware, name: str, seconds: float = 0.5) -> tuple[Hardware, dict[str, str]]:
    """Measure this machine's matmul rate and memory-copy bandwidth; every other field stays `base`'s (the
    transports and experts are measured through a deployment: `calibrate_local`). Returns the hardware and, per
    field, where its value came from.

    matmul: square matmuls of 2048 (bfloat16 on CUDA, float32 on CPU: the dtypes expertmesh serves there), best of
    repeated runs. Memory: a 256 MiB tensor copy (64 MiB on CPU), counted as bytes read + bytes written.
    """
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = _best_rate(lambda: a @ b, 2 * n**3, seconds, cuda)
    size = (256 if cuda else 64) << 20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = _best_rate(lambda: dst.copy_(src), 2 * size, seconds, cuda)
    measured = dataclasses.replace(base, name=name, matmul_tflops=round(flops / 1e12, 4),
                                   hbm_gbytes_per_s=round(copy / 1e9, 2))
    where = {f.name: f"from {base.name} (not measured)" for f in dataclasses.fields(Hardware)}
    where["name"] = "given"
    where["matmul_tflops"] = f"measured: {n}x{n} {str(dtype).removeprefix('torch.')} matmul on {device}"
    where["hbm_gbytes_per_s"] = f"measured: {size >> 20} MiB copy on {device}, read + write"
    return measured, where


def _best_rate(fn, work_units: float, seconds: float, cuda: bool) -> float:
    """Work units per second of the fastest run of `fn` within about `seconds`."""
    fn()
    best = math.inf
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == math.inf:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return work_units / best


def fit_least_squares(points: list[tuple[list[float], float]]) -> list[float]:
    """Coefficients c minimising Σ (x·c − y)² over (x, y) points (float64)."""
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([[p[1]] for p in points], dtype=torch.float64)
    return torch.linalg.lstsq(x, y).solution.flatten().tolist()


def _call(engine, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """One device-0 call through the engine's transport: (wall seconds, the group's compute ms)."""
    transport = engine.backend.transport
    version = engine.backend.placement.version
    start = time.perf_counter()
    call = ExpertCall(0, layer, hidden, ids, weights, version=version)
    sent = transport.send(call)
    transport.flush()
    (reply,) = transport.receive([call], [sent])
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
    """Start a one-group deployment of `model` over each transport, measure its round trips, and measure the expert
    compute through the first; then close each. Ray is joined or started once for all of them (`connect_ray`: the
    Ray that is running, else RAY_ADDRESS, else an embedded one) and left up."""
    from gateway import Engine
    from gateway.config import CacheConfig, DeploymentConfig
    from gateway.dispatch.ray_runtime import connect_ray

    rates: dict[str, TransportRate] = {}
    experts = None
    for backend in transports:
        config = DeploymentConfig(model=model, dtype=dtype, backend=backend, devices=1,
                                  cache=CacheConfig(max_tokens=1024))
        connect_ray(config)  # before the engine, so that closing it does not stop Ray between transports
        with Engine.from_config(config) as engine:
            rates[backend] = measure_transport(engine)
            if experts is None:
                experts = measure_experts(engine)
    return rates, experts
