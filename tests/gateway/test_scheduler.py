"""Continuous batching: requests join and leave the batch at every step; outputs do not depend on the batch."""

from __future__ import annotations

import pytest

from gateway import Engine
from gateway.config import DeploymentConfig
from gateway.serving.scheduler import QueueFull, Request, Scheduler, SchedulerConfig
from tests.conftest import random_prompts


def req(n: int, name: str = "r") -> Request:
    return Request(request_id=name, prompt=list(range(3, 3 + n)), max_new_tokens=4)


def test_schedule_runs_decodes_then_admits_prompts_under_the_token_budget():
    s = Scheduler(SchedulerConfig(max_batch_tokens=10, max_running=3, max_waiting=4))
    for i, n in enumerate([4, 5, 3, 2]):
        s.add(req(n, f"r{i}"))
    decodes, prefills = s.schedule()
    assert decodes == [] and [r.request_id for r in prefills] == ["r0", "r1"]  # 4 + 5 fit, + 3 would not
    decodes, prefills = s.schedule()
    assert len(decodes) == 2 and [r.request_id for r in prefills] == ["r2"]  # 10 - 2 decodes = 8 ≥ 3
    decodes, prefills = s.schedule()
    assert len(decodes) == 3 and prefills == []  # max_running reached
    s.retire([decodes[0]])
    assert [r.request_id for r in s.schedule()[1]] == ["r3"]


def test_a_prompt_larger_than_the_budget_runs_alone_and_a_full_queue_refuses():
    s = Scheduler(SchedulerConfig(max_batch_tokens=4, max_running=8, max_waiting=1))
    s.add(req(9, "big"))
    with pytest.raises(QueueFull, match="queue full: 1 requests waiting"):
        s.add(req(2))
    assert [r.request_id for r in s.schedule()[1]] == ["big"]


@pytest.mark.parametrize("bad", [0, -1.5, True, "10"])
def test_request_timeout_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match=f"scheduler.request_timeout_s={bad!r}: expected a number of seconds > 0"):
        SchedulerConfig(request_timeout_s=bad)
    assert SchedulerConfig().request_timeout_s == 600


def test_requests_joining_a_busy_batch_get_the_tokens_they_get_alone(model_dirs):
    cfg = DeploymentConfig(model=str(model_dirs["tiny-v3"]), devices=2)
    prompts = random_prompts(272, [5, 12, 3, 8, 6], seed=4)
    with Engine.from_config(cfg) as engine:
        alone = [engine.generate([p], max_new_tokens=9, stop_at_eos=False)[0] for p in prompts]
        busy = [engine.submit(p, max_new_tokens=9, stop_at_eos=False) for p in prompts[:2]]
        for p in prompts[2:]:  # the rest join while the first two are decoding
            engine.step()
            engine.step()
            busy.append(engine.submit(p, max_new_tokens=9, stop_at_eos=False))
        sizes = []
        while engine.has_work():
            sizes.append(len(engine.scheduler.running))
            engine.step()
        assert [r.output for r in busy] == alone
        assert max(sizes) >= 3 and all(r.finish_reason == "length" for r in busy)
        assert engine.cache._store == {}  # every sequence's latent cache was freed


def test_streaming_callbacks_and_seeded_sampling(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v2"]) as engine:
        seen, finished = [], []
        r = engine.submit([4, 5, 6], max_new_tokens=5, temperature=1.3, top_p=0.9, seed=11, stop_at_eos=False,
                          on_token=lambda req, tok: seen.append(tok), on_finish=finished.append)
        while engine.has_work():
            engine.step()
        assert seen == r.output and finished == [r] and len(seen) == 5
        again = engine.generate([[4, 5, 6]], max_new_tokens=5, temperature=1.3, top_p=0.9, seed=11, stop_at_eos=False)
        assert again[0] == r.output


def test_cancelled_requests_leave_at_the_next_step_and_free_their_cache(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:
        keep = engine.submit([5, 6, 7], max_new_tokens=6, stop_at_eos=False, request_id="keep")
        drop = engine.submit([8, 9], max_new_tokens=50, stop_at_eos=False, request_id="drop")
        queued = engine.submit([4], max_new_tokens=5, request_id="queued")
        engine.step()
        engine.cancel("drop")
        engine.cancel("queued")
        finished = engine.step()
        assert {r.request_id for r in finished} >= {"drop"} and drop.finish_reason == "cancelled"
        assert queued.finish_reason == "cancelled" and len(drop.output) == 1
        while engine.has_work():
            engine.step()
        assert keep.finish_reason == "length" and len(keep.output) == 6
        assert engine.cache._store == {}
