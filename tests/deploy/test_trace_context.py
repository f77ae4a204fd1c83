"""Client trace context: a request's span continues the caller's W3C `traceparent` / `tracestate`, the answer
carries the trace id in `x-trace-id` (only with tracing on), and a malformed `traceparent` starts a new trace."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.responses import Response

from gateway import Engine
from gateway.config import DeploymentConfig
from gateway.serving.completions import CompletionRequest, completions
from gateway.serving.engine_loop import EngineLoop
from gateway.serving.http_api import GatewayState
from model_core.telemetry import TracingConfig

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def served(model_dirs, tmp_path):
    """Handlers over a traced engine (jsonl spans under tmp_path/spans), closed (and flushed) after the test."""
    spans = tmp_path / "spans"
    cfg = DeploymentConfig(model=str(model_dirs["tiny-v2"]), tracing=TracingConfig(exporter="jsonl",
                                                                                   jsonl_dir=str(spans)))
    loop = EngineLoop(Engine.from_config(cfg))
    state = GatewayState(loop, "tiny-v2")
    yield state, spans
    loop.close()


def request_spans(directory: Path) -> list[dict]:
    spans = [json.loads(line) for f in sorted(directory.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return [s for s in spans if s["name"] == "request"]


def complete(state: GatewayState, headers: dict[str, str], stream: bool = False):
    async def run():
        response = Response()
        answer = await completions(state, CompletionRequest(prompt=[3, 4, 5], max_tokens=2, temperature=0,
                                                            stream=stream), headers, response)
        if stream:
            _ = [chunk async for chunk in answer.body_iterator]
            return answer.headers
        return response.headers

    return asyncio.run(asyncio.wait_for(run(), 60))


def test_the_request_span_continues_the_callers_trace_and_its_id_comes_back(served):
    state, spans = served
    headers = complete(state, {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    assert headers["x-trace-id"] == TRACE_ID
    streamed = complete(state, {"traceparent": TRACEPARENT}, stream=True)
    assert streamed["x-trace-id"] == TRACE_ID
    state.engine_loop.close()  # flushes the spans
    found = request_spans(spans)
    assert len(found) == 2
    for span in found:
        assert span["trace_id"] == TRACE_ID and span["parent_span_id"] == PARENT_ID


def test_without_a_traceparent_the_request_starts_a_new_trace(served):
    state, spans = served
    trace_id = complete(state, {})["x-trace-id"]
    state.engine_loop.close()
    (span,) = request_spans(spans)
    assert span["trace_id"] == trace_id and len(trace_id) == 32 and span["parent_span_id"] is None


@pytest.mark.parametrize("traceparent", [
    "garbage",
    f"00-{'0' * 32}-{PARENT_ID}-01",  # an all-zero trace id is invalid
    f"00-{TRACE_ID}-{'0' * 16}-01",  # so is an all-zero parent id
    f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
    f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # hex must be lower case
])
def test_a_malformed_traceparent_is_ignored(served, traceparent):
    state, spans = served
    trace_id = complete(state, {"traceparent": traceparent})["x-trace-id"]
    state.engine_loop.close()
    (span,) = request_spans(spans)
    assert trace_id != TRACE_ID.lower() and span["trace_id"] == trace_id and span["parent_span_id"] is None


def test_with_tracing_off_there_is_no_trace_id_header(model_dirs):
    loop = EngineLoop(Engine.from_config(DeploymentConfig(model=str(model_dirs["tiny-v2"]),
                                                          tracing=TracingConfig(exporter="none"))))
    try:
        headers = complete(GatewayState(loop, "tiny-v2"), {"traceparent": TRACEPARENT})
        assert "x-trace-id" not in headers
    finally:
        loop.close()
