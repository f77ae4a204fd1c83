"""An expert replica computes the calls that wait together for the same layer and placement version in one pass:
FIFO by key, a malformed call fails alone, rows go back to their callers, and so over Ray (a threaded actor) and
gRPC (calls from several clients at once).

Calls are made to wait deterministically: a gate holds the first pass until every later call is queued in the
merger (`CallMerger.waiting`), then opens. Calls that join a running torch pass expert by expert are held at a
chosen expert by the merger's `before_expert` hook (`Stops`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
import torch

from expert_workers.actor import ExpertGroupActor
from expert_workers.expert_group import ExpertGroup, ExpertRequestError, PlacementVersionMissing
from expert_workers.grouped_ffn import auto_impl
from expert_workers.grpc_server import ExpertServer
from expert_workers.merging import CallMerger
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos.channel import channel_options
from protos.codec import NAMES, proto_to_tensor, readonly_tensor, tensor_to_numpy, tensor_to_proto
from tests.conftest import float32_gemm_is_batch_invariant, wait_until
from tests.expert_workers.conftest import HOSTED

TIMEOUT_S = 60.0


class Gate:
    """Stands in for an ExpertGroup in a CallMerger: `hold` makes the next pass wait (its `entered` set) until
    `release`; records every pass's (layer, placement version, rows)."""

    def __init__(self, group: ExpertGroup) -> None:
        self.group = group
        self.passes: list[tuple[int, int, int]] = []
        self.entered, self._open = threading.Event(), threading.Event()
        self._open.set()

    def __getattr__(self, name: str):
        return getattr(self.group, name)

    def hold(self) -> None:
        self.entered.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def run(self, layer, hidden, ids, weights, version=None):
        self.passes.append((layer, self.group.layout(version).version, int(hidden.shape[0])))
        if not self._open.is_set():
            self.entered.set()
            if not self._open.wait(TIMEOUT_S):
                raise TimeoutError("Gate: never released")
        return self.group.run(layer, hidden, ids, weights, version)


def routing(group: ExpertGroup, t: int, seed: int, experts: list[int] = HOSTED, dtype: torch.dtype = torch.float32):
    """Random hidden [T, H] in dtype, ids [T, K] drawn from `experts` with some -1, weights [T, K]."""
    spec, gen = group.spec, torch.Generator().manual_seed(seed)
    k = min(spec.top_k, len(experts))
    hidden = torch.randn(t, spec.hidden_size, generator=gen).to(dtype)
    pool = torch.tensor(experts)
    ids = torch.stack([pool[torch.randperm(len(experts), generator=gen)[:k]] for _ in range(t)])
    ids = torch.where(torch.rand(t, k, generator=gen) < 0.2, -1, ids)
    return hidden, ids, torch.rand(t, k, generator=gen)


def assert_rows_as_alone(merged: torch.Tensor, alone: torch.Tensor) -> None:
    assert merged.dtype == alone.dtype
    if float32_gemm_is_batch_invariant():
        assert torch.equal(merged, alone)
    elif alone.dtype == torch.float32:  # this CPU's GEMM kernels round by row count: the last bits may differ
        torch.testing.assert_close(merged, alone, rtol=0, atol=1e-5)
    else:  # ... and so may the rounding to half precision: one unit in the last place
        torch.testing.assert_close(merged, alone, rtol=2.0 ** -7, atol=1e-5)


def queue_while_held(gate: Gate, merger: CallMerger, pool: ThreadPoolExecutor, first: tuple, calls: list[tuple]):
    """Start `first` (its pass held by the gate), queue `calls` one by one in that order, then open the gate;
    returns (first's future, the calls' futures)."""
    gate.hold()
    try:
        head = pool.submit(merger.run, *first)
        wait_until(gate.entered.is_set, TIMEOUT_S, "the first pass to start")
        futures = []
        for n, call in enumerate(calls, 1):
            futures.append(pool.submit(merger.run, *call))
            wait_until(lambda n=n: merger.waiting() == n, TIMEOUT_S, f"{n} calls waiting")
    finally:
        gate.release()
    return head, futures


