"""OTLP export: with tracing.exporter otlp, the gateway and every expert-group process send their spans to a real
OTLP/gRPC receiver, and they form one connected trace."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from gateway import Engine
from gateway.config import DeploymentConfig
from model_core.telemetry import TracingConfig
from tests.conftest import random_prompts


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector on loopback that keeps every ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - the OTLP service's method name
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[dict]:
        """Every received span with its resource's service.name and process.pid."""
        found = []
        with self._lock:
            for request in self.requests:
                for resource_spans in request.resource_spans:
                    resource = {a.key: a.value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            found.append({
                                "name": span.name, "service": resource["service.name"].string_value,
                                "pid": resource["process.pid"].int_value, "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(), "parent_span_id": span.parent_span_id.hex() or None,
                            })
        return found


@pytest.fixture
def receiver():
    collector = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector, f"http://127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.mark.slow
def test_gateway_and_expert_group_spans_reach_an_otlp_grpc_receiver_as_one_trace(receiver, model_dirs, ray_cluster):
    collector, endpoint = receiver
    cfg = DeploymentConfig(model=str(model_dirs["tiny-v3"]), backend="ray", devices=2,
                           tracing=TracingConfig(exporter="otlp", endpoint=endpoint))
    engine = Engine.from_config(cfg)
    try:
        engine.generate(random_prompts(272, [7], seed=3), max_new_tokens=3, stop_at_eos=False)
    finally:
        engine.close()  # flushes the gateway's exporter and, through each actor's shutdown(), the groups'
    spans = collector.spans()
    by_id = {s["span_id"]: s for s in spans}
    assert {s["service"] for s in spans} == {"gateway", "expert-group-0", "expert-group-1"}
    assert len({s["pid"] for s in spans}) == 3  # three processes exported
    assert len({s["trace_id"] for s in spans}) == 1  # one request, one trace
    assert [s["name"] for s in spans if s["parent_span_id"] is None] == ["generate"]
    servers = [s for s in spans if s["service"] != "gateway"]
    assert servers and all(s["name"] == "expert_group.forward" for s in servers)
    for server in servers:  # each expert-group span's parent is the gateway's dispatch span
        parent = by_id[server["parent_span_id"]]
        assert parent["service"] == "gateway" and parent["name"].startswith("dispatch device")
