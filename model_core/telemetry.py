"""OpenTelemetry in one place: tracer providers per component, exporters, sampling, W3C context carriers."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from model_core.settings import check_settings, setting

logger = logging.getLogger(__name__)

EXPORTERS = ("none", "console", "otlp", "otlp-http", "jsonl")


@dataclass(frozen=True)
class TracingConfig:
    """exporter None means: take OTEL_TRACES_EXPORTER (none | console | otlp), else 'none'.

    otlp sends OTLP/gRPC, otlp-http OTLP/HTTP; endpoint None lets the exporter read
    OTEL_EXPORTER_OTLP_ENDPOINT. jsonl writes one file per process: <jsonl_dir>/<service>-<pid>.jsonl.
    sample_ratio None reads OTEL_TRACES_SAMPLER_ARG (default 1.0); sampling is parent-based, so a trace
    sampled at the gateway is recorded by every expert group it reaches.
    """

    exporter: str | None = setting(None, choices=EXPORTERS)
    endpoint: str | None = None
    jsonl_dir: str = "traces"
    sample_ratio: float | None = setting(None, ge=0, le=1)
    # finished requests whose routing trace the gateway keeps (oldest evicted)
    routing_trace_capacity: int = setting(1024, ge=1)
    # and at most this many MB of them (running requests are never evicted)
    routing_trace_max_mb: float = setting(256.0, gt=0)
    routing_trace_dir: str | None = None  # also write each request's routing trace there (for `expertmesh trace`)
    # every /v1/completions and /v1/chat/completions answer carries each choice's routed experts (a request asks
    # with `return_routed_experts: true` otherwise)
    return_routed_experts: bool = False

    def __post_init__(self) -> None:
        check_settings(self, "tracing")

    @property
    def resolved_exporter(self) -> str:
        name = self.exporter or os.environ.get("OTEL_TRACES_EXPORTER", "none")
        return {"otlp_proto_http": "otlp-http", "otlp_proto_grpc": "otlp"}.get(name, name)

    @property
    def resolved_ratio(self) -> float:
        if self.sample_ratio is not None:
            return self.sample_ratio
        return float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))


class Telemetry:
    """A tracer provider for one component (gateway, expert-group-<d>, router-service) of one process.

    `tracer` is None when tracing is off, and instrumented code does nothing then.
    """

    def __init__(self, config: TracingConfig, service_name: str) -> None:
        self.config, self.service_name = config, service_name
        self.provider = None
        self.tracer = None
        exporter_name = config.resolved_exporter
        if exporter_name == "none":
            return
        if exporter_name not in EXPORTERS:
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: expected one of {list(EXPORTERS)}")
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        resource = Resource.create({"service.name": service_name, "process.pid": os.getpid()})
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.resolved_ratio)))
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(exporter_name, config, service_name)))
        self.tracer = self.provider.get_tracer("expertmesh")

    def shutdown(self) -> None:
        """Flush what is buffered and stop (called on engine close and expert-group actor exit)."""
        if self.provider is not None:
            self.provider.force_flush()
            self.provider.shutdown()
            self.provider = None
            self.tracer = None


def _exporter(name: str, config: TracingConfig, service_name: str):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=service_name)
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint) if config.endpoint else OTLPSpanExporter()
    if name == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=config.endpoint) if config.endpoint else HttpExporter()
    return JsonlSpanExporter(Path(config.jsonl_dir) / f"{service_name}-{os.getpid()}.jsonl")


class JsonlSpanExporter:
    """One JSON object per finished span, one file per process (local use and tests)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown()

    def export(self, spans: Sequence) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        with self._lock:
            for s in spans:
                self._file.write(json.dumps(span_to_dict(s)) + "\n")
            self._file.flush()
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            self._file.flush()
        return True

    def shutdown(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


def span_to_dict(span) -> dict:
    ctx, parent = span.get_span_context(), span.parent
    return {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "pid": span.resource.attributes.get("process.pid"),
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
        "links": [f"{link.context.span_id:016x}" for link in span.links],
        "status": span.status.status_code.name,
    }


def inject_context() -> dict[str, str]:
    """The current span context as a W3C carrier ({'traceparent': ...}); empty when nothing is recording."""
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


def extract_context(carrier: dict[str, str] | None):
    """An OpenTelemetry context from a W3C carrier (None or empty: the root context)."""
    from opentelemetry.propagate import extract

    return extract(carrier or {})


def client_trace_context(headers: Mapping[str, str] | None):
    """The caller's W3C trace context from HTTP request headers (`traceparent`, `tracestate`), for the request's
    span to continue. Only W3C trace context is read (no baggage); a missing or malformed `traceparent` gives the
    root context, so the request starts a new trace (as W3C Trace Context says a receiver must)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {name: headers[name] for name in ("traceparent", "tracestate") if headers and name in headers}
    return TraceContextTextMapPropagator().extract(carrier)


def trace_id_of(span) -> str | None:
    """A span's trace id as 32 hex digits (None without a span or with an invalid context)."""
    if span is None:
        return None
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