@contextmanager
def released(gate: Gate) -> Iterator[Gate]:
    """Opens the gate on the way out, also when an assertion failed while it held a pass."""
    try:
        yield gate
    finally:
        gate.release()


@pytest.fixture
def gate(group) -> Gate:
    return Gate(group)


def test_calls_waiting_during_a_pass_are_computed_in_one_pass_and_split_back(group, gate):
    merger = CallMerger(gate, join=False)
    layer = group.spec.moe_layers[0]
    first = (layer, *routing(group, 6, seed=1))
    calls = [(layer, *routing(group, t, seed=10 + t)) for t in (5, 1, 9, 3)]
    with ThreadPoolExecutor(8) as pool:
        head, futures = queue_while_held(gate, merger, pool, first, calls)
        results = [f.result(TIMEOUT_S) for f in futures]
        assert head.result(TIMEOUT_S).merged_calls == 1
    rows = [c[1].shape[0] for c in calls]
    assert gate.passes == [(layer, 0, 6), (layer, 0, sum(rows))]
    whole = group.run(layer, *(torch.cat([c[i] for c in calls]) for i in (1, 2, 3))).output.split(rows)
    for call, result, part in zip(calls, results, whole, strict=True):
        assert torch.equal(result.output, part)  # each caller gets its own rows of the one pass
        assert_rows_as_alone(result.output, group.run(*call).output)
        assert result.merged_calls == 4 and result.compute_ms == results[0].compute_ms > 0
        assert torch.equal(result.tokens_per_expert, group.run(*call).tokens_per_expert)  # this call's own counts
    stats = merger.stats()
    assert {k: stats[k] for k in ("calls", "passes", "rows", "merged_calls", "max_calls_per_pass")} == {
        "calls": 5, "passes": 2, "rows": 6 + sum(rows), "merged_calls": 4, "max_calls_per_pass": 4}
    assert stats["rows_per_pass"] == (6 + sum(rows)) / 2 and stats["merged_share"] == 4 / 5
    assert stats["compute_s"] >= 1e-3 * (results[0].compute_ms + head.result().compute_ms) * 0.999
    merger.reset_stats()
    assert merger.stats()["calls"] == 0 and merger.stats()["merged_share"] == 0.0


def test_calls_on_distinct_experts_are_bit_identical_to_alone_on_any_cpu(group, gate):
    """Each expert's rows come from one call, so its GEMMs see the rows they see alone: exact whatever the BLAS
    (the torch FFN loops over experts alone and merged: over 64 rows for one expert, or under 3/4 of them hit)."""
    merger = CallMerger(gate, join=False)
    layer = group.spec.moe_layers[1]
    calls = [(layer, *routing(group, 100, seed=3, experts=HOSTED[:4])),
             (layer, *routing(group, 5, seed=4, experts=HOSTED[4:]))]
    with ThreadPoolExecutor(4) as pool:
        _, futures = queue_while_held(gate, merger, pool, (layer, *routing(group, 2, seed=6)), calls)
        results = [f.result(TIMEOUT_S) for f in futures]
    assert [r.merged_calls for r in results] == [2, 2]
    for call, result in zip(calls, results, strict=True):
        assert torch.equal(result.output, group.run(*call).output)


def test_other_layers_and_versions_wait_for_their_own_pass_in_arrival_order(model_dirs):
    group = ExpertGroup(model_dirs["tiny-v3"], HOSTED, device=0)
    group.stage(1, HOSTED[::-1])  # the same experts in another order: another placement version
    gate = Gate(group)
    merger = CallMerger(gate, join=False)
    l1, l2 = group.spec.moe_layers
    keys = [(l1, 0), (l2, 0), (l1, 1), (l1, 0), (l2, 0), (l1, 1), (l1, None)]  # None: the current version, 0
    calls = [(layer, *routing(group, 2 + i, seed=20 + i), version) for i, (layer, version) in enumerate(keys)]
    calls.append((l1, *routing(group, 4, seed=28, experts=HOSTED[:2]), 0))  # K = 2: its routing does not stack
    with ThreadPoolExecutor(10) as pool:
        _, futures = queue_while_held(gate, merger, pool, (l2, *routing(group, 3, seed=7), 1), calls)
        results = [f.result(TIMEOUT_S) for f in futures]
    rows = [c[1].shape[0] for c in calls]
    assert gate.passes == [(l2, 1, 3), (l1, 0, rows[0] + rows[3] + rows[6]), (l2, 0, rows[1] + rows[4]),
                           (l1, 1, rows[2] + rows[5]), (l1, 0, 4)]
    assert [r.merged_calls for r in results] == [3, 2, 2, 3, 2, 2, 3, 1]
    for call, result in zip(calls, results, strict=True):
        assert_rows_as_alone(result.output, group.run(*call).output)
    assert merger.stats()["passes"] == 5 and merger.stats()["merged_calls"] == 7


