"""Failure paths of the engine: a raising callback or a request that cannot be sampled fails only its request, a
failed step is logged with its traceback, no request is left forwarded but never sampled, a request cancelled while
waiting leaves the queue at once, the loop never spins on steps that run nothing, closing never races a step that
is still running, and a metrics scrape never acts on a failed replica (the engine loop does)."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from gateway import Engine
from gateway.dispatch.transports import DispatchError
from gateway.model.sampling import Penalties
from gateway.serving.engine_loop import EngineLoop, LoopStats
from gateway.serving.http_api import prometheus_text
from tests.conftest import random_prompts, wait_until


@pytest.fixture()
def engine(model_dirs):
    e = Engine.from_pretrained(model_dirs["tiny-v3"])
    yield e
    e.close()


def run_all(engine: Engine) -> None:
    for _ in range(200):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("the engine did not drain in 200 steps")


def test_a_raising_on_token_fails_only_its_request_and_the_batch_continues(engine):
    prompts = random_prompts(engine.spec.vocab_size, [5, 9, 4], seed=3)
    alone = [engine.generate([p], max_new_tokens=6, stop_at_eos=False)[0] for p in prompts]

    def explode_on_second_token(request, token):
        if len(request.output) == 2:
            raise RuntimeError("client queue closed")

    finished = []
    requests = [engine.submit(p, max_new_tokens=6, stop_at_eos=False, request_id=f"r{i}",
                              on_token=explode_on_second_token if i == 1 else None, on_finish=finished.append)
                for i, p in enumerate(prompts)]
    run_all(engine)
    bad = requests[1]
    assert bad.finish_reason == "error" and bad.output == alone[1][:2]
    assert "on_token" in bad.error and "RuntimeError: client queue closed" in bad.error
    assert [r.output for i, r in enumerate(requests) if i != 1] == [alone[0], alone[2]]
    assert all(r.finish_reason == "length" for i, r in enumerate(requests) if i != 1)
    assert sorted(r.request_id for r in finished) == ["r0", "r1", "r2"]  # on_finish still reaches the failed one
    assert engine.cache.is_empty() and engine.scheduler.running == [] and engine._traces_of == {}
    assert engine.routing_trace("r1").tokens[-1] == bad.output[0]  # its trace finished with what it ran


def test_a_raising_on_finish_does_not_keep_other_requests_from_retiring(engine, caplog):
    seen = []

    def broken(request):
        raise ValueError("on_finish bug")

    a = engine.submit([4, 5, 6], max_new_tokens=3, stop_at_eos=False, request_id="a", on_finish=broken)
    b = engine.submit([7, 8, 9], max_new_tokens=3, stop_at_eos=False, request_id="b", on_finish=seen.append)
    with caplog.at_level(logging.ERROR, logger="gateway.serving"):
        run_all(engine)
    assert seen == [b] and b.finish_reason == "length" and b.error is None
    assert a.finish_reason == "error" and "on_finish" in a.error and "ValueError: on_finish bug" in a.error
    assert engine.cache.is_empty() and engine.scheduler.running == []
    assert any(r.exc_info and "on_finish" in r.getMessage() for r in caplog.records)


def test_a_failed_step_fails_its_requests_and_is_logged_with_the_traceback(engine, monkeypatch, caplog):
    def down(*args, **kwargs):
        raise DispatchError("group 1 unreachable")

    monkeypatch.setattr(engine.model, "forward", down)
    r = engine.submit([4, 5], max_new_tokens=2, request_id="x")
    with caplog.at_level(logging.WARNING, logger="gateway.serving"):
        assert engine.step() == [r]
    assert r.finish_reason == "error" and "DispatchError: group 1 unreachable" in r.error
    (record,) = [rec for rec in caplog.records if "step failed" in rec.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is DispatchError
    assert engine.cache.is_empty() and not engine.has_work()


def unchecked_penalties(repetition: float) -> Penalties:
    """Penalties past validation (repetition_penalty below 0.01 is refused): 1e-300 is 0 in float32, so a seen
    token's positive logit becomes inf and the distribution NaN."""
    penalties = object.__new__(Penalties)
    for name, value in (("presence", 0.0), ("frequency", 0.0), ("repetition", repetition)):
        object.__setattr__(penalties, name, value)
    return penalties


