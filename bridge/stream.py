"""The stream core every protocol shares: call options from the HTTP request, the wait for a stream's first
message, and one SSE response that forwards the rest of a gRPC stream through a protocol's renderer.

- Call options: the deadline from `x-envoy-expected-rq-timeout-ms` (Envoy sets it when the route has a timeout)
  and the request headers forwarded as gRPC metadata.
- First message: the 200 and its headers are sent only once the first message (or the clean end of the stream)
  arrived, so an early gRPC error is still a plain HTTP error; a client that leaves meanwhile cancels the call.
- `SSEResponse`: a reader task renders each message as it arrives; the writer sends whatever frames are ready
  in one send (the first at once, never held back on a timer: frames merge only while a send is under way or
  the loop is busy). A client disconnect cancels the gRPC call at once; so does a client that stops reading:
  a send blocked on flow control for longer than `--bridge-send-timeout-s` ends the stream (the engine slot is
  freed instead of being held by a stalled reader).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message
from starlette.types import Receive, Scope, Send

from genrpc.bridge.observability import current_span
from genrpc.telemetry import Tracing

log = logging.getLogger("genrpc.bridge")

# Request headers forwarded to the service as gRPC metadata (lower case).
FORWARDED_HEADERS = ("x-request-id", "x-client-id", "x-genrpc-affinity", "traceparent", "tracestate",
                     "openai-organization", "openai-project")
# The request's deadline in milliseconds (Envoy sets it when the route has a timeout).
DEADLINE_HEADER_MS = "x-envoy-expected-rq-timeout-ms"


class Renderer(Protocol):
    """Turns one gRPC stream into a protocol's SSE bytes."""

    headers: list[tuple[bytes, bytes]]  # response headers of the 200

    def feed(self, message: Message) -> bytes:
        """The frames for one stream message (b"" when it prints nothing)."""

    def finish(self) -> bytes:
        """The frames after the last message of a complete stream."""

    def error(self, error: grpc.aio.AioRpcError) -> bytes:
        """The error event for a stream that failed after it started (the stream then ends)."""


def call_options(headers: Mapping[str, str]) -> tuple[list[tuple[str, str]], float | None]:
    """(gRPC metadata, timeout in seconds or None) for a call made on behalf of a request with `headers`.
    With tracing on, traceparent/tracestate name the bridge's span (the service's span becomes its child)."""
    # a value gRPC refuses as metadata (not printable ASCII) would fail the call: such a header is not forwarded
    metadata = [(name, headers[name]) for name in FORWARDED_HEADERS
                if name in headers and headers[name].isascii() and headers[name].isprintable()]
    span = current_span.get()
    if span is not None:
        propagated = Tracing.inject(span)
        metadata = [(k, v) for k, v in metadata if k not in propagated] + list(propagated.items())
    timeout = None
    raw = headers.get(DEADLINE_HEADER_MS)
    if raw:
        with contextlib.suppress(ValueError):
            ms = float(raw)
            if ms > 0:
                timeout = ms / 1000.0
    return metadata, timeout


DEFAULT_SEND_TIMEOUT_S = 30.0  # Settings.bridge_send_timeout_s, when the app does not set one

DISCONNECTED = object()  # first_message: the client left before the first message


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def first_message(call: Any, receive: Receive) -> tuple[AsyncIterator[Message], Any]:
    """(iterator over the rest, first message or None for an empty stream, or DISCONNECTED). Waits before any
    response header is sent, so an early gRPC error is raised here as AioRpcError. A client that gives up
    meanwhile (queued behind other requests, long prompt) cancels the call."""
    iterator = call.__aiter__()
    first_task = asyncio.ensure_future(iterator.__anext__())
    disconnect_task = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({first_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
        if not first_task.done():
            call.cancel()
            first_task.cancel()
        with contextlib.suppress(BaseException):
            await disconnect_task
    if first_task.cancelled() or not first_task.done():
        return iterator, DISCONNECTED
    try:
        return iterator, first_task.result()
    except StopAsyncIteration:
        return iterator, None


class SSEResponse:
    """ASGI response streaming the rest of a gRPC call through `renderer`."""

    def __init__(self, call: Any, iterator: AsyncIterator[Message], first: Message | None, renderer: Renderer):
        self.call, self.iterator, self.first, self.renderer = call, iterator, first, renderer
        self._frames: list[bytes] = []
        self._ended = False  # the last frame is in _frames
        self._disconnected = False
        self._failure: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _push(self, data: bytes, *, last: bool = False) -> None:
        if data:
            self._frames.append(data)
        if last:
            self._ended = True
        if data or last:
            self._notify()

    async def _read(self) -> None:
        renderer = self.renderer
        try:
            if self.first is not None:
                self._push(renderer.feed(self.first))
                async for message in self.iterator:
                    self._push(renderer.feed(message))
            self._push(renderer.finish(), last=True)
        except grpc.aio.AioRpcError as e:
            if not self._disconnected:
                log.info("stream failed after start: %s %s", e.code(), e.details())
                self._push(renderer.error(e), last=True)
        except asyncio.CancelledError:
            if not self._disconnected:
                raise
        except Exception as e:  # noqa: BLE001 - surfaced by the writer (uvicorn logs it and closes the connection)
            self._failure = e
            self._notify()

    async def _watch_disconnect(self, receive: Receive) -> None:
        await _wait_disconnect(receive)
        self._disconnected = True
        self.call.cancel()
        self._notify()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        app = scope.get("app")
        send_timeout_s = getattr(getattr(app, "state", None), "send_timeout_s", DEFAULT_SEND_TIMEOUT_S)
        watcher = asyncio.create_task(self._watch_disconnect(receive))
        reader = asyncio.create_task(self._read())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.renderer.headers})
            while True:
                while not self._frames and not self._ended and not self._disconnected and self._failure is None:
                    self._wake = loop.create_future()
                    await self._wake
                if self._disconnected:
                    return
                if self._failure is not None:
                    raise self._failure
                frames, self._frames = self._frames, []
                last = self._ended
                body = frames[0] if len(frames) == 1 else b"".join(frames)
                try:
                    async with asyncio.timeout(send_timeout_s):  # blocks only while the client is not reading
                        await send({"type": "http.response.body", "body": body, "more_body": not last})
                except TimeoutError:
                    log.info("client stopped reading for %.0f s: stream cut, call cancelled", send_timeout_s)
                    self._disconnected = True
                    return
                if last:
                    return
        except OSError:  # the client went away while we were writing
            self._disconnected = True
        finally:
            self.call.cancel()  # no-op when the call already finished
            for task in (reader, watcher):
                task.cancel()
            for task in (reader, watcher):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
