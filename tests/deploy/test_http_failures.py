"""The HTTP handlers under failure: a stalled engine answers 504 / an SSE error after the request
timeout, a request whose delivery breaks does not hang its batch-mates, and the metrics report memory and
per-replica in-flight calls."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway import Engine
from gateway.config import DeploymentConfig, SchedulerConfig
from gateway.serving.completions import CompletionRequest, completions
from gateway.serving.engine_loop import EngineLoop
from gateway.serving.http_api import GatewayState, prometheus_text


def within(seconds: float, coro):
    """Run a handler, failing (not hanging) the test if it does not answer in time."""
    return asyncio.run(asyncio.wait_for(coro, seconds))


async def read_stream(response) -> list[str]:
    return [chunk async for chunk in response.body_iterator]


def test_a_stalled_engine_answers_504_and_an_sse_error_after_the_request_timeout(model_dirs):
    cfg = DeploymentConfig(model=str(model_dirs["tiny-v2"]), scheduler=SchedulerConfig(request_timeout_s=0.3))
    engine = Engine.from_config(cfg)
    loop = EngineLoop(engine)
    loop.stop()  # nothing steps: the engine looks stalled to the handlers
    state = GatewayState(loop, "tiny-v2")
    try:
        plain = within(10, completions(state, CompletionRequest(prompt=[3, 4], max_tokens=2)))
        assert plain.status_code == 504
        message = json.loads(plain.body)["error"]["message"]
        assert "scheduler.request_timeout_s=0.3" in message and "cancelled" in message

        async def streamed():
            response = await completions(state, CompletionRequest(prompt=[3, 4], max_tokens=2, stream=True))
            return await read_stream(response)

        events = within(10, streamed())
        assert events[-1] == "data: [DONE]\n\n"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "timeout_error" and "scheduler.request_timeout_s=0.3" in error["message"]
        assert loop.stats.requests["timeout"] == 2
        finished = engine.step()  # when the engine resumes, the timed-out requests leave (cancelled)
        assert len(finished) == 2 and not engine.has_work() and engine.cache.is_empty()
        assert loop.stats.requests["cancelled"] == 0  # counted once, as timeouts
    finally:
        engine.close()


def test_a_request_whose_delivery_breaks_does_not_hang_the_requests_batched_with_it(model_dirs):
    engine = Engine.from_pretrained(model_dirs["tiny-v2"])
    expected = engine.generate([[7, 8, 9, 10]], max_new_tokens=6, stop_at_eos=False)[0]
    loop = EngineLoop(engine)
    loop.stop()  # step by hand below, so both requests share every step
    state = GatewayState(loop, "tiny-v2")
    gone = asyncio.new_event_loop()
    gone.close()  # the first client's event loop is gone: delivering its tokens raises RuntimeError
    broken, _ = loop.submit([3, 4, 5], gone, max_new_tokens=6)

    async def served():
        task = asyncio.ensure_future(completions(state, CompletionRequest(prompt=[7, 8, 9, 10], max_tokens=6,
                                                                          temperature=0)))
        await asyncio.sleep(0)  # the handler submits its request
        while engine.has_work():
            await asyncio.to_thread(engine.step)
        return await task

    response = within(30, served())
    assert response["choices"][0]["token_ids"] == expected
    assert broken.finish_reason == "error" and "on_token callback raised RuntimeError" in broken.error
    assert engine.cache.is_empty() and loop.stats.requests == {**loop.stats.requests, "ok": 1, "error": 1}
    engine.close()


@pytest.mark.slow
def test_metrics_report_resident_memory_and_in_flight_calls_per_replica(model_dirs, ray_cluster):
    engine = Engine.from_pretrained(model_dirs["tiny-v2"], backend="ray", devices=2)
    try:
        pool = engine.backend.pool
        held = [pool.pick(0), pool.pick(0)]  # two calls in flight on group 0's replica
        loop = EngineLoop(engine)
        loop.stop()
        text = prometheus_text(loop)
        rss = next(line for line in text.splitlines() if line.startswith("expertmesh_process_resident_memory_bytes "))
        statm_bytes = int(Path("/proc/self/statm").read_text().split()[1]) * 4096
        assert abs(float(rss.split()[1]) - statm_bytes) < 0.5 * statm_bytes and float(rss.split()[1]) > 10 * 2**20
        assert "# TYPE expertmesh_replica_inflight gauge" in text
        r0, r1 = pool.live(0)[0], pool.live(1)[0]
        assert f'expertmesh_replica_inflight{{group="0",replica="{r0.index}"}} 2' in text
        assert f'expertmesh_replica_inflight{{group="1",replica="{r1.index}"}} 0' in text
        assert "expertmesh_replicas_evicted_total 0" in text
        for r in held:
            pool.release(r)
        assert f'expertmesh_replica_inflight{{group="0",replica="{r0.index}"}} 0' in prometheus_text(loop)
    finally:
        engine.close()
