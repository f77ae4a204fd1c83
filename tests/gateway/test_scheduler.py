"""Continuous batching: chunked prefill, preemption; requests join and leave at every step; outputs never depend
on the batch."""

from __future__ import annotations

import pytest
import torch

from gateway import Engine
from gateway.config import DeploymentConfig, SchedulerConfig
from gateway.model.kv_cache import PagedLatentCache
from gateway.serving.scheduler import QueueFull, Request, Scheduler
from tests.conftest import random_prompts


def req(n: int, name: str = "r") -> Request:
    return Request(request_id=name, prompt=list(range(3, 3 + n)), max_new_tokens=4)


def pool(blocks: int = 64, block_size: int = 4) -> PagedLatentCache:
    return PagedLatentCache(1, 2, 2, torch.float32, n_blocks=blocks, block_size=block_size)


def run(s: Scheduler, batch: list[Request], token: int = 7) -> None:
    """What the engine does after a forward: the cache advanced, then a token for each request that sampled."""
    for r in batch:
        s.cache.advance(r.seq_id, r.scheduled)
        ready = r.ready_to_sample
        r.computed += r.scheduled
        if ready:
            r.output.append(token)


def test_schedule_runs_decodes_then_chunks_prompts_under_both_budgets():
    s = Scheduler(SchedulerConfig(max_batch_tokens=10, max_prefill_tokens=8, max_running=3, max_waiting=4), pool())
    for i, n in enumerate([4, 5, 3, 2]):
        s.add(req(n, f"r{i}"))
    batch = s.schedule()  # r0 whole (4), r1 its first 4 tokens: the prefill budget (8) is spent
    assert [(r.request_id, r.scheduled) for r in batch] == [("r0", 4), ("r1", 4)]
    run(s, batch)
    assert [len(r.output) for r in batch] == [1, 0]  # r1's chunk did not reach its last token: nothing sampled
    batch = s.schedule()  # r0 decodes, r1 finishes its prompt, r2 is admitted whole
    assert [(r.request_id, r.scheduled) for r in batch] == [("r0", 1), ("r1", 1), ("r2", 3)]
    run(s, batch)
    batch = s.schedule()
    assert [(r.request_id, r.scheduled) for r in batch] == [("r0", 1), ("r1", 1), ("r2", 1)]  # max_running
    run(s, batch)
    s.retire([batch[0]])
    s.cache.free(batch[0].seq_id)
    assert [r.request_id for r in s.schedule()][-1] == "r3"


def test_a_long_prompt_is_chunked_while_the_running_sequences_decode_every_step():
    s = Scheduler(SchedulerConfig(max_batch_tokens=64, max_prefill_tokens=6), pool())
    short = req(2, "short")
    s.add(short)
    run(s, s.schedule())
    long = req(20, "long")
    s.add(long)
    steps = []
    while not long.output:
        batch = s.schedule()
        steps.append([(r.request_id, r.scheduled) for r in batch])
        run(s, batch)
    assert steps == [[("short", 1), ("long", 6)], [("short", 1), ("long", 6)], [("short", 1), ("long", 6)],
                     [("short", 1), ("long", 2)]]


def test_a_full_cache_preempts_the_newest_sequence_which_is_recomputed_later():
    s = Scheduler(SchedulerConfig(max_batch_tokens=64, max_prefill_tokens=64), pool(blocks=4, block_size=4))
    a, b = req(8, "a"), req(8, "b")  # 2 blocks each: the pool is full once both are in
    s.add(a)
    s.add(b)
    run(s, s.schedule())
    assert s.cache.free_blocks == 0 and a.computed == b.computed == 8
    batch = s.schedule()  # a's 9th position needs a third block: b (the newest) gives its two back
    assert batch == [a] and b.preemptions == 1 and s.waiting[0] is b and b.computed == 0
    assert s.cache.free_blocks == 1 and b.seq_id not in s.cache
    run(s, batch)
    assert b.tokens == b.prompt + [7]  # recomputed later with its generated token


def test_preemption_never_takes_a_sequence_already_in_the_step():
    """An older sequence still prefilling needs room after a newer one was scheduled to decode: the newer one
    keeps its blocks (it is in the step); the older one gives its own back and waits."""
    s = Scheduler(SchedulerConfig(max_batch_tokens=64, max_prefill_tokens=64), pool(blocks=4, block_size=4))
    old, new = req(20, "old"), req(4, "new")
    old.seq_id, new.seq_id = 0, 1
    s.cache.allocate(0, 8)  # 8 of its 20 prompt positions computed: 2 blocks
    s.cache.allocate(1, 5)  # prompt 4 + 1 generated token: 2 blocks; the pool is full
    old.computed, new.computed, new.output = 8, 4, [7]
    s.running = [old, new]
    batch = s.schedule()
    assert batch == [new] and new.scheduled == 1 and new.preemptions == 0 and len(s.cache.table(1)) == 2
    assert old.preemptions == 1 and s.waiting[0] is old and old.seq_id not in s.cache


def test_a_request_the_cache_cannot_hold_yet_waits_and_a_full_queue_refuses():
    s = Scheduler(SchedulerConfig(max_batch_tokens=64, max_waiting=2), pool(blocks=3, block_size=4))
    s.add(req(9, "first"))
    s.add(req(5, "second"))
    with pytest.raises(QueueFull, match="queue full: 2 requests waiting"):
        s.add(req(2))
    assert [r.request_id for r in s.schedule()] == ["first"]  # 3 blocks taken: "second" waits for room
    assert [r.request_id for r in s.waiting] == ["second"]


def test_max_prefill_tokens_is_validated():
    with pytest.raises(ValueError, match=r"scheduler.max_prefill_tokens=0: expected an integer >= 1"):
        SchedulerConfig(max_prefill_tokens=0)


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
        assert engine.cache.is_empty()  # every sequence's latent cache was freed


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
        assert engine.cache.is_empty()
