"""SendWatchdog: a streaming RPC whose client stopped reading is cut after `timeout_s`.

grpc.aio asks a streaming handler for its next message only once the previous one is written, so a client that
stops reading (HTTP/2 flow control; through Envoy, once Envoy's bounded window toward the service is full) leaves
the handler parked at `yield`, holding its engine slot for as long as the client keeps the connection. One scanner
per event loop ends such an RPC once it has been parked longer than `timeout_s`: it sends the status (CANCELLED,
with a message) on the call itself, so the client is told rather than left waiting, and cancels the handler's task,
so the generation stops as when the client cancels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

log = logging.getLogger(__name__)
_TELL_TIMEOUT_S = 300.0


class SendWatchdog:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.cut = 0  # streams cut so far
        # handler task -> (when it yielded a message not yet taken, its ServicerContext)
        self._parked: dict[asyncio.Task, tuple[float, Any]] = {}
        self._scanner: asyncio.Task | None = None
        self._ending: set[asyncio.Task] = set()  # statuses being sent to cut clients

    def park(self, task: asyncio.Task, context: grpc.aio.ServicerContext) -> None:
        """Called before a handler yields a message (cheap: one dict write per message)."""
        self._parked[task] = (time.monotonic(), context)
        if self._scanner is None:
            self._scanner = asyncio.get_running_loop().create_task(self._scan())

    def unpark(self, task: asyncio.Task) -> None:
        self._parked.pop(task, None)

    async def _scan(self) -> None:
        interval = min(1.0, self.timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            deadline = time.monotonic() - self.timeout_s
            for task, (since, context) in list(self._parked.items()):
                if since < deadline:
                    self._parked.pop(task, None)
                    self.cut += 1
                    log.info("a client took no message for %.0f s: stream cut (CANCELLED), generation stopped",
                             self.timeout_s)
                    task.cancel()  # the generation stops and its slot is freed now
                    self._ending.add(asyncio.get_running_loop().create_task(self._tell(context)))

    async def _tell(self, context: grpc.aio.ServicerContext) -> None:
        """Sends the client its status. It goes out behind the messages the client has not taken, so this waits
        until the client reads again or its connection goes (bounded, so that a vanished client leaves nothing)."""
        try:
            async with asyncio.timeout(_TELL_TIMEOUT_S):
                await context.abort(grpc.StatusCode.CANCELLED,  # sends the status, then raises AbortError here
                                    f"the client took no message for {self.timeout_s:g} s (send_timeout_s): "
                                    f"stream cut")
        except Exception:  # noqa: BLE001 - AbortError when sent; TimeoutError or a closed call otherwise
            pass
        finally:
            self._ending.discard(asyncio.current_task())

    async def close(self) -> None:
        tasks = [t for t in (self._scanner, *self._ending) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._scanner = None
