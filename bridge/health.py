"""The service's readiness as the bridge sees it, for `GET /health/ready`.

A background `grpc.health.v1.Health/Watch` on the service (overall health, service name "") keeps the state, so
answering a probe costs nothing and generation requests never wait on it:

- SERVING -> `ready`;
- NOT_SERVING before SERVING was seen on this connection -> `loading` (the model is loading or warming up); after
  it -> `draining` (the service is shutting down). The bridge then ends its watch, which would otherwise hold the
  draining server open until the watch's renewal, and looks again without waiting for a connection;
- the service unreachable, or without the health service -> `unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("genrpc.bridge.health")

READY, LOADING, DRAINING, UNAVAILABLE = "ready", "loading", "draining", "unavailable"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Between two watches after a failure (the channel's own reconnect backoff covers a service that is down).
_RETRY_MIN_S, _RETRY_MAX_S = 0.2, 2.0
# A watch is renewed this often (see _watch_forever).
WATCH_RENEW_S = 30.0


class ServiceReadiness:
    """The latest health of the service behind `channel` (start() in the running loop, stop() on shutdown)."""

    def __init__(self, channel: grpc.aio.Channel, target: str):
        self._stub = health_pb2_grpc.HealthStub(channel)
        self.target = target
        self.status = UNAVAILABLE
        self.message = f"no health report from the generation service at {target} yet"
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.status == READY

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch_forever(), name="service-health-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _set(self, status: str, message: str) -> None:
        if (status, message) != (self.status, self.message):
            log.info("service %s: %s (%s)", self.target, status, message)
        self.status, self.message = status, message

    async def _watch_forever(self) -> None:
        retry_s = _RETRY_MIN_S
        seen_serving = False
        draining = False
        while True:
            replies = 0
            try:
                # wait_for_ready: while the service is down the call waits for it instead of failing at once
                # (not while it drains: a service that stopped listening is gone, not loading).
                # The deadline renews the watch: a quiet watch sees nothing of a service that vanished without
                # closing the connection (gRPC clients stop pinging after two pings without data); a renewal
                # that gets no reply before its deadline (the first reply comes at once) shows it.
                call = self._stub.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=not draining,
                                        timeout=WATCH_RENEW_S)
                async for reply in call:
                    replies += 1
                    retry_s = _RETRY_MIN_S
                    draining = False
                    if reply.status == _SERVING:
                        seen_serving = True
                        self._set(READY, "the generation service is serving")
                    elif reply.status == _NOT_SERVING and seen_serving:
                        self._set(DRAINING, "the generation service is shutting down")
                        # End the watch: a draining server waits for every open call, this one included, before
                        # it exits. The state is checked again (a new watch) after the retry delay.
                        draining = True
                        call.cancel()
                        break
                    elif reply.status == _NOT_SERVING:
                        self._set(LOADING, "the generation service is loading the model")
                    else:
                        self._set(UNAVAILABLE, "the generation service reports no overall health "
                                               f"({health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)})")
                else:
                    self._set(UNAVAILABLE, "the generation service ended the health watch")
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and replies:
                    continue  # a renewal: same connection, same service process; no state change
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._set(UNAVAILABLE, f"the service at {self.target} has no grpc.health.v1 service")
                else:
                    self._set(UNAVAILABLE, f"the generation service at {self.target} is unreachable: "
                                           f"{e.code().name} {e.details() or ''}".rstrip())
                draining = False
            if not draining:
                seen_serving = False  # the next watch may reach a new service process, which starts by loading
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, _RETRY_MAX_S)