@pytest.mark.parametrize("poison", ["non-finite distribution", "sampling raises"])
def test_a_request_that_cannot_be_sampled_fails_alone_and_its_batch_keeps_generating(engine, poison, caplog):
    prompts = random_prompts(engine.spec.vocab_size, [5, 9, 4], seed=3)
    alone = [engine.generate([p], max_new_tokens=6, stop_at_eos=False)[0] for p in prompts]
    bad_prompt = random_prompts(engine.spec.vocab_size, [40], seed=5)[0]  # many seen tokens: some logit > 0
    requests = [engine.submit(p, max_new_tokens=6, stop_at_eos=False, request_id=f"r{i}", logprobs=2)
                for i, p in enumerate(prompts)]
    bad = engine.submit(bad_prompt, max_new_tokens=6, stop_at_eos=False, request_id="bad", logprobs=2)
    if poison == "non-finite distribution":
        bad.penalties, bad.temperature = unchecked_penalties(1e-300), 1.0
    else:
        bad.temperature = 1.0  # with a generator not on the logits' device (a stand-in): sample() raises
        bad.generator = SimpleNamespace(device=torch.device("cuda"))
    with caplog.at_level(logging.ERROR, logger="gateway.serving"):
        run_all(engine)
    assert [r.output for r in requests] == alone and all(r.finish_reason == "length" for r in requests)
    assert all(len(r.token_logprobs) == 6 for r in requests)
    assert bad.finish_reason == "error" and bad.output == [] and bad.token_logprobs == []
    if poison == "non-finite distribution":
        assert "sampling: the next-token distribution is not finite" in bad.error
    else:
        assert "sampling raised ValueError: generator.device=cuda" in bad.error
        assert any(r.exc_info and "bad" in r.getMessage() for r in caplog.records)
    assert engine.cache.is_empty() and engine.scheduler.running == [] and engine._traces_of == {}


def test_a_failure_of_sampling_as_a_whole_fails_its_requests_instead_of_stranding_them(engine, monkeypatch):
    prompts = random_prompts(engine.spec.vocab_size, [5, 9], seed=4)
    requests = [engine.submit(p, max_new_tokens=4, stop_at_eos=False) for p in prompts]
    real = engine.runner.sample
    calls = []

    def fails_once(batch, logits):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("a bug in sampling")
        return real(batch, logits)

    monkeypatch.setattr(engine.runner, "sample", fails_once)
    run_all(engine)  # before: forwarded but never sampled, they were never scheduled again (200 empty steps)
    assert all(r.finish_reason == "error" and "RuntimeError: a bug in sampling" in r.error for r in requests)
    assert all(len(r.output) == 1 for r in requests) and engine.cache.is_empty()


def test_a_request_forwarded_but_never_sampled_fails_instead_of_waiting_forever(engine, caplog):
    r = engine.submit([4, 5, 6], max_new_tokens=4, request_id="stranded")
    engine.step()  # prefill and first token
    r.computed += 1  # as if its next token had been forwarded and then lost
    with caplog.at_level(logging.ERROR, logger="gateway.serving"):
        assert engine.step() == [r]
    assert r.finish_reason == "error" and "stopped generating" in r.error
    assert engine.cache.is_empty() and not engine.has_work()
    assert any("stranded" in rec.getMessage() for rec in caplog.records)


def test_a_request_cancelled_while_waiting_leaves_the_queue_at_once(engine):
    finished = []
    queued = [engine.submit([4, 5, 6], max_new_tokens=2, request_id=f"q{i}", on_finish=finished.append)
              for i in range(3)]
    engine.cancel("q1")
    assert [r.request_id for r in engine.scheduler.waiting] == ["q0", "q2"] and engine.metrics().queue_depth == 2
    assert finished == [] and not queued[1].done  # it retires, calling on_finish, at the next step
    engine.step()
    assert finished == [queued[1]] and queued[1].finish_reason == "cancelled" and queued[1].output == []
    run_all(engine)
    assert [r.finish_reason for r in queued] == ["length", "cancelled", "length"] and engine.cache.is_empty()


