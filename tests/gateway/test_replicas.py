"""Expert-group replicas: scaling while requests flow, and surviving an expert actor that dies mid-request."""

from __future__ import annotations

import time

import pytest

from expert_workers.actor import ExpertGroupActor
from gateway import Engine
from gateway.config import DeploymentConfig, RpcConfig
from gateway.dispatch.transports import DispatchError
from tests.conftest import Traffic, random_prompts, wait_until

pytestmark = pytest.mark.slow

PROMPTS = random_prompts(272, [6, 10, 4], seed=12)
MAX_NEW_TOKENS = 12  # what `expected_tokens` (conftest) generates for PROMPTS


def test_scale_a_group_up_and_down_while_requests_flow(model_dirs, ray_cluster, expected_tokens):
    with Engine.from_pretrained(model_dirs["tiny-v3"], backend="ray", devices=2) as engine:
        with Traffic(engine, PROMPTS, MAX_NEW_TOKENS) as traffic:
            traffic.wait_for_results(1)  # requests flow
            assert len(engine.scale(0, 2)) == 2
            pool = engine.backend.pool
            new = max(pool.live(0), key=lambda r: r.index)
            calls_before = new.calls
            wait_until(lambda: new.calls > calls_before or traffic.failures, 60,
                       "the new replica of group 0 to take traffic once it had loaded")
            assert len(engine.scale(0, 1)) == 1
            traffic.wait_for_results(len(traffic.results) + 1)  # and keep flowing after the scale-down
        assert traffic.failures == []
        assert len(traffic.results) >= 3 and all(r == expected_tokens for r in traffic.results)
        assert [len(pool.live(d)) for d in (0, 1)] == [1, 1]
        with pytest.raises(ValueError, match="replicas=0"):
            engine.scale(0, 0)


@pytest.mark.parametrize("backend", ["ray", "grpc"])
def test_a_killed_expert_actor_is_restarted_and_the_request_completes_with_the_same_tokens(
        backend, model_dirs, ray_cluster, expected_tokens):
    with Engine.from_pretrained(model_dirs["tiny-v3"], backend=backend, devices=2) as engine:
        pool = engine.backend.pool
        victim = pool.live(1)[0]
        actor_id = victim.actor._actor_id.hex()

        def kill_on_fifth_token(request, token):
            if len(request.output) == 5 and request.request_id == "r0":
                ray_cluster.kill(victim.actor, no_restart=False)  # Ray restarts it (max_restarts=-1)

        requests = [engine.submit(p, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False, request_id=f"r{i}",
                                  on_token=kill_on_fifth_token) for i, p in enumerate(PROMPTS)]
        while engine.has_work():
            engine.step()
        assert [r.output for r in requests] == expected_tokens and not any(r.error for r in requests)
        # Probes run in the background of the traffic; with none left, polling applies what they found.
        wait_until(lambda: pool.poll() or pool.restarts >= 1, 30, "the pool to see the killed replica restarted")
        assert engine.backend.transport.retries >= 1 and pool.restarts >= 1
        assert pool.live(1)[0].actor._actor_id.hex() == actor_id  # the same actor, restarted
        from gateway.serving.engine_loop import EngineLoop
        from gateway.serving.http_api import prometheus_text

        loop = EngineLoop(engine)
        loop.stop()
        text = prometheus_text(loop)
        assert "expertmesh_replica_restarts_total 1" in text or "expertmesh_replica_restarts_total 2" in text


def test_ray_dag_rebuilds_its_compiled_graph_after_an_actor_dies(model_dirs, ray_cluster, expected_tokens):
    # A killed actor's graph answers no more: the layer's wait ends at rpc.timeout_s (8 s here, 30 by default), then
    # the graph is rebuilt.
    with Engine.from_pretrained(model_dirs["tiny-v3"], backend="ray-dag", devices=2, timeout_s=8) as engine:
        transport = engine.backend.transport
        victim = transport.pool.live(1)[0].actor

        def kill_on_fifth_token(request, token):
            if len(request.output) == 5 and request.request_id == "r0":
                ray_cluster.kill(victim, no_restart=False)  # Ray restarts it; the graph must be compiled again

        requests = [engine.submit(p, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False, request_id=f"r{i}",
                                  on_token=kill_on_fifth_token) for i, p in enumerate(PROMPTS)]
        while engine.has_work():
            engine.step()
        assert [r.output for r in requests] == expected_tokens and not any(r.error for r in requests)
        assert transport.rebuilds >= 1  # (on 2 cores a fresh graph can time out once more and be rebuilt again)
        assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens


class SlowLoading(ExpertGroupActor):
    """A replacement replica that takes 6 s to load (a big checkpoint): the sleep is the scenario (requests must
    fail, not wait, while a group has no replica), not a wait for a condition. The mesh's first replicas (r0, r1)
    load at once."""

    def __init__(self, *args, **kwargs) -> None:
        import ray

        if int(ray.get_runtime_context().get_actor_name().split("-r")[1].split("-")[0]) >= 2:
            time.sleep(6.0)
        super().__init__(*args, **kwargs)


def test_a_group_without_replicas_fails_its_requests_and_serving_resumes_when_it_returns(model_dirs, ray_cluster,
                                                                                          expected_tokens):
    from gateway.config import MeshConfig
    from gateway.dispatch.mesh.attach import mesh_down, start_mesh

    cfg = DeploymentConfig(model=str(model_dirs["tiny-v3"]), backend="ray", devices=2,
                           rpc=RpcConfig(timeout_s=10, replica_deadline_s=1.5), mesh=MeshConfig(name="slow-replacing"))
    start_mesh(cfg, cfg.mesh.name, actor_class=SlowLoading)  # the replacement the mesh starts (Ray killed one) is slow
    with Engine.from_config(cfg) as engine:
        pool = engine.backend.pool
        victim = pool.live(1)[0]

        def kill_for_good(request, token):
            if len(request.output) == 3:
                ray_cluster.kill(victim.actor, no_restart=True)

        doomed = engine.submit(PROMPTS[0], max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False, on_token=kill_for_good)
        while engine.has_work():
            engine.step()
        assert doomed.finish_reason == "error" and "group 1" in doomed.error and "1.5s" in doomed.error

        def replaced() -> bool:  # the pool evicts the dead replica and starts a fresh one
            try:  # fails until the replacement has loaded (it may be ready by the time this call runs)
                engine.generate([PROMPTS[1]], max_new_tokens=2)
            except DispatchError as exc:
                assert "group 1" in str(exc)
            return victim not in pool.groups[1] and bool(pool.live(1))

        wait_until(replaced, 60, "group 1's dead replica to be evicted and a fresh one started", interval_s=0.1)
        assert pool.evicted == 1 and victim not in pool.groups[1]
        assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens
    mesh_down(cfg)
