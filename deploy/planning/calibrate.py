"""`expertmesh plan --calibrate`: measure the machine at hand for the planner's hardware file.

Five measurements, each written into the file with where its value came from (`hardware_yaml`):
- `measure_machine`: the matmul rate and memory-copy bandwidth of this machine's GPU (or CPU);
- `measure_transport`: each transport's per-call and per-MB cost, through a real one-group deployment (its actors,
  its codec, its server);
- `measure_experts`: an expert group's compute per call and per expert hit, through the same deployment;
- `measure_gateway`: a gateway's own decode step (all but the routed experts) against the tokens in the step,
  through a `backend: local` deployment with its groups' compute subtracted;
- `measure_cores`: how many cores' worth of work Ray workers get at once on this machine now.
The link rates, latencies and node size are not measured: they are copied from the base hardware file.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from deploy.planning.hardware import ExpertRate, GatewayRate, Hardware, TransportRate
from gateway.dispatch.transports import ExpertCall

ROW_SIZES = (1, 8, 64, 256, 1024)  # token rows per calibration call
GATEWAY_BATCHES = (1, 4, 8, 16, 32)  # decoding sequences per calibrated gateway step
GATEWAY_THREADS = 1  # torch threads of a calibrated gateway (a gateway process beside its replicas on a small machine)


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


def _call(engine, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
          pause_s: float = 0.0) -> tuple[float, float]:
    """One device-0 call through the engine's transport: (wall seconds, the group's compute ms). With `pause_s`,
    the reply is taken only after that pause, and the seconds are the call's time on the calling thread alone
    (sending it, then taking the reply that has arrived meanwhile), the wait for the group left out."""
    transport = engine.backend.transport
    call = ExpertCall(0, layer, hidden, ids, weights, version=engine.backend.placement.version)
    start = time.perf_counter()
    sent = transport.send(call)
    transport.flush()
    waited = 0.0
    if pause_s:
        waited = time.perf_counter()
        time.sleep(pause_s)
        waited = time.perf_counter() - waited
    (reply,) = transport.receive([call], [sent])
    return time.perf_counter() - start - waited, reply.compute_ms


def measure_transport(engine, runs: int = 15, sizes: tuple[int, ...] = ROW_SIZES) -> TransportRate:
    """Round trips of device batches whose experts are all elsewhere (ids -1: the group checks, computes nothing
    and answers zeros of the same shape), so the time is the transport's: the codec, the call and the reply.
    Fitted as call_us + us_per_mb · MB moved (out + back), on the median of `runs` calls per size; caller_us is
    the fixed part of the same fit over the time each call spends on the caller's thread (`_call` with a
    pause)."""
    spec, layer = engine.spec, engine.spec.moe_layers[0]
    gen = torch.Generator().manual_seed(0)
    points, caller = [], []
    for n in sizes:
        hidden = torch.randn(n, spec.hidden_size, generator=gen).to(engine.model.dtype)
        ids = torch.full((n, spec.top_k), -1, dtype=torch.long)
        weights = torch.rand(n, spec.top_k, generator=gen)
        _call(engine, layer, hidden, ids, weights)  # warm-up
        wall = statistics.median(_call(engine, layer, hidden, ids, weights)[0] for _ in range(runs))
        moved = n * spec.hidden_size * hidden.element_size() * 2 + ids.numel() * 8 + weights.numel() * 4
        points.append(([1.0, moved / 1e6], wall * 1e6))
        own = statistics.median(_call(engine, layer, hidden, ids, weights, pause_s=0.02)[0] for _ in range(runs))
        caller.append(([1.0, moved / 1e6], own * 1e6))
    call_us, us_per_mb = fit_least_squares(points)
    caller_us = min(max(fit_least_squares(caller)[0], 0.0), max(call_us, 0.0))  # a part of the whole call
    return TransportRate(call_us=round(max(call_us, 0.0), 1), us_per_mb=round(max(us_per_mb, 0.0), 1),
                         caller_us=round(caller_us, 1))


def measure_experts(engine, runs: int = 11, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> ExpertRate:
    """The group's own compute time (ExpertReply.compute_ms) for device batches where each of h experts gets
    exactly r rows, for every r in `rows` and h in 2, 4 and 8 × top_k experts; one least-squares fit of
    cost(r, h) = base + h · per_expert(r) over all of them (median of `runs` calls per shape), per_expert made
    non-decreasing in r (`nondecreasing`)."""
    spec, layer = engine.spec, engine.spec.moe_layers[0]
    k = spec.top_k
    counts = sorted({min(m * k, spec.n_routed_experts // k * k) for m in (2, 4, 8)})
    gen = torch.Generator().manual_seed(1)
    # Touch every expert's weights once first (a checkpoint is mapped from disk: a first read faults its pages in,
    # which serving pays once, not per step). Rows of k consecutive ids mod E: distinct within a row.
    every = torch.arange(spec.n_routed_experts).repeat(k).view(-1, k)  # [E, K]
    _call(engine, layer, torch.randn(every.shape[0], spec.hidden_size, generator=gen).to(engine.model.dtype), every,
          torch.rand(every.shape, generator=gen))
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
    per = nondecreasing([max(t, 0.0) for t in per])
    return ExpertRate(base_us=round(max(base, 0.0), 1),
                      per_expert_us=tuple((float(r), round(t, 1)) for r, t in zip(rows, per, strict=True)))


def nondecreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): an expert's cost cannot fall
    with more rows, so a fitted point below the one before it is noise, averaged with its neighbours."""
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def measure_gateway(engine, steps: int = 9, batches: tuple[int, ...] = GATEWAY_BATCHES,
                    prompt_tokens: int = 16) -> GatewayRate:
    """A gateway's own decode step on `engine` (a `backend: local` deployment: its groups compute in this process):
    for each batch size B, B random prompts are prefilled, then each of `steps` decode steps is timed and the groups'
    compute in it (ExpertReply.compute_ms of the step's layer dispatches, `DispatchStats.keep_layers`) is subtracted.
    What is left is everything a gateway does itself: attention, dense layers, shared experts, router, the dispatch
    plan and combine, sampling and scheduling. Fitted as base_us + per_token_us · B on the median step per B."""
    spec, stats = engine.spec, engine.backend.stats
    gen = torch.Generator().manual_seed(2)
    points = []
    for b in batches:
        prompts = [torch.randint(3, spec.vocab_size, (prompt_tokens,), generator=gen).tolist() for _ in range(b)]
        requests = [engine.submit(p, max_new_tokens=steps + 3, stop_at_eos=False) for p in prompts]
        while not all(r.output for r in requests):  # prefill
            engine.step()
        engine.step()  # one decode step to warm up
        own = []
        for _ in range(steps):
            stats.keep_layers(len(spec.moe_layers) * 4)
            start = time.perf_counter()
            engine.step()
            wall = time.perf_counter() - start
            own.append(wall - sum(c.compute_ms for r in stats.layer_log for c in r.calls) * 1e-3)
        stats.keep_layers(0)
        while not all(r.done for r in requests):
            engine.step()
        points.append(([1.0, float(b)], statistics.median(own) * 1e6))
    base, per_token = fit_least_squares(points)
    return GatewayRate(base_us=round(max(base, 0.0), 1), per_token_us=round(max(per_token, 0.0), 1),
                       threads=torch.get_num_threads())