def test_the_engine_loop_waits_instead_of_spinning_while_nothing_can_run(engine, monkeypatch):
    monkeypatch.setattr(engine.scheduler, "schedule", lambda: [])  # a queued request that can never be admitted
    engine.submit([4, 5, 6], max_new_tokens=2)
    loop = EngineLoop(engine)
    try:
        wait_until(lambda: loop.stats.steps > 0, 10, "a first step")
        time.sleep(0.5)  # the scenario: time passes with work queued that cannot run
        assert loop.stats.steps < 200, f"{loop.stats.steps} steps in 0.5 s: the loop spins"  # spinning: ~100k
    finally:
        assert loop.stop(timeout_s=30)


class SlowStep:
    """An on_token that holds the engine's step until released; records what happened in which order."""

    def __init__(self) -> None:
        self.entered, self.release, self.order = threading.Event(), threading.Event(), []

    def __call__(self, request, token) -> None:
        self.entered.set()
        self.release.wait(timeout=30)
        self.order.append("step done")


def test_engine_close_waits_for_the_running_step(model_dirs, monkeypatch):
    engine = Engine.from_pretrained(model_dirs["tiny-v2"])
    slow = SlowStep()
    real_close = engine.backend.close
    monkeypatch.setattr(engine.backend, "close", lambda: (slow.order.append("backend closed"), real_close()))
    engine.submit([4, 5, 6], max_new_tokens=1, on_token=slow)
    loop = EngineLoop(engine)
    assert slow.entered.wait(timeout=30)
    closer = threading.Thread(target=engine.close)
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive() and slow.order == []  # close is waiting for the step, not tearing down under it
    slow.release.set()
    closer.join(timeout=30)
    assert slow.order == ["step done", "backend closed"]
    assert loop.stop(timeout_s=30)


def test_loop_close_leaves_the_engine_open_while_a_step_is_still_running(model_dirs, monkeypatch, caplog):
    engine = Engine.from_pretrained(model_dirs["tiny-v2"])
    slow = SlowStep()
    closed = []
    real_close = engine.close
    monkeypatch.setattr(engine, "close", lambda: (closed.append(True), real_close()))
    engine.submit([4, 5, 6], max_new_tokens=1, on_token=slow)
    loop = EngineLoop(engine)
    assert slow.entered.wait(timeout=30)
    with caplog.at_level(logging.ERROR, logger="gateway.serving"):
        assert loop.close(timeout_s=0.2) is False
    assert closed == [] and any("still running" in r.getMessage() for r in caplog.records)
    slow.release.set()
    assert loop.close(timeout_s=30) is True and closed == [True]



@pytest.mark.slow
def test_a_metrics_scrape_only_reads_and_the_idle_engine_loop_polls_replicas(model_dirs, ray_cluster, monkeypatch):
    with Engine.from_pretrained(model_dirs["tiny-v2"], backend="ray", devices=2) as engine:
        pool = engine.backend.pool
        replica = pool.live(1)[0]
        pool.failed(replica)  # as after a failed call: marked down, a probe (describe) sent to the actor
        ray_cluster.wait([replica.probe], timeout=60)  # the probe has answered: a poll now would mark it up
        polls = []
        for name in ("poll", "_poll_probes_locked"):
            real = getattr(pool, name)
            monkeypatch.setattr(pool, name, lambda real=real, name=name: (polls.append(name), real())[1])
        state = (replica.down_since, replica.unconfirmed, replica.probe, replica.failures, pool.restarts)
        text = prometheus_text(SimpleNamespace(engine=engine, stats=LoopStats()))  # a scrape, with no loop running
        assert polls == [] and (replica.down_since, replica.unconfirmed, replica.probe, replica.failures,
                                pool.restarts) == state
        assert 'expertmesh_group_replicas{group="1"} 1' in text and "expertmesh_replicas_evicted_total 0" in text
        loop = EngineLoop(engine)  # idle: it polls the pool, which applies the answered probe
        try:
            deadline = time.monotonic() + 30
            while replica.unconfirmed and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "poll" in polls and not replica.unconfirmed and replica.down_since is None
        finally:
            assert loop.stop(timeout_s=30)
