"""The SSE bridge: OpenAI and DashScope REST in, `Chat`/`Generate`/`StreamResponse` gRPC streams out, SSE frames back.

Envoy routes `"stream": true` bodies of `POST /v1/chat/completions`, `POST /v1/completions` and
`POST /v1/responses`, and the DashScope prefix, here untouched. The parts:
- bridge/stream.py: the core every protocol shares (call options, first-message wait, the SSE response);
- bridge/openai_api.py, bridge/responses_sse.py and bridge/dashscope.py: a route handler and a renderer per
  protocol;
- bridge/health.py: the service's readiness for `GET /health/ready`; bridge/errors.py: gRPC status -> error body;
- bridge/observability.py: the bridge's metrics (served on --bridge-metrics-port by bridge/server.py) and
  request spans.

The app state holds one shared grpc.aio channel to `settings.grpc_address()`, opened and closed by the lifespan.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from genrpc.bridge import dashscope, openai_api, playground, responses_sse
from genrpc.bridge.encoding import dumps
from genrpc.bridge.errors import http_error
from genrpc.bridge.health import ServiceReadiness
from genrpc.bridge.observability import BridgeMetrics, ObservabilityMiddleware
from genrpc.settings import Settings
from genrpc.telemetry import configure_tracing
from genrpc.v1 import generation_service_pb2_grpc

log = logging.getLogger("genrpc.bridge")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Per-call balancing over every address of the target (several with `dns:///a-headless-service:50051` or
# `ipv4:a:1,b:2`), skipping replicas whose grpc.health.v1 status is NOT_SERVING (loading, draining); with one
# address it behaves as the default pick_first. docs/deployment.md, "Scaling out".
CHANNEL_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                                     "healthCheckConfig": {"serviceName": "genrpc.v1.GenerationService"}})


class Upstream:
    """The service as the bridge reaches it: one channel, its stub, and the service's readiness."""

    def __init__(self, target: str):
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.service_config", CHANNEL_SERVICE_CONFIG),
        ])
        self.stub = generation_service_pb2_grpc.GenerationServiceStub(self.channel)
        # Its own channel: the calls' channel checks health client-side and has no usable connection while
        # the service is NOT_SERVING, which is exactly when /health/ready must still tell loading from draining.
        self._health_channel = grpc.aio.insecure_channel(target)
        self.readiness = ServiceReadiness(self._health_channel, target)

    async def close(self) -> None:
        await self.readiness.stop()
        await self._health_channel.close()
        await self.channel.close()


def _json(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


async def health(request: Request) -> Response:
    """Liveness: the bridge answers."""
    return _json({"status": "ok"})


async def health_ready(request: Request) -> Response:
    """Readiness: 200 while the service reports SERVING, else 503 with the reason."""
    readiness: ServiceReadiness = request.app.state.upstream.readiness
    if readiness.ready:
        return _json({"status": "ready"})
    return _json({"status": readiness.status, "message": readiness.message}, 503)


async def _not_found(request: Request, exc: Exception) -> Response:
    return openai_api.error_response(http_error(404, f"Unknown request URL: {request.method} {request.url.path}."))


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return openai_api.error_response(http_error(405, f"Method {request.method} is not allowed on "
                                                     f"{request.url.path}."))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("bridge failure", exc_info=exc)
    return openai_api.error_response(http_error(500, "The bridge failed to process the request."))


def create_app(settings: Settings, *, upstream: Callable[[], Any] | None = None) -> Starlette:
    """The bridge ASGI app, calling the service at `settings.grpc_address()`, or the upstream `upstream()` makes
    (Upstream's interface: `stub`, `readiness`, `close()`; the service's own in process: bridge/in_service.py)."""
    target = settings.grpc_address()
    metrics = BridgeMetrics((*openai_api.ENDPOINTS, dashscope.TEXT_GENERATION_PATH))
    tracing = configure_tracing("genrpc-bridge")  # OTEL_* variables; off by default
    make_upstream = upstream or (lambda: Upstream(target))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.upstream = make_upstream()  # in the running loop, as grpc.aio needs
        app.state.upstream.readiness.start()
        try:
            yield
        finally:
            await app.state.upstream.close()
            tracing.shutdown()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/health/ready", health_ready, methods=["GET"]),
        *(Route(path, openai_api.endpoint_handler(endpoint), methods=["POST"])
          for path, endpoint in openai_api.ENDPOINTS.items()),
        Route(responses_sse.PATH, openai_api.endpoint_handler(responses_sse.ENDPOINT), methods=["POST"]),
        Route(dashscope.TEXT_GENERATION_PATH, dashscope.text_generation, methods=["POST"]),
        Route(dashscope.PREFIX + "{rest:path}", dashscope.unknown_api,
              methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        *playground.routes(),  # the chat page at /playground and / (bridge/playground.py)
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        404: _not_found, 405: _method_not_allowed, 500: _server_error})
    app.state.metrics = metrics
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, tracing=tracing)
    app.state.send_timeout_s = settings.bridge_send_timeout_s  # read by stream.SSEResponse
    return app
