"""Runs the bridge with uvicorn: `await serve(settings)` (returns when the server stops), or
`python -m genrpc.bridge.server` (settings from GENRPC_* env vars)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from prometheus_client import start_http_server
from starlette.applications import Starlette

from genrpc.bridge.app import create_app
from genrpc.settings import Settings


class EmbeddedServer(uvicorn.Server):
    """uvicorn in a process that handles its own signals (the service, which stops the bridge as it drains):
    uvicorn's own handlers would replace the service's and stop only the bridge."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(settings: Settings, app: Starlette | None = None, *, embedded: bool = False) -> uvicorn.Server:
    """A uvicorn.Server for the bridge (`app`, default a bridge calling the service over gRPC) on
    settings.host:settings.bridge_port (call `.serve()`; set `.should_exit = True` to stop it). `embedded`: in a
    process whose signals are someone else's (EmbeddedServer)."""
    config = uvicorn.Config(
        app or create_app(settings), host=settings.host, port=settings.bridge_port,
        log_level=(settings.log_level or "info").lower(),
        access_log=False, lifespan="on", timeout_keep_alive=75,
        http="httptools",  # the C parser (a pinned dependency): h11's pure-Python send path costs more per frame
        # on SIGTERM, running SSE streams get this long to finish before they are cut (0: cut at once)
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return (EmbeddedServer if embedded else uvicorn.Server)(config)


# Unsent bytes the kernel may hold per connection (TCP_NOTSENT_LOWAT, inherited by accepted sockets). The rest
# waits in the connection's own write buffer, whose flow control blocks a stream's send once a client (through
# Envoy: Envoy, for a client that stopped reading) takes nothing: the send timeout (bridge_send_timeout_s) then
# cuts the stream. Without it the kernel's send buffer autotunes to megabytes first.
NOTSENT_LOWAT_BYTES = 16 * 1024


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The bridge's listening socket, with NOTSENT_LOWAT_BYTES. reuse_port: other bridge workers may bind it too
    (SO_REUSEPORT): the kernel spreads connections over the processes, so per-frame work is not bound to one GIL."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
    sock.bind(address)
    return sock


async def serve(settings: Settings, server: uvicorn.Server | None = None) -> None:
    """Serves the bridge (`server`, default `make_server(settings)`) until stopped (SIGINT/SIGTERM, `should_exit`,
    or the task being cancelled), and its Prometheus metrics on --bridge-metrics-port (-1 = off)."""
    server = server or make_server(settings)
    metrics_http = None
    if settings.bridge_metrics_port >= 0:
        metrics_http, _ = start_http_server(settings.bridge_metrics_port, addr=settings.host,
                                            registry=server.config.app.state.metrics.registry)
    try:
        # one of --bridge-workers: the port is shared
        await server.serve(sockets=[listening_socket(settings.host, settings.bridge_port,
                                                     reuse_port=bool(settings.worker_of))])
    finally:
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()


def main() -> None:
    asyncio.run(serve(Settings()))


if __name__ == "__main__":
    main()
