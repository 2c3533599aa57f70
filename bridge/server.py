"""Runs the bridge with uvicorn: `await serve(settings)` (returns when the server stops), or
`python -m genrpc.bridge.server` (settings from GENRPC_* env vars)."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

from genrpc.bridge.app import create_app


def make_server(settings: Any) -> uvicorn.Server:
    """A uvicorn.Server for the bridge on settings.host:settings.bridge_port (call `.serve()`; set
    `.should_exit = True` to stop it)."""
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.bridge_port,
        log_level=(getattr(settings, "log_level", "") or "info").lower(),
        access_log=False, lifespan="on", timeout_keep_alive=75,
        # on SIGTERM, running SSE streams get this long to finish before they are cut
        timeout_graceful_shutdown=int(getattr(settings, "shutdown_grace_s", 30) or 0) or None,
    )
    return uvicorn.Server(config)


async def serve(settings: Any) -> None:
    """Serves the bridge until stopped (SIGINT/SIGTERM, or the task being cancelled)."""
    server = make_server(settings)
    await server.serve()


def main() -> None:
    from genrpc.settings import Settings

    asyncio.run(serve(Settings()))


if __name__ == "__main__":
    main()
