"""The routing-trace store: running traces are never evicted, a byte budget holds, chunks are compact copies,
and concurrent readers and writers see consistent traces."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gateway.serving.routing_trace import RoutingTraceStore
from model_core.telemetry import TracingConfig
from router_service.routing import Routing

LAYERS, K, E = [1, 2, 3], 2, 8
EXPERT_DEVICE = torch.arange(E) // 4  # two devices


def step_routings(n_tokens: int, seed: int = 0) -> dict[int, Routing]:
    gen = torch.Generator().manual_seed(seed)
    routings = {}
    for layer in LAYERS:
        ids = torch.randint(0, E, (n_tokens, K), generator=gen)
        routings[layer] = Routing(ids=ids, weights=torch.rand(n_tokens, K, generator=gen),
                                  scores=torch.rand(n_tokens, E, generator=gen), served=EXPERT_DEVICE[ids])
    return routings


def record(store: RoutingTraceStore, traces, lengths: list[int], seed: int = 0) -> dict[int, Routing]:
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    routings = step_routings(sum(lengths), seed)
    starts = [len(t.tokens) for t in traces]  # each trace continues where it stands
    store.record_step(traces, starts, offsets, lengths, [[7] * n for n in lengths], routings)
    return routings


def test_prefix_cached_positions_are_marked_and_recomputed_positions_are_not_recorded_twice():
    store = RoutingTraceStore(capacity=4)
    trace = store.start("r", LAYERS, K, [11, 12, 13, 14, 15, 16])
    routings = step_routings(2)
    store.record_step([trace], [4], [0], [2], [[15, 16]], routings)  # positions 0-3 came cached
    assert trace.tokens == [11, 12, 13, 14, 15, 16] and (trace.ids[:4] == -1).all()
    assert (trace.devices[:4] == -1).all() and (trace.weights[:4] == 0).all()
    assert torch.equal(trace.ids[4:], torch.stack([routings[layer].ids for layer in LAYERS], 1).int())
    assert trace.expert_counts(E).sum() == 2 * len(LAYERS) * K  # cached positions are not counted
    # Preempted and recomputed from position 0 (prompt + one generated token): only the new position is added.
    again = step_routings(7, seed=3)
    store.record_step([trace], [0], [0], [7], [[11, 12, 13, 14, 15, 16, 9]], again)
    assert trace.tokens == [11, 12, 13, 14, 15, 16, 9] and trace.ids.shape[0] == 7
    assert torch.equal(trace.ids[6], torch.stack([again[layer].ids[6] for layer in LAYERS]).int())


def tensor_bytes(trace) -> int:
    return sum(t.nbytes for t in (trace.ids, trace.weights, trace.devices, trace.changed_by_top_m,
                                  trace.changed_by_bias))


def test_eviction_drops_finished_traces_oldest_first_and_never_a_running_one():
    store = RoutingTraceStore(capacity=2)
    running = store.start("running", LAYERS, K, 3)
    record(store, [running], [3])
    for name in ("a", "b", "c"):
        store.start(name, LAYERS, K, 1)
        store.finish(name)
    # "running" is the oldest entry but has not finished: the finished "a" (then "b") leave instead.
    assert store.get("running").ids.shape == (3, len(LAYERS), K)
    assert store.get("c").request_id == "c"
    with pytest.raises(KeyError, match="'a': no routing trace"):
        store.get("a")
    assert len(store) == 2 and store.evicted == 2
    more = [store.start(f"live{i}", LAYERS, K, 1) for i in range(3)]  # running traces may exceed the capacity
    assert all(store.get(t.request_id) for t in more) and store.get("running")


def test_the_byte_budget_holds_and_counts_the_tensors_bytes():
    store = RoutingTraceStore(capacity=1000, max_bytes=20_000)
    for i in range(60):
        trace = store.start(f"r{i}", LAYERS, K, 4)
        record(store, [trace], [4], seed=i)
        record(store, [trace], [1], seed=100 + i)
        store.finish(f"r{i}")
        assert store.nbytes <= 20_000
    kept = [store.get(f"r{i}") for i in range(60) if f"r{i}" in store]
    assert 0 < len(kept) < 60 and store.get("r59")  # the newest stays, the oldest went
    assert store.nbytes == sum(tensor_bytes(t) for t in kept)
    assert store.nbytes > 20_000 - tensor_bytes(kept[0])  # it evicts only what it must


def test_stored_chunks_are_compact_copies_not_views_of_the_step_tensors():
    store = RoutingTraceStore(capacity=8)
    a, b = store.start("a", LAYERS, K, 2), store.start("b", LAYERS, K, 5)
    record(store, [a, b], [2, 5])
    for trace in (a, b):
        for chunks in (trace._ids, trace._weights, trace._devices, trace._by_limit, trace._by_bias):
            (chunk,) = chunks
            assert chunk.is_contiguous() and chunk.untyped_storage().nbytes() == chunk.nbytes
    assert a._ids[0].dtype == torch.int32 and a._weights[0].dtype == torch.float32
    assert a._by_limit[0].dtype == torch.bool and a.ids.shape == (2, len(LAYERS), K)


def test_the_store_reports_its_bytes_and_the_config_validates_the_budget():
    store = RoutingTraceStore(capacity=4)
    trace = store.start("x", LAYERS, K, 3)
    record(store, [trace], [3])
    assert store.nbytes == tensor_bytes(store.get("x")) == 3 * len(LAYERS) * (3 * K * 4 + 2)
    assert TracingConfig(routing_trace_max_mb=0.5).routing_trace_max_mb == 0.5
    for bad in (0, -1, True, "big"):
        with pytest.raises(ValueError, match=f"tracing.routing_trace_max_mb={bad!r}"):
            TracingConfig(routing_trace_max_mb=bad)


def test_concurrent_start_record_finish_and_get_stay_consistent():
    store = RoutingTraceStore(capacity=16, max_bytes=200_000)
    errors: list[BaseException] = []
    stop = time.monotonic() + 1.0

    def writer(w: int) -> None:
        i = 0
        try:
            while time.monotonic() < stop:
                trace = store.start(f"w{w}-{i}", LAYERS, K, 3)
                record(store, [trace], [3], seed=i)
                for s in range(4):
                    record(store, [trace], [1], seed=s)
                store.finish(trace.request_id)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    def reader() -> None:
        try:
            while time.monotonic() < stop:
                for w in range(2):
                    for i in range(0, 400):
                        try:
                            trace = store.get(f"w{w}-{i}")
                        except KeyError:
                            continue
                        data = trace.to_json()
                        assert len(data["tokens"]) == len(data["expert_ids"]) == len(data["devices"])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)] + [threading.Thread(target=reader)
                                                                                 for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[0]
    assert len(store) <= 16 and store.nbytes <= 200_000
