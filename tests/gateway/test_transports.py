"""Replica transports under failure: in-flight counts, timeouts, probes of restarting actors, eviction, channels."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from expert_workers.actor import ExpertGroupActor
from gateway.config import DeploymentConfig, RpcConfig
from gateway.dispatch.dispatcher import Dispatcher, plan_dispatch
from gateway.dispatch.groups import build_dispatcher
from gateway.dispatch.replica_pool import ExpertGroupPool
from gateway.dispatch.transports import DispatchError, ExpertCall, GrpcTransport, LocalTransport, RayTransport
from model_core.spec import ModelSpec
from router_service.placement import Placement
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

DEVICES = 2


def deployment(path, backend="ray", replicas=1, timeout_s=30.0, deadline_s=60.0) -> DeploymentConfig:
    return DeploymentConfig(model=str(path), backend=backend, devices=DEVICES, replicas=replicas,
                            rpc=RpcConfig(timeout_s=timeout_s, replica_deadline_s=deadline_s))


def layer_batch(spec: ModelSpec, n: int = 12, seed: int = 0) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MoE layer index with random hidden rows [n, H], distinct expert ids [n, K] and weights [n, K]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, spec.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(spec.n_routed_experts, generator=gen)[: spec.top_k] for _ in range(n)])
    weights = torch.rand(n, spec.top_k, generator=gen)
    return spec.moe_layers[0], hidden, ids, weights


@pytest.fixture(scope="module")
def reference(model_dirs):
    """The in-process dispatcher: what every transport must return."""
    path = model_dirs["tiny-v3"]
    cfg = DeploymentConfig(model=str(path), devices=DEVICES)
    dispatcher = build_dispatcher(cfg, ModelSpec.from_dir(path), Placement.contiguous(16, DEVICES))
    assert isinstance(dispatcher.transport, LocalTransport)
    yield dispatcher
    dispatcher.close()


def expected(reference: Dispatcher, batch) -> torch.Tensor:
    return reference.dispatch(*batch).wait()


def make(path, actor_class=ExpertGroupActor, transport="ray", **kw) -> Dispatcher:
    cfg = deployment(path, backend=transport, **kw)
    pool = ExpertGroupPool(cfg, Placement.contiguous(16, DEVICES), actor_class=actor_class)
    if transport == "ray":
        t = RayTransport(pool, cfg.rpc.timeout_s, cfg.rpc.replica_deadline_s)
    else:
        t = GrpcTransport(pool, cfg.rpc.timeout_s, cfg.rpc.replica_deadline_s, cfg.rpc.max_message_mb << 20)
    return Dispatcher(pool.placement, t, pool=pool, on_close=pool.shutdown)


@pytest.mark.parametrize("transport", ["ray", "grpc"])
def test_a_failed_call_releases_every_in_flight_count_of_its_layer(transport, model_dirs, ray_cluster):
    path = model_dirs["tiny-v3"]
    spec = ModelSpec.from_dir(path)
    dispatcher = make(path, transport=transport)
    try:
        layer, hidden, ids, weights = layer_batch(spec)
        t = dispatcher.transport
        on = [ids.clone(), ids.clone()]
        on[0][ids >= 8] = -1  # contiguous placement: experts 0..7 on group 0, 8..15 on group 1
        on[1][ids < 8] = -1
        # Group 0 gets a layer it does not serve (refused: not retryable); group 1's call is fine.
        calls = [ExpertCall(0, 999, hidden, on[0], weights), ExpertCall(1, layer, hidden, on[1], weights)]
        handles = [t.send(call) for call in calls]
        with pytest.raises(DispatchError, match="group 0, layer 999"):
            t.receive(calls, handles)
        assert set(dispatcher.pool.inflight().values()) == {0}
        started = time.monotonic()
        dispatcher.pool.scale(1, 2)
        dispatcher.pool.scale(1, 1)  # drains at once: nothing is left counted in flight
        assert time.monotonic() - started < 30
        assert set(dispatcher.pool.inflight().values()) == {0}
    finally:
        dispatcher.close()


class SlowOnDemand(ExpertGroupActor):
    """An expert actor whose next forward can be made slow (its sleep is the scenario: a replica still computing
    a call the gateway has given up on); it counts its forward calls."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forwards, self.delay = 0, 0.0

    def slow_next(self, seconds: float) -> None:
        self.delay = seconds

    def forward(self, *args, **kwargs):
        self.forwards += 1
        delay, self.delay = self.delay, 0.0
        time.sleep(delay)
        return super().forward(*args, **kwargs)

    def forward_calls(self) -> int:
        return self.forwards


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_timed_out_call_is_never_sent_again_to_the_replica_still_computing_it(replicas, model_dirs, ray_cluster,
                                                                                 reference):
    path = model_dirs["tiny-v3"]
    batch = layer_batch(ModelSpec.from_dir(path), seed=replicas)
    want = expected(reference, batch)
    dispatcher = make(path, SlowOnDemand, replicas=replicas, timeout_s=1.0, deadline_s=20)
    try:
        pool = dispatcher.pool
        slow = pool.live(0)[0]
        ray_cluster.get(slow.actor.slow_next.remote(6.0))
        if replicas == 1:
            with pytest.raises(DispatchError, match=r"did not answer within rpc.timeout_s=1.0s.*no other replica"):
                dispatcher.dispatch(*batch).wait()
        else:  # round robin: one of two dispatches lands on the slow replica and is answered by the other
            for _ in range(2):
                assert torch.allclose(dispatcher.dispatch(*batch).wait(), want, atol=1e-6)
            assert dispatcher.transport.retries == 1
        assert pool.inflight()[(0, slow.index)] == 1  # the timed-out call still counts while the replica computes it
        # The actor runs one call at a time: this answers once the slow forward has ended.
        assert ray_cluster.get(slow.actor.forward_calls.remote()) == 1  # the original only, never a duplicate

        def answered_and_released() -> bool:  # the next dispatch's sweep releases the ended call
            assert torch.allclose(dispatcher.dispatch(*batch).wait(), want, atol=1e-6)
            return set(pool.inflight().values()) == {0}

        wait_until(answered_and_released, 30, "the timed-out call's in-flight count to be released once it ended")
    finally:
        dispatcher.close()