def stream_weights(start_at: float, seconds: float, mbytes: int = 96) -> int:
    """From wall-clock `start_at` for `seconds`, on one torch thread: passes of an 8-row bf16 matmul over `mbytes`
    MB of weight matrices shaped like experts' (larger than a CPU's last-level cache, so each pass reads them from
    memory, as an expert pass does). The passes done: the work this process got meanwhile."""
    torch.set_num_threads(1)
    count = max(1, mbytes * 2**20 // (1408 * 1024 * 2))
    weights = [torch.full((1408, 1024), 0.01, dtype=torch.bfloat16) for _ in range(count)]  # quick to fill
    x = torch.full((8, 1024), 0.5, dtype=torch.bfloat16)
    time.sleep(max(0.0, start_at - time.time()))
    turns, end = 0, start_at + seconds
    while time.time() < end:
        for w in weights:
            x @ w.T
        turns += 1
    return turns


def measure_cores(workers: int | None = None, seconds: float = 1.0, rounds: int = 3) -> float:
    """Cores' worth of work Ray workers get at once on this machine now: `workers` (default: the CPU count) Ray
    tasks streaming expert-sized weights together for `seconds` (`stream_weights`), their passes over one task's
    passes alone (best of `rounds` each). Processes that read weights share the memory's bandwidth as well as the
    cores: the 2-core dev VM gives about 1.65 idle (a loop that reads no memory gives 2); other processes holding
    the cores give less (Ray starts its workers at nice 15, so a busy machine leaves its deployments a fraction of
    its cores)."""
    import os

    import ray

    workers = workers or os.cpu_count() or 1
    task = ray.remote(num_cpus=0, max_retries=0)(stream_weights)
    ray.get([task.remote(time.time(), 0.05) for _ in range(workers)])  # start the workers
    alone = max(ray.get(task.remote(time.time() + 0.5, seconds)) for _ in range(rounds))
    together = max(sum(ray.get([task.remote(start, seconds) for start in [time.time() + 1.0] * workers]))
                   for _ in range(rounds))
    return round(min(together / alone, float(workers)), 2)


def transport_in_process(config, experts: bool) -> tuple[TransportRate, ExpertRate | None]:
    """`measure_transport` (and `measure_experts` when asked) on a one-group deployment of `config` started in this
    process; run as a Ray task by `calibrate_local`."""
    from gateway import Engine

    with Engine.from_config(config) as engine:
        return measure_transport(engine), measure_experts(engine) if experts else None


def gateway_step_in_process(config, threads: int) -> GatewayRate:
    """`measure_gateway` on a deployment of `config` (backend local) started in this process, `threads` torch
    threads; run as a Ray task by `calibrate_local`."""
    from gateway import Engine

    torch.set_num_threads(threads)
    with Engine.from_config(config) as engine:
        return measure_gateway(engine)


@dataclasses.dataclass(frozen=True)
class LocalRates:
    """What `calibrate_local` measured: each transport's round trip, the experts' and a gateway's own compute."""

    transports: dict[str, TransportRate]
    experts: ExpertRate | None
    gateway: GatewayRate | None
    cores: float | None = None


def calibrate_local(model: str, dtype: str = "bfloat16", transports: tuple[str, ...] = ("ray", "grpc"),
                    gateway: bool = True, gateway_threads: int = GATEWAY_THREADS) -> LocalRates:
    """Measure a one-group deployment of `model` over each transport (its round trips; the expert compute through
    the first), and with `gateway` a `backend: local` deployment's own steps (`gateway_threads` torch threads) and
    the cores' worth of work Ray workers get at once (`measure_cores`).

    Each deployment runs in a Ray worker, where a deployment's gateways run (Serve replicas, the benchmarks' gateway
    actors): Ray starts its workers at a lower CPU priority (nice 15) than this process, so measured here a gateway
    and its calls would look faster than they are on a machine others load. Ray is joined or started once
    (`connect_ray`: the Ray that is running, else RAY_ADDRESS, else an embedded one) and left up."""
    import ray

    from gateway.config import CacheConfig, DeploymentConfig
    from gateway.dispatch.ray_runtime import connect_ray

    rates: dict[str, TransportRate] = {}
    experts = None
    for backend in transports:
        config = DeploymentConfig(model=model, dtype=dtype, backend=backend, devices=1,
                                  cache=CacheConfig(max_tokens=1024))
        connect_ray(config)
        task = ray.remote(num_cpus=0, max_retries=0)(transport_in_process)
        rates[backend], measured = ray.get(task.remote(config, experts is None))
        experts = experts or measured
    measured_gateway = cores = None
    if gateway:
        config = DeploymentConfig(model=model, dtype=dtype, backend="local", devices=1,
                                  cache=CacheConfig(max_tokens=4096))
        connect_ray(config)
        task = ray.remote(num_cpus=0, max_retries=0)(gateway_step_in_process)
        measured_gateway = ray.get(task.remote(config, gateway_threads))
        cores = measure_cores()
    return LocalRates(rates, experts, measured_gateway, cores)
