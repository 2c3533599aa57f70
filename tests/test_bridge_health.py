"""The bridge's health endpoints: `/health` (liveness) and `/health/ready` (the service's grpc.health.v1 state,
kept by a background Watch), against a real grpc.aio server whose health the test drives."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from _procs import HOST, free_port
from test_envoy_config import backend, start_bridge  # noqa: F401 - pytest fixture

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def ready_state(http: httpx.AsyncClient, status: str, timeout_s: float = 10.0) -> httpx.Response:
    """Polls /health/ready until it reports `status` (or fails after timeout_s with the last answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = await http.get("/health/ready")
        if resp.json()["status"] == status or time.monotonic() > deadline:
            assert resp.json()["status"] == status, resp.text
            return resp
        await asyncio.sleep(0.05)


class CountingHealth(health.aio.HealthServicer):
    """The real health servicer, counting the Watch calls it serves."""

    watches = 0
    open_watches = 0

    async def Watch(self, request, context):  # noqa: N802 - the gRPC method name
        self.watches += 1
        self.open_watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self.open_watches -= 1


async def start_health_server(port: int = 0) -> tuple[grpc.aio.Server, Any, int]:
    server = grpc.aio.server()
    servicer = CountingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:{port}")
    await servicer.set("", NOT_SERVING)
    await server.start()
    return server, servicer, port


@contextlib.asynccontextmanager
async def bridge_on_a_serving_service():
    """A health server reporting SERVING and a bridge watching it, once the bridge says `ready`: yields the server,
    its servicer and an HTTP client of the bridge; stops both after."""
    server, servicer, port = await start_health_server()
    await servicer.set("", SERVING)
    settings, bridge, task = await start_bridge(port)
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{settings.bridge_port}", timeout=10) as http:
            await ready_state(http, "ready")
            yield server, servicer, http
    finally:
        bridge.should_exit = True
        await task
        await server.stop(0)


async def test_readiness_follows_the_service_health():
    server, servicer, port = await start_health_server()
    settings, bridge, task = await start_bridge(port)
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{settings.bridge_port}", timeout=10) as http:
            resp = await http.get("/health")
            assert (resp.status_code, resp.json()) == (200, {"status": "ok"})

            resp = await ready_state(http, "loading")  # NOT_SERVING, never SERVING yet
            assert resp.status_code == 503 and resp.headers["content-type"] == "application/json"
            assert set(resp.json()) == {"status", "message"} and resp.json()["message"]

            await servicer.set("", SERVING)
            resp = await ready_state(http, "ready")
            assert (resp.status_code, resp.json()) == (200, {"status": "ready"})

            await servicer.enter_graceful_shutdown()  # what the service does when it drains
            resp = await ready_state(http, "draining")
            assert resp.status_code == 503

            await server.stop(0)
            resp = await ready_state(http, "unavailable")
            assert resp.status_code == 503 and str(port) in resp.json()["message"]

            # the service comes back on the same port: a new process starts by loading, then serves
            server, servicer, _ = await start_health_server(port)
            await ready_state(http, "loading")
            await servicer.set("", SERVING)
            await ready_state(http, "ready")
            assert (await http.get("/health")).status_code == 200
    finally:
        bridge.should_exit = True
        await task
        await server.stop(0)


async def test_readiness_without_a_service():
    settings, bridge, task = await start_bridge(free_port())  # nothing listens there
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{settings.bridge_port}", timeout=10) as http:
            assert (await http.get("/health")).json() == {"status": "ok"}
            resp = await http.get("/health/ready")
            assert resp.status_code == 503 and resp.json()["status"] == "unavailable" and resp.json()["message"]
    finally:
        bridge.should_exit = True
        await task


async def test_readiness_of_a_service_without_health(backend):
    """The scripted service has no grpc.health.v1: never ready, and the reason says so."""
    settings, bridge, task = await start_bridge(backend[1])
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{settings.bridge_port}", timeout=10) as http:
            deadline = time.monotonic() + 10
            while "grpc.health.v1" not in (resp := await http.get("/health/ready")).text:
                assert time.monotonic() < deadline, resp.text
                await asyncio.sleep(0.05)
            assert resp.status_code == 503 and resp.json()["status"] == "unavailable"
    finally:
        bridge.should_exit = True
        await task


async def test_watch_renewals_keep_the_state(monkeypatch):
    """The watch is renewed on a deadline (its connection has no keepalive pings): renewals never flap the state
    (`ready` throughout), and a drain after renewals still shows."""
    from genrpc.bridge import health as bridge_health

    monkeypatch.setattr(bridge_health, "WATCH_RENEW_S", 0.2)
    async with bridge_on_a_serving_service() as (server, servicer, http):
        deadline = time.monotonic() + 10
        while servicer.watches < 4:
            assert time.monotonic() < deadline, servicer.watches
            assert (await http.get("/health/ready")).json() == {"status": "ready"}
            await asyncio.sleep(0.05)
        await servicer.enter_graceful_shutdown()
        await ready_state(http, "draining")


async def test_a_draining_service_is_not_held_by_the_watch():
    """A draining grpc.aio server waits for every open call before it exits: the bridge ends its watch when it
    sees the drain, so an idle service stops at once instead of at the watch's next renewal (30 s)."""
    async with bridge_on_a_serving_service() as (server, servicer, http):
        assert servicer.open_watches == 1
        await servicer.enter_graceful_shutdown()
        await ready_state(http, "draining")
        stopping = asyncio.create_task(server.stop(60))  # what the service does: drain, grace 60 s
        done, _ = await asyncio.wait({stopping}, timeout=15)
        assert done, f"the drain still waits for {servicer.open_watches} open watch(es)"
        await ready_state(http, "unavailable")