class SlowRestart(ExpertGroupActor):
    """After Ray restarts it, the actor takes 12 s to come back (a big checkpoint loading): the sleep is the
    scenario (dispatches must not wait for it), not a wait for a condition."""

    def __init__(self, *args, **kwargs) -> None:
        import ray

        if ray.get_runtime_context().was_current_actor_reconstructed:
            time.sleep(12.0)
        super().__init__(*args, **kwargs)


@pytest.mark.parametrize("transport", ["ray", "grpc"])
def test_a_restarting_replica_never_blocks_the_step_while_another_replica_serves(transport, model_dirs, ray_cluster,
                                                                                 reference):
    path = model_dirs["tiny-v3"]
    batch = layer_batch(ModelSpec.from_dir(path), seed=3)
    dispatcher = make(path, SlowRestart, transport=transport, replicas=2)
    try:
        pool = dispatcher.pool
        want = expected(reference, batch)
        for _ in range(2):
            assert torch.allclose(dispatcher.dispatch(*batch).wait(), want, atol=1e-6)
        assert all(r.calls == 1 for r in pool.live(0) + pool.live(1))  # round robin per group
        victim = pool.live(0)[0]
        ray_cluster.kill(victim.actor, no_restart=False)
        for _ in range(6):  # some calls hit the dead replica and are retried on the other one
            assert torch.allclose(dispatcher.dispatch(*batch).wait(), want, atol=1e-6)
        # Every dispatch was answered while the victim was still restarting: nobody waited for it.
        pool.poll()
        assert pool.restarts == 0 and victim.down_since is not None
        # The probe sees the restart in the background; polling applies what it found.
        wait_until(lambda: pool.poll() or pool.restarts >= 1, 30, "the pool to see the slow replica restarted")
        assert pool.restarts == 1 and victim.restarts == 1 and victim.down_since is None
        assert len(pool.live(0)) == 2 and set(pool.inflight().values()) == {0}
    finally:
        dispatcher.close()


def test_a_replica_that_stays_dead_is_evicted_and_replaced(model_dirs, ray_cluster, reference):
    path = model_dirs["tiny-v3"]
    batch = layer_batch(ModelSpec.from_dir(path), seed=4)
    dispatcher = make(path, replicas=2, deadline_s=1.0)
    try:
        pool = dispatcher.pool
        want = expected(reference, batch)
        victim = pool.live(1)[0]
        ray_cluster.kill(victim.actor, no_restart=True)

        def replaced() -> bool:  # every dispatch is answered meanwhile
            assert torch.allclose(dispatcher.dispatch(*batch).wait(), want, atol=1e-6)
            return victim not in pool.live(1) and len(pool.live(1)) == 2

        wait_until(replaced, 60, "the dead replica of group 1 to be evicted and replaced", interval_s=0.1)
        assert pool.evicted == 1 and victim not in pool.live(1) and len(pool.live(1)) == 2
        assert all(r.down_since is None for r in pool.live(1))
        assert torch.allclose(dispatcher.dispatch(*batch).wait(), want, atol=1e-6)
    finally:
        dispatcher.close()


def test_grpc_keeps_one_channel_per_replica_across_restarts(model_dirs, ray_cluster, reference):
    path = model_dirs["tiny-v3"]
    batch = layer_batch(ModelSpec.from_dir(path), seed=5)
    dispatcher = make(path, transport="grpc")
    try:
        pool, want = dispatcher.pool, expected(reference, batch)
        ports = set()
        for _ in range(3):
            victim = pool.live(1)[0]
            ports.add(victim.grpc_address)
            ray_cluster.kill(victim.actor, no_restart=False)

            def on_a_new_port(victim=victim) -> bool:  # answered dispatches let the pool see its new address
                assert torch.allclose(dispatcher.dispatch(*batch).wait(), want, atol=1e-6)
                return victim.grpc_address not in ports

            wait_until(on_a_new_port, 60, "the restarted replica's gRPC server on a new port", interval_s=0)
        assert len(ports) == 3  # it really came back on new ports
        assert dispatcher.transport.channels == DEVICES
    finally:
        dispatcher.close()


