"""Builds and runs the gRPC server: GenerationService, grpc.health.v1, reflection, Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Literal, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from genrpc.settings import Settings
from genrpc.telemetry import configure_tracing
from genrpc.v1 import generation_service_pb2, generation_service_pb2_grpc
from genrpc.service.engines.base import Engine, ExportsMetrics
from genrpc.service.engines.factory import build_engine
from genrpc.service.client_limits import TokensPerMinute
from genrpc.service.interceptor import ServiceInterceptor
from genrpc.service.metrics import ServiceMetrics
from genrpc.service.response_store import ResponseStore
from genrpc.service.send_watchdog import SendWatchdog
from genrpc.service.servicer import GenerationServicer

log = logging.getLogger("genrpc.service")
SERVICE_NAME = generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # long prompts
_MIN_PING_INTERVAL_MS = 20_000  # below Envoy's 30 s keepalive interval
_MAX_CONNECTION_AGE_MS = 5 * 60 * 1000


def client_tpm(settings: Settings) -> dict[str, int]:
    """{client id: tokens per minute} from the API keys file's `tpm=N` fields (none without a keys file)."""
    if not settings.api_keys_file:
        return {}
    from genrpc.envoy.config import read_keys_file

    return {client: limits.tpm for client, limits in read_keys_file(settings.api_keys_file).limits.items()
            if limits.tpm}


class Front(Protocol):
    """Something served beside the gRPC server, in its process and event loop (the SSE bridge's app:
    genrpc.bridge.in_service). Started before the model loads; stopped while the gRPC server drains."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None:
        """Stops taking new work at once; running work gets `grace_s` to finish."""


class GenrpcServer:
    """The gRPC server plus what lives beside it. Health is NOT_SERVING until the engine is warmed up."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.metrics = ServiceMetrics(engine, model_name=settings.model_id)
        self.tracing = configure_tracing("genrpc-service")  # OTEL_* variables; off by default
        if isinstance(engine, ExportsMetrics) and settings.metrics_port >= 0:
            for collector in engine.prometheus_collectors():  # the runtime's own metrics beside genrpc's
                self.metrics.registry.register(collector)
        tokens_per_minute = TokensPerMinute(client_tpm(settings))
        self.response_store = ResponseStore(settings.cache_dir / "responses.sqlite3", settings.responses_retention_s)
        self.servicer = GenerationServicer(engine, self.metrics, default_max_tokens=settings.default_max_tokens,
                                           limits=settings.limits(),
                                           capacity=settings.max_batch_size + settings.max_queue,
                                           stream_interval=settings.stream_interval,
                                           response_store=self.response_store, tokens_per_minute=tokens_per_minute,
                                           tracing=self.tracing)
        self.health = health.aio.HealthServicer()
        self.send_watchdog = SendWatchdog(settings.send_timeout_s)
        self.interceptor = ServiceInterceptor(self.metrics, (SERVICE_NAME,), self.tracing, tokens_per_minute,
                                              send_watchdog=self.send_watchdog)
        self.grpc_server = grpc.aio.server(
            interceptors=[self.interceptor],
            options=[("grpc.max_receive_message_length", settings.max_request_bytes),
                     ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                     # Envoy pings every 30 s (connection_keepalive). gRPC's default allows one ping per 5 min
                     # while the server sends nothing, so a unary call generating for over ~90 s, or an idle
                     # connection, got GOAWAY "too_many_pings" (a 503 to REST clients).
                     ("grpc.http2.min_ping_interval_without_data_ms", _MIN_PING_INTERVAL_MS),
                     ("grpc.keepalive_permit_without_calls", 1),
                     # clients reconnect every few minutes (running streams finish first), so a gRPC client
                     # balancing over a DNS name (the bridge: dns:///genrpc-service-pods) re-resolves it and finds
                     # replicas added since
                     ("grpc.max_connection_age_ms", _MAX_CONNECTION_AGE_MS),
                     # only --service-workers share a port; a second service started by mistake must fail to bind
                     ("grpc.so_reuseport", 1 if settings.worker_of else 0)])
        generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.grpc_server)
        self.port = self.grpc_server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
        self.metrics_port: int | None = None
        self._metrics_http = None
        self.fronts: list[Front] = []
        self.state: Literal["loading", "serving", "draining"] = "loading"

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Starts serving (health NOT_SERVING), loads and warms up the engine, then reports SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.start()
        if self.settings.metrics_port >= 0:
            self._metrics_http, _ = start_http_server(self.settings.metrics_port, addr=self.settings.host,
                                                      registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        for front in self.fronts:
            await front.start()
        log.info("gRPC listening on %s:%d (metrics on :%s); loading the model", self.settings.host, self.port,
                 self.metrics_port)
        await self.engine.start()
        self.metrics.bind_model(self.engine.model_info.model_id)
        self.servicer.mark_ready()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.state = "serving"
        log.info("model %s ready: SERVING", self.engine.model_info.model_id)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: NOT_SERVING for good (load balancers stop sending), running streams get `grace_s` to end."""
        self.state = "draining"
        await self.health.enter_graceful_shutdown()
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await asyncio.gather(self.grpc_server.stop(grace_s), *(front.stop(grace_s) for front in self.fronts))
        await self.send_watchdog.close()
        await self.engine.shutdown()
        self.response_store.close()
        self.tracing.shutdown()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


def create_server(settings: Settings, engine: Engine | None = None) -> tuple[GenrpcServer, int]:
    """Builds the server and binds its port (port 0 picks a free one); call `start()` to serve."""
    server = GenrpcServer(settings, engine or build_engine(settings))
    return server, server.port


async def serve(settings: Settings, fronts: Callable[[GenrpcServer], list[Front]] = lambda server: []) -> None:
    """Runs until SIGINT/SIGTERM, then drains gracefully. `fronts(server)`: what to serve beside it."""
    server, _ = create_server(settings)
    server.fronts.extend(fronts(server))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done:
        starting.result()  # a failed start raises here
        await stopping
    else:
        starting.cancel()
    log.info("draining (up to %.0f s)", settings.shutdown_grace_s)
    await server.stop()


async def host_sglang_engine(settings: Settings) -> None:
    """`genrpc serve` as the SGLang engine host of `--service-workers N` (see SGLangEngine.host): builds the engine
    with N tokenizer workers, then waits for SIGINT/SIGTERM and shuts it down. The N serving workers attach to it."""
    from genrpc.service.engines.factory import sglang_config
    from genrpc.service.engines.sglang_engine import SGLangEngine

    engine = SGLangEngine(sglang_config(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    engine.host()  # on the loop's thread, as SGLang needs (see sglang_engine's module docstring)
    log.info("SGLang engine hosted for %d service workers", settings.service_workers)
    await stop.wait()
    await engine.shutdown()
