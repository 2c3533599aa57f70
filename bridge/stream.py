"""The stream core every protocol shares: call options from the HTTP request, the wait for a stream's first
message, and one SSE response that forwards the rest of a gRPC stream through a protocol's renderer.

- Call options: the deadline from `x-envoy-expected-rq-timeout-ms` (Envoy sets it when the route has a timeout)
  and the request headers forwarded as gRPC metadata.
- First message: the 200 and its headers are sent only once the first message (or the clean end of the stream)
  arrived, so an early gRPC error is still a plain HTTP error; a client that leaves meanwhile cancels the call.
- `CallReader`: one task reads a call from its first message to its end (an in-process call runs the servicer's
  steps in that task, so their context stays one); `SSEResponse` renders whatever messages are ready and sends
  them in one send (the first at once, never held back on a timer: frames merge only while a send is under way
  or the loop is busy). A client disconnect cancels the gRPC call at once; so does a client that stops reading:
  a send blocked on flow control for longer than `--bridge-send-timeout-s` ends the stream (the engine slot is
  freed instead of being held by a stalled reader).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
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


class CallReader:
    """Reads one call from start to end in one task; its messages wait in `pending` for the response to take.

    One task for the whole call, as grpc.aio's own handler task: an in-process call (bridge/in_service.py) runs
    the servicer's steps in the task that iterates it, so its context variables (the interceptor's request record,
    the RPC's span) must stay in one context from the first message to the end."""

    def __init__(self, call: Any):
        self.call = call
        self.pending: list[Message] = []
        self.ended = False  # the call ended cleanly: everything it sent is in `pending` or was taken
        self.error: grpc.aio.AioRpcError | None = None  # the call failed
        self.failure: BaseException | None = None  # reading failed (a bug; surfaced by the response)
        self._wake: asyncio.Future[None] | None = None
        self._taken: asyncio.Future[None] | None = None
        self.task = asyncio.create_task(self._read())
        self.task.add_done_callback(lambda _: self.poke())

    @property
    def done(self) -> bool:
        """Nothing more will arrive (ended, failed, or the reading task was cancelled)."""
        return self.task.done()

    def poke(self) -> None:
        """Wakes whoever waits in `changed()`."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def changed(self) -> None:
        """Returns once there is a message to take, the call is done, or `poke()` was called."""
        if self.pending or self.done:
            return
        self._wake = asyncio.get_running_loop().create_future()
        await self._wake

    def take(self) -> list[Message]:
        """The messages waiting, taken by the response (which lets the reading go on, see _read)."""
        messages, self.pending = self.pending, []
        if self._taken is not None and not self._taken.done():
            self._taken.set_result(None)
        return messages

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.pending.append(message)
                self.poke()
                if len(self.pending) > 1:
                    # The response is behind (its client or the loop is slow): stop reading until it takes these,
                    # as grpc.aio's handler waits for each write, so the service merges the tokens that come
                    # meanwhile into its next message (adaptive coalescing) instead of sending one per token.
                    self._taken = asyncio.get_running_loop().create_future()
                    await self._taken
            self.ended = True
        except grpc.aio.AioRpcError as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - surfaced by the writer (uvicorn logs it and closes the connection)
            self.failure = e

    def cancel(self) -> None:
        """Cancels the call (a no-op once it finished) and stops reading."""
        self.call.cancel()
        self.task.cancel()


async def first_message(call: Any, receive: Receive) -> tuple[CallReader, Any]:
    """(the call's reader, its first message, or None for an empty stream, or DISCONNECTED). Waits before any
    response header is sent, so an early gRPC error is raised here as AioRpcError. A client that gives up
    meanwhile (queued behind other requests, long prompt) cancels the call."""
    reader = CallReader(call)
    disconnect_task = asyncio.ensure_future(_wait_disconnect(receive))
    first_task = asyncio.ensure_future(reader.changed())
    try:
        await asyncio.wait({first_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (first_task, disconnect_task):
            task.cancel()
        with contextlib.suppress(BaseException):
            await disconnect_task
    if reader.pending:
        return reader, reader.pending.pop(0)
    if not reader.done:  # the client left first
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader.task
        return reader, DISCONNECTED
    if reader.error is not None:
        raise reader.error
    if reader.failure is not None:
        raise reader.failure
    return reader, None


class SSEResponse:
    """ASGI response streaming the rest of a call (read by `reader`) through `renderer`."""

    def __init__(self, reader: CallReader, first: Message | None, renderer: Renderer):
        self.reader, self.first, self.renderer = reader, first, renderer
        self._disconnected = False

    async def _watch_disconnect(self, receive: Receive) -> None:
        await _wait_disconnect(receive)
        self._disconnected = True
        self.reader.cancel()
        self.reader.poke()

    def _frames(self) -> tuple[bytes, bool]:
        """The frames ready to send, and whether they end the stream."""
        reader, renderer = self.reader, self.renderer
        frames = []
        if self.first is not None:
            frames.append(renderer.feed(self.first))
            self.first = None
        if reader.pending:
            frames.extend(renderer.feed(message) for message in reader.take())
        last = False
        if reader.done and not reader.pending:
            if reader.failure is not None:
                raise reader.failure
            if reader.error is not None:
                log.info("stream failed after start: %s %s", reader.error.code(), reader.error.details())
                frames.append(renderer.error(reader.error))
                last = True
            elif reader.ended:
                frames.append(renderer.finish())
                last = True
        return b"".join(frames), last  # one frame: that frame itself, no copy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        send_timeout_s = getattr(getattr(app, "state", None), "send_timeout_s", DEFAULT_SEND_TIMEOUT_S)
        reader = self.reader
        watcher = asyncio.create_task(self._watch_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.renderer.headers})
            while True:
                body, last = self._frames()
                if self._disconnected:
                    return
                if body or last:
                    try:
                        async with asyncio.timeout(send_timeout_s):  # blocks only while the client is not reading
                            await send({"type": "http.response.body", "body": body, "more_body": not last})
                    except TimeoutError:
                        log.info("client stopped reading for %.0f s: stream cut, call cancelled", send_timeout_s)
                        self._disconnected = True
                        return
                    if last:
                        return
                elif reader.done:  # cancelled from outside without an end of its own
                    return
                await reader.changed()
        except OSError:  # the client went away while we were writing
            self._disconnected = True
        finally:
            reader.cancel()  # no-op for the call when it already finished
            watcher.cancel()
            for task in (reader.task, watcher):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