def test_concurrent_dispatches_leave_consistent_replica_counts(model_dirs, ray_cluster, reference):
    path = model_dirs["tiny-v3"]
    batches = [layer_batch(ModelSpec.from_dir(path), n=4, seed=10 + i) for i in range(4)]
    wants = [expected(reference, b) for b in batches]
    dispatcher = make(path, replicas=2)
    try:
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                for _ in range(15):
                    assert torch.allclose(dispatcher.dispatch(*batches[i]).wait(), wants[i], atol=1e-6)
            except BaseException as exc:  # any failure fails the test below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == []
        pool = dispatcher.pool
        assert set(pool.inflight().values()) == {0}
        sends = sum(len(plan_dispatch(b[2], b[3], reference.expert_device, DEVICES)) for b in batches) * 15
        assert sum(r.calls for d in range(DEVICES) for r in pool.live(d)) == sends
    finally:
        dispatcher.close()


@pytest.mark.parametrize("transport", ["ray", "grpc"])
def test_calls_read_the_layer_batch_from_shared_memory_and_give_the_same_output(transport, model_dirs, ray_cluster,
                                                                                reference):
    """Every call reads the one batch put for its layer (Ray's object store, or a file in /dev/shm for gRPC); a
    replica on another node (or sharing off) is sent its rows; a killed replica's call is sent again with the same
    shared batch. The outputs never change."""
    path = model_dirs["tiny-v3"]
    batch = layer_batch(ModelSpec.from_dir(path), n=24, seed=6)
    want = expected(reference, batch)
    dispatcher = make(path, transport=transport, replicas=2)
    try:
        t = dispatcher.transport
        assert t.share_min_bytes > 24 * 64 * 4  # tiny rows travel with their call by default
        unshared = dispatcher.dispatch(*batch).wait()
        assert t.shared_puts == 0 and t.shared_calls == 0
        assert torch.allclose(unshared, want, atol=1e-6)
        t.share_min_bytes = 1  # every call reads the shared batch
        for n in range(1, 4):
            pending = dispatcher.dispatch(*batch)
            assert torch.equal(pending.wait(), unshared)
            assert t.shared_puts == n and t.shared_calls == n * len(pending.batches) == n * DEVICES
        node = t.node_id
        t.node_id = "another-node"  # the replicas are no longer on the gateway's node: rows are sent
        assert torch.equal(dispatcher.dispatch(*batch).wait(), unshared)
        assert t.shared_puts == 3 and t.shared_calls == 3 * DEVICES
        t.node_id = node
        retries = t.retries
        ray_cluster.kill(dispatcher.pool.live(0)[0].actor, no_restart=False)  # returns before the actor is dead
        sent = []

        def resent() -> bool:  # calls to the killed replica go again, to the other one, reading the same batch
            assert torch.equal(dispatcher.dispatch(*batch).wait(), unshared)
            sent.append(1)
            return t.retries > retries and len(sent) >= 4

        wait_until(resent, 60, "a call to the killed replica of group 0 to be sent again", interval_s=0)
        assert t.shared_puts == 3 + len(sent)  # one batch put per layer, retries included
        assert set(dispatcher.pool.inflight().values()) == {0}
        if transport == "grpc":
            assert t._writer.files == 1  # one file served every layer: each was free again after its layer
    finally:
        dispatcher.close()


class NoSharedMemory(ExpertGroupActor):
    """An expert actor whose gRPC server looks for shared batches where none are (as another user would)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from pathlib import Path

        self.server._servicer._batches.directory = Path("/nonexistent")


def test_a_grpc_group_that_cannot_read_the_shared_batch_is_sent_its_rows(model_dirs, ray_cluster, reference):
    path = model_dirs["tiny-v3"]
    batch = layer_batch(ModelSpec.from_dir(path), n=24, seed=7)
    want = expected(reference, batch)
    dispatcher = make(path, NoSharedMemory, transport="grpc")
    try:
        t = dispatcher.transport
        t.share_min_bytes = 1
        for _ in range(3):
            assert torch.allclose(dispatcher.dispatch(*batch).wait(), want, atol=1e-6)
        assert t._unshared == {r.name for d in range(DEVICES) for r in dispatcher.pool.live(d)}
        assert t.shared_calls == DEVICES  # only the first layer's calls tried, then went again with their rows
        assert t.retries == 0 and set(dispatcher.pool.inflight().values()) == {0}
    finally:
        dispatcher.close()