def test_a_malformed_call_fails_alone_and_the_others_are_merged(group, gate):
    merger = CallMerger(gate, join=False)
    layer = group.spec.moe_layers[0]
    good = [(layer, *routing(group, t, seed=30 + t)) for t in (4, 7, 2)]
    hidden, ids, weights = routing(group, 3, seed=40)
    with ThreadPoolExecutor(6) as pool, released(gate):
        gate.hold()
        head = pool.submit(merger.run, layer, *routing(group, 2, seed=41))
        wait_until(gate.entered.is_set, TIMEOUT_S, "the first pass to start")
        futures = [pool.submit(merger.run, *good[0])]
        wait_until(lambda: merger.waiting() == 1, TIMEOUT_S, "a call waiting")
        # refused on the caller's thread while the pass is still held: never queued, nothing else fails
        with pytest.raises(ExpertRequestError, match=r"hidden.shape=\[3, 63\]"):
            merger.run(layer, hidden[:, :63], ids, weights)
        foreign = ids.clone()
        foreign[0, 0] = 9
        with pytest.raises(ExpertRequestError, match="experts \\[9\\] are not hosted"):
            merger.run(layer, hidden, foreign, weights)
        with pytest.raises(PlacementVersionMissing, match="placement_version=5"):
            merger.run(layer, hidden, ids, weights, 5)
        futures += [pool.submit(merger.run, *call) for call in good[1:]]
        wait_until(lambda: merger.waiting() == 3, TIMEOUT_S, "3 calls waiting")
        gate.release()
        results = [f.result(TIMEOUT_S) for f in futures]
        head.result(TIMEOUT_S)
    assert [r.merged_calls for r in results] == [3, 3, 3]
    for call, result in zip(good, results, strict=True):
        assert_rows_as_alone(result.output, group.run(*call).output)
    assert merger.stats()["calls"] == 4 and merger.stats()["passes"] == 2
    with pytest.raises(ExpertRequestError, match=r"hidden.shape=\[3, 63\]"):  # idle: refused by the group's run
        merger.run(layer, hidden[:, :63], ids, weights)
    assert merger.stats()["calls"] == 4 and merger.stats()["passes"] == 2  # refused calls are not counted


def test_a_failing_pass_answers_every_call_in_it_and_the_merger_keeps_serving(group, gate):
    merger = CallMerger(gate, join=False)
    layer = group.spec.moe_layers[0]
    calls = [(layer, *routing(group, t, seed=50 + t)) for t in (3, 4)]
    run = gate.run

    def broken(layer, hidden, ids, weights, version=None):
        if hidden.shape[0] == 7:
            raise RuntimeError("device lost")
        return run(layer, hidden, ids, weights, version)

    gate.run = broken
    with ThreadPoolExecutor(4) as pool:
        head, futures = queue_while_held(gate, merger, pool, (layer, *routing(group, 2, seed=8)), calls)
        for f in futures:
            with pytest.raises(RuntimeError, match="device lost"):
                f.result(TIMEOUT_S)
        head.result(TIMEOUT_S)
    assert torch.equal(merger.run(*calls[0]).output, group.run(*calls[0]).output)


