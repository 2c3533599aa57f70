"""Runs the bridge with uvicorn: `await serve(settings)` (returns when the server stops), or
`python -m genrpc.bridge.server` (settings from GENRPC_* env vars)."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from genrpc.bridge.app import create_app
from genrpc.settings import Settings


def make_server(settings: Settings) -> uvicorn.Server:
    """A uvicorn.Server for the bridge on settings.host:settings.bridge_port (call `.serve()`; set
    `.should_exit = True` to stop it)."""
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.bridge_port,
        log_level=(settings.log_level or "info").lower(),
        access_log=False, lifespan="on", timeout_keep_alive=75,
        http="httptools",  # the C parser (a pinned dependency): h11's pure-Python send path costs more per frame
        # on SIGTERM, running SSE streams get this long to finish before they are cut (0: cut at once)
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return uvicorn.Server(config)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other bridge workers may bind too (SO_REUSEPORT): the kernel spreads
    connections over the processes, so per-frame work is not bound to one GIL."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


async def serve(settings: Settings) -> None:
    """Serves the bridge until stopped (SIGINT/SIGTERM, or the task being cancelled)."""
    server = make_server(settings)
    if settings.worker_of:  # one of --bridge-workers: the port is shared
        await server.serve(sockets=[reuse_port_socket(settings.host, settings.bridge_port)])
    else:
        await server.serve()


def main() -> None:
    asyncio.run(serve(Settings()))


if __name__ == "__main__":
    main()
