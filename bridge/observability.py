"""The bridge's own metrics and its request spans: one pure-ASGI middleware. bridge/server.py serves the
metrics on a port of their own (--bridge-metrics-port), so a scraper never needs the API port.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so streamed SSE bodies pass through untouched, frame by frame.
Per request it counts the route and final HTTP status, the bytes sent, an SSE response while it is open, and a
client that left before its response ended. With tracing on (OTEL_* variables, genrpc.telemetry) each API
request gets a SERVER span, child of the client's traceparent; `call_options` (bridge.stream) then forwards
this span as the service call's traceparent, so the service's span is the bridge's child.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from genrpc.service.metrics import REQUEST_DURATION_BUCKETS_S
from genrpc.telemetry import Tracing

# Paths whose requests are not traced or counted per route (probes and scrapes would drown the rest).
_QUIET_PATHS = ("/health", "/health/ready")
_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}

# The span of the request being handled (read by call_options to propagate it, and by annotate()).
current_span: contextvars.ContextVar[Any] = contextvars.ContextVar("genrpc_bridge_span", default=None)


class BridgeMetrics:
    def __init__(self, stream_routes: tuple[str, ...] = ()) -> None:
        """`stream_routes`: routes whose per-route series exist from the start (at zero), for dashboards."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("genrpc_bridge_requests", "HTTP requests by route and final status.",
                                ["route", "status"], registry=r)
        self.open_streams = Gauge("genrpc_bridge_open_streams", "SSE responses being streamed now.", registry=r)
        self.client_disconnects = Counter("genrpc_bridge_client_disconnects",
                                          "Requests whose client left before the response ended (the gRPC call "
                                          "is cancelled).", ["route"], registry=r)
        self.bytes_out = Counter("genrpc_bridge_response_bytes", "Response body bytes sent.", ["route"], registry=r)
        self.duration = Histogram("genrpc_bridge_request_duration_seconds", "Whole HTTP request time.", ["route"],
                                  buckets=REQUEST_DURATION_BUCKETS_S, registry=r)
        for route in stream_routes:
            self.client_disconnects.labels(route)
            self.bytes_out.labels(route)


def _route(scope: Scope) -> str:
    """A bounded route label: the matched route's path template, else "other"."""
    route = scope.get("route")
    return getattr(route, "path", None) or "other"


def annotate(**attributes: Any) -> None:
    """Adds attributes to the current request's span (no-op when tracing is off)."""
    span = current_span.get()
    if span is not None:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, metrics: BridgeMetrics, tracing: Tracing):
        self.app, self.metrics, self.tracing = app, metrics, tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        metrics = self.metrics
        started = time.perf_counter()
        state = {"status": 0, "sse": False, "ended": False, "disconnected": False, "bytes": 0}
        span = None
        if self.tracing.enabled and path not in _QUIET_PATHS:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
            attributes = {"http.request.method": scope.get("method", ""), "url.path": path,
                          "genrpc.request_id": headers.get("x-request-id", "")}
            if path in _OPERATIONS:
                attributes["gen_ai.operation.name"] = _OPERATIONS[path]
            span = self.tracing.start_server_span(f"{scope.get('method', '')} {path}", headers, attributes)
        token = current_span.set(span)

        async def observed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not state["ended"]:
                state["disconnected"] = True
            return message

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["sse"] = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                   for k, v in message.get("headers", ()))
                if state["sse"]:
                    metrics.open_streams.inc()
            elif message["type"] == "http.response.body":
                state["bytes"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    state["ended"] = True
            await send(message)

        try:
            await self.app(scope, observed_receive, observed_send)
        finally:
            current_span.reset(token)
            route = _route(scope)
            if state["sse"]:
                metrics.open_streams.dec()
            if state["disconnected"] or (state["status"] and not state["ended"]):
                metrics.client_disconnects.labels(route).inc()
            metrics.requests.labels(route, str(state["status"] or 499)).inc()
            metrics.bytes_out.labels(route).inc(state["bytes"])
            metrics.duration.labels(route).observe(time.perf_counter() - started)
            if span is not None:
                span.set_attribute("http.response.status_code", state["status"] or 499)
                if state["status"] >= 500:
                    self.tracing.set_error(span, str(state["status"]))
                span.end()