def test_merging_off_computes_every_call_in_its_own_pass_in_arrival_order(group, gate):
    merger = CallMerger(gate, enabled=False, join=False)
    layer = group.spec.moe_layers[0]
    calls = [(layer, *routing(group, t, seed=60 + t)) for t in (2, 5, 3)]
    with ThreadPoolExecutor(4) as pool:
        _, futures = queue_while_held(gate, merger, pool, (layer, *routing(group, 1, seed=9)), calls)
        results = [f.result(TIMEOUT_S) for f in futures]
    assert gate.passes == [(layer, 0, 1), (layer, 0, 2), (layer, 0, 5), (layer, 0, 3)]
    for call, result in zip(calls, results, strict=True):
        assert torch.equal(result.output, group.run(*call).output) and result.merged_calls == 1
    stats = merger.stats()
    assert (stats["calls"], stats["passes"], stats["merged_calls"], stats["max_calls_per_pass"]) == (4, 4, 0, 1)


class GatedActor(ExpertGroupActor):
    """The actor with its merger's group behind a Gate, so that a test can hold a pass while calls arrive."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = Gate(self.group)
        self.merger.group = self.gate
        self.merger.join = False  # whole-call merging: the pass goes through the gate's run

    def hold(self) -> None:
        self.gate.hold()

    def held(self) -> bool:
        return self.gate.entered.is_set()

    def waiting(self) -> int:
        return self.merger.waiting()

    def release(self) -> None:
        self.gate.release()


def test_a_threaded_ray_actor_merges_calls_from_concurrent_callers(ray_cluster, model_dirs, group):
    ray = ray_cluster
    actor = ray.remote(concurrency_groups={"watch": 1}, max_concurrency=16)(GatedActor).options(num_cpus=1).remote(
        str(model_dirs["tiny-v3"]), HOSTED, "float32", 0, serve_grpc=True)
    try:
        address = ray.get(actor.describe.remote(), timeout=TIMEOUT_S)["grpc_address"]
        layer = group.spec.moe_layers[0]
        calls = [routing(group, t, seed=70 + t) for t in (4, 6, 3, 5)]

        def packed(hidden, ids, weights):
            return (layer, tensor_to_numpy(hidden), tensor_to_numpy(ids), tensor_to_numpy(weights),
                    NAMES[hidden.dtype], None, None)

        ray.get(actor.hold.remote())
        head = actor.forward_packed.remote(packed(*routing(group, 2, seed=11)))
        wait_until(lambda: ray.get(actor.held.remote()), TIMEOUT_S, "the first pass to start")
        refs = [actor.forward_packed.remote(packed(*calls[0])), actor.forward_dag.remote(packed(*calls[1]))]
        wait_until(lambda: ray.get(actor.waiting.remote()) == 2, TIMEOUT_S, "2 Ray calls waiting")
        with grpc.insecure_channel(address, options=channel_options()) as ch:  # a second gateway, over gRPC
            stub = pb_grpc.ExpertServiceStub(ch)
            replies = [stub.Forward.future(forward_request(layer, *call), timeout=TIMEOUT_S) for call in calls[2:]]
            wait_until(lambda: ray.get(actor.waiting.remote()) == 4, TIMEOUT_S, "4 calls waiting")
            ray.get(actor.release.remote())
            outputs = [readonly_tensor(out) for out, _ in ray.get(refs, timeout=TIMEOUT_S)]
            outputs += [proto_to_tensor(r.result().output, "output") for r in replies]
        ray.get(head, timeout=TIMEOUT_S)
        for call, output in zip(calls, outputs, strict=True):
            assert_rows_as_alone(output, group.run(layer, *call).output)
        stats = ray.get(actor.merge_stats.remote())
        assert (stats["calls"], stats["passes"], stats["merged_calls"], stats["max_calls_per_pass"]) == (5, 2, 4, 4)
        assert ray.get(actor.describe.remote())["merge"] == stats
        ray.get(actor.reset_merge_stats.remote())
        assert ray.get(actor.merge_stats.remote())["calls"] == 0
    finally:
        ray.get(actor.shutdown.remote(), timeout=TIMEOUT_S)
        ray.kill(actor)


def forward_request(layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> pb.ForwardRequest:
    req = pb.ForwardRequest(layer=layer)
    tensor_to_proto(hidden, out=req.hidden)
    tensor_to_proto(ids, out=req.expert_ids)
    tensor_to_proto(weights, out=req.weights)
    return req


def test_concurrent_grpc_calls_meet_in_one_pass_and_keep_a_span_each(group, gate):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    merger = CallMerger(gate, join=False)
    layer = group.spec.moe_layers[1]
    calls = [routing(group, t, seed=80 + t, dtype=dtype) for t, dtype in
             ((3, torch.float32), (8, torch.bfloat16), (1, torch.float32), (6, torch.float32))]
    with (ExpertServer(group, merger=merger, tracer=provider.get_tracer("test")) as srv, released(gate),
          grpc.insecure_channel(srv.address, options=channel_options()) as ch):
        stub = pb_grpc.ExpertServiceStub(ch)
        gate.hold()
        head = stub.Forward.future(forward_request(layer, *routing(group, 2, seed=12)), timeout=TIMEOUT_S)
        wait_until(gate.entered.is_set, TIMEOUT_S, "the first pass to start")
        replies = [stub.Forward.future(forward_request(layer, *call), timeout=TIMEOUT_S) for call in calls]
        bad = stub.Forward.future(forward_request(layer, *routing(group, 2, seed=13, experts=[9, 10, 11, 12])),
                                  timeout=TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as refused:  # refused while the pass is held: it never waited
            bad.result()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        wait_until(lambda: merger.waiting() == len(calls), TIMEOUT_S, "the gRPC calls waiting")
        gate.release()
        outputs = [proto_to_tensor(r.result().output, "output") for r in replies]
        head.result()
    assert gate.passes == [(layer, 0, 2), (layer, 0, 18)]
    for call, output in zip(calls, outputs, strict=True):
        assert output.dtype == call[0].dtype
        assert_rows_as_alone(output, group.run(layer, *call).output)
    assert merger.stats()["merged_calls"] == 4
    assert np.isclose(merger.stats()["merged_share"], 4 / 5)
    forwards = [span for span in spans.get_finished_spans() if span.name == "expert_group.forward"]
    assert len(forwards) == 6  # the refused call's span too (it records the error, not the forward)
    attributes = [span.attributes for span in forwards if "expertmesh.tokens" in span.attributes]
    assert sorted((a["expertmesh.tokens"], a["expertmesh.merged_calls"]) for a in attributes) == [
        (1, 4), (2, 1), (3, 4), (6, 4), (8, 4)]


# -- calls joining a running pass, expert by expert (the torch FFN's loop) ------------------------------------------


class Stops:
    """A CallMerger's `before_expert` hook that holds its pass before the chosen experts: `reached[e]` is set when
    the pass got there, and it goes on once `go(e)` (or `release_all`); `fail` makes it raise at that expert."""

    def __init__(self, experts: list[int], fail: int | None = None) -> None:
        self.reached = {e: threading.Event() for e in experts}
        self._open = {e: threading.Event() for e in experts}
        self.fail = fail

    def __call__(self, expert: int) -> None:
        if expert == self.fail:
            raise RuntimeError("device lost")
        if expert in self.reached:
            self.reached[expert].set()
            if not self._open[expert].wait(TIMEOUT_S):
                raise TimeoutError(f"Stops: expert {expert} never released")

    def wait(self, expert: int) -> None:
        wait_until(self.reached[expert].is_set, TIMEOUT_S, f"the pass to reach expert {expert}")

    def go(self, expert: int) -> None:
        self._open[expert].set()

    def release_all(self) -> None:
        for event in self._open.values():
            event.set()


def join_while_held(merger: CallMerger, stops: Stops, pool: ThreadPoolExecutor, first: tuple,
                    joiners: dict[int, list[tuple]]):
    """Start `first`; at each held expert e (in order), queue joiners[e] and let the pass go on once they wait.
    Returns (first's future, the joiners' futures in order)."""
    try:
        head = pool.submit(merger.run, *first)
        futures = []
        for e, calls in joiners.items():
            stops.wait(e)
            futures += [pool.submit(merger.run, *call) for call in calls]
            n = len(calls)
            wait_until(lambda n=n: merger.waiting() == n, TIMEOUT_S, f"{n} calls waiting")
            stops.go(e)
    finally:
        stops.release_all()
    return head, futures


def assert_within_one_ulp(merged: torch.Tensor, alone: torch.Tensor) -> None:
    """bfloat16: every element equal, or one unit in the last place apart (a row's float32 sum rounded once)."""
    assert merged.dtype == alone.dtype == torch.bfloat16
    a, b = merged.float(), alone.float()
    _, exponent = torch.frexp(torch.maximum(a.abs(), b.abs()))
    ulp = torch.ldexp(torch.ones_like(a), exponent - 8)  # 8 significant bits: |x| in [2^(e-1), 2^e)
    assert bool(((a - b).abs() <= ulp).all()), float((a - b).abs().max())


def test_calls_arriving_mid_pass_join_it_expert_by_expert_and_get_their_own_rows(group):
    """float32 on CPU, the loop (at most 4 of the 8 experts hit by the first call): calls queued while the pass is
    at expert 2 and at expert 5 join it there; the experts they missed are computed at the end. One pass."""
    merger, stops = CallMerger(group), Stops([2, 5])
    merger.before_expert = stops
    layer = group.spec.moe_layers[0]
    first = (layer, *routing(group, 6, seed=90, experts=HOSTED[:4]))
    assert auto_impl(first[1], torch.bincount(first[2][first[2] >= 0], minlength=8)) == "loop"
    shared = (layer, *routing(group, 5, seed=91, experts=HOSTED[:4]))  # 0-1 at the end, 2-3 beside first's rows
    disjoint = (layer, *routing(group, 4, seed=92, experts=HOSTED[4:]))  # experts no other call's rows reach
    late = (layer, *routing(group, 7, seed=93, experts=HOSTED[:4]))  # joins at 5: 0-3 at the end, 0-1 beside shared
    with ThreadPoolExecutor(6) as pool:
        head, futures = join_while_held(merger, stops, pool, first, {2: [shared, disjoint], 5: [late]})
        results = [head.result(TIMEOUT_S)] + [f.result(TIMEOUT_S) for f in futures]
    calls = [first, shared, disjoint, late]
    for call, result in zip(calls, results, strict=True):
        alone = group.run(*call)
        assert result.output.dtype == torch.float32
        assert torch.allclose(result.output, alone.output, atol=1e-6)
        assert torch.equal(result.tokens_per_expert, alone.tokens_per_expert)
        assert result.merged_calls == 4 and result.compute_ms == results[0].compute_ms > 0
    assert torch.equal(results[2].output, group.run(*disjoint).output)  # its experts saw only its own rows
    rows = sum(c[1].shape[0] for c in calls)
    stats = merger.stats()
    assert {k: stats[k] for k in ("calls", "passes", "rows", "merged_calls", "max_calls_per_pass")} == {
        "calls": 4, "passes": 1, "rows": rows, "merged_calls": 4, "max_calls_per_pass": 4}
    assert stats["rows_per_pass"] == rows and stats["merged_share"] == 1.0
    assert stats["compute_s"] >= 1e-3 * results[0].compute_ms * 0.999


def test_a_bfloat16_joiner_and_the_first_caller_match_their_calls_alone_within_one_ulp(model_dirs):
    group = ExpertGroup(model_dirs["tiny-v3"], HOSTED, dtype=torch.bfloat16)
    merger, stops = CallMerger(group), Stops([3])
    merger.before_expert = stops
    layer = group.spec.moe_layers[1]
    first = (layer, *routing(group, 9, seed=94, dtype=torch.bfloat16))
    joiner = (layer, *routing(group, 6, seed=95, dtype=torch.bfloat16))
    with ThreadPoolExecutor(4) as pool:
        head, (future,) = join_while_held(merger, stops, pool, first, {3: [joiner]})
        results = [head.result(TIMEOUT_S), future.result(TIMEOUT_S)]
    for call, result in zip((first, joiner), results, strict=True):
        assert result.merged_calls == 2
        assert_within_one_ulp(result.output, group.run(*call).output)
    assert merger.stats()["passes"] == 1 and merger.stats()["rows"] == 15


def test_calls_of_another_layer_or_k_do_not_join_and_get_their_own_passes(group):
    merger, stops = CallMerger(group), Stops([1])
    merger.before_expert = stops
    l1, l2 = group.spec.moe_layers
    first = (l1, *routing(group, 5, seed=96, experts=HOSTED[:4]))
    others = [(l2, *routing(group, 3, seed=97, experts=HOSTED[:4])),
              (l1, *routing(group, 4, seed=98, experts=HOSTED[:2]))]  # K = 2
    with ThreadPoolExecutor(4) as pool:
        head, futures = join_while_held(merger, stops, pool, first, {1: others})
        results = [head.result(TIMEOUT_S)] + [f.result(TIMEOUT_S) for f in futures]
    assert [r.merged_calls for r in results] == [1, 1, 1]
    for call, result in zip([first, *others], results, strict=True):
        assert torch.equal(result.output, group.run(*call).output)
    stats = merger.stats()
    assert (stats["calls"], stats["passes"], stats["merged_calls"], stats["rows"]) == (3, 3, 0, 12)


def test_a_bad_call_is_refused_alone_and_never_joins(group):
    merger, stops = CallMerger(group), Stops([2])
    merger.before_expert = stops
    layer = group.spec.moe_layers[0]
    first = (layer, *routing(group, 5, seed=99, experts=HOSTED[:4]))
    hidden, ids, weights = routing(group, 3, seed=100)
    foreign = ids.clone()
    foreign[0, 0] = 9
    with ThreadPoolExecutor(4) as pool:
        try:
            head = pool.submit(merger.run, *first)
            stops.wait(2)
            with pytest.raises(ExpertRequestError, match=r"hidden.shape=\[3, 63\]"):
                merger.run(layer, hidden[:, :63], ids, weights)
            with pytest.raises(ExpertRequestError, match="experts \\[9\\] are not hosted"):
                merger.run(layer, hidden, foreign, weights)
            assert merger.waiting() == 0
        finally:
            stops.release_all()
        result = head.result(TIMEOUT_S)
    assert result.merged_calls == 1 and torch.equal(result.output, group.run(*first).output)
    with pytest.raises(ExpertRequestError, match="experts \\[9\\] are not hosted"):  # idle: checked as it starts
        merger.run(layer, hidden, foreign, weights)
    stats = merger.stats()
    assert (stats["calls"], stats["passes"], stats["rows"]) == (1, 1, 5)  # refused calls are not counted


def test_a_joined_pass_that_fails_answers_every_member_and_the_merger_keeps_serving(group):
    merger, stops = CallMerger(group), Stops([2], fail=4)
    merger.before_expert = stops
    layer = group.spec.moe_layers[0]
    first = (layer, *routing(group, 4, seed=101, experts=HOSTED[:4]))
    joiner = (layer, *routing(group, 3, seed=102))
    with ThreadPoolExecutor(4) as pool:
        head, (future,) = join_while_held(merger, stops, pool, first, {2: [joiner]})
        for f in (head, future):
            with pytest.raises(RuntimeError, match="device lost"):
                f.result(TIMEOUT_S)
    merger.before_expert = None
    assert torch.equal(merger.run(*joiner).output, group.run(*joiner).output)
    assert merger.stats()["passes"] == 2 and merger.stats()["merged_calls"] == 2


def test_a_pass_off_the_loop_merges_whole_calls_only(group, gate):
    """float32 decode steps with most experts hit run padded_bmm: a call waiting meanwhile gets the next pass."""
    merger = CallMerger(gate)  # join on: the pass takes the gate's run, as it does off the loop
    merger.before_expert = Stops([], fail=0)  # a joinable pass would fail at its first expert
    layer = group.spec.moe_layers[0]
    first = (layer, *routing(group, 12, seed=103))
    assert auto_impl(first[1], torch.bincount(first[2][first[2] >= 0], minlength=8)) == "padded_bmm"
    calls = [(layer, *routing(group, 5, seed=104))]
    with ThreadPoolExecutor(4) as pool:
        head, futures = queue_while_held(gate, merger, pool, first, calls)
        assert futures[0].result(TIMEOUT_S).merged_calls == 1 and head.result(TIMEOUT_S).merged_calls == 1
    assert gate.passes == [(layer, 0, 12), (layer, 0, 5)]
