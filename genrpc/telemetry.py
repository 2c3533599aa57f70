"""OpenTelemetry tracing for the service and the bridge, configured by the standard OTEL_* environment variables.

Off unless OTEL_TRACES_EXPORTER names an exporter (`otlp`, or `console` for debugging); when off nothing of the
SDK is imported and `Tracing.enabled` is False, so callers skip all span work. With `otlp` the OTLP/HTTP
exporter reads OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / _HEADERS itself, the
resource reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (default service name: the process's role), and
the sampler OTEL_TRACES_SAMPLER (default parentbased_always_on: a client's sampled flag is honoured).

Context travels as W3C traceparent/tracestate (HTTP headers at the bridge, gRPC metadata at the service, and a
GenerationRequest's `trace_context` into an engine whose runtime traces itself: SGLang, see `otlp_traces_endpoint`).
Spans carry GenAI semantic-convention attributes and never prompt or completion text.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any


class Tracing:
    """A tracer, or nothing. `start_server_span` / `record_span` are only called when `enabled`."""

    def __init__(self, tracer: Any = None, provider: Any = None):
        self._tracer = tracer
        self._provider = provider
        self.enabled = tracer is not None

    @staticmethod
    def parent_context(carrier: Mapping[str, str]) -> Any:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        return TraceContextTextMapPropagator().extract(carrier)

    @staticmethod
    def inject(span: Any) -> dict[str, str]:
        """traceparent/tracestate naming `span` as the parent (for the next hop's metadata)."""
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    def start_server_span(self, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any],
                          start_ns: int | None = None) -> Any:
        """A SERVER span, child of the traceparent in `carrier` (a new trace without one); the caller ends it."""
        from opentelemetry.trace import SpanKind
        return self._tracer.start_span(name, context=self.parent_context(carrier), kind=SpanKind.SERVER,
                                       attributes=dict(attributes), start_time=start_ns)

    def record_span(self, name: str, parent: Any, start_ns: int, end_ns: int,
                    attributes: Mapping[str, Any] | None = None) -> None:
        """A finished child span of `parent` over [start_ns, end_ns] (phases measured before they are known)."""
        from opentelemetry import trace
        span = self._tracer.start_span(name, context=trace.set_span_in_context(parent), start_time=start_ns,
                                       attributes=dict(attributes or {}))
        span.end(end_time=max(start_ns, end_ns))

    @staticmethod
    def activate(span: Any) -> Any:
        """Makes `span` the current OpenTelemetry span (of this task's context); returns the token to deactivate."""
        from opentelemetry import context, trace
        return context.attach(trace.set_span_in_context(span))

    @staticmethod
    def deactivate(token: Any) -> None:
        from opentelemetry import context
        context.detach(token)

    @staticmethod
    def current_trace_context() -> dict[str, str]:
        """W3C traceparent/tracestate naming the current span (empty without one): what a runtime with tracing of its
        own (SGLang) takes as the parent of its spans."""
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        return carrier

    @staticmethod
    def set_error(span: Any, description: str) -> None:
        from opentelemetry.trace import Status, StatusCode
        span.set_status(Status(StatusCode.ERROR, description))

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # flushes the batch processor


def _exporters(env: Mapping[str, str]) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER names ([] when tracing is off)."""
    exporters = [e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "none").split(",") if e.strip()]
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or exporters == ["none"]:
        return []
    return exporters


def otlp_traces_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP/HTTP traces URL genrpc's exporter sends to when OTEL_TRACES_EXPORTER includes `otlp`, else None.
    Resolved as the exporter does: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as is, else OTEL_EXPORTER_OTLP_ENDPOINT plus
    `/v1/traces`, else http://localhost:4318/v1/traces. For a runtime that exports its own spans (SGLang)."""
    env = os.environ if environ is None else environ
    if "otlp" not in _exporters(env):
        return None
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return f"{base.removesuffix('/')}/v1/traces"


def configure_tracing(default_service_name: str, environ: Mapping[str, str] | None = None) -> Tracing:
    """A Tracing from the OTEL_* variables of `environ` (default: the process environment, read now)."""
    env = os.environ if environ is None else environ
    exporters = _exporters(env)
    if not exporters:
        return Tracing()
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or default_service_name})
    resource = resource.merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
    for name in exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: genrpc supports otlp, console or none")
    return Tracing(provider.get_tracer("genrpc"), provider)


def ns_at(perf_counter_s: float) -> int:
    """Wall-clock nanoseconds of a time.perf_counter() reading (span timestamps are epoch-based)."""
    return time.time_ns() - int((time.perf_counter() - perf_counter_s) * 1e9)


def metadata_carrier(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The traceparent/tracestate entries of gRPC invocation metadata."""
    return {k: v for k, v in (metadata or ()) if k in ("traceparent", "tracestate") and isinstance(v, str)}
