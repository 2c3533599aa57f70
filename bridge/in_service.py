"""The bridge's app served inside a service process (`genrpc serve --serve-bridge`, the default of `genrpc up`).

The app is the same one `genrpc bridge` serves (bridge/app.py); only its upstream differs. Instead of a gRPC
channel to the service, `LocalUpstream` calls the service's own servicer methods, each wrapped by the service's
interceptor exactly as grpc.aio wraps them (`ServiceInterceptor.wrap_unary` / `wrap_stream`: admission, error
mapping to a status with AIP-193 details, metrics, access log, spans). A stream's messages therefore cross no
socket, no protobuf serialisation and no second process: per streamed token that saves the gRPC hop's send, the
bridge's receive, and the thread wake-ups between them (README, "Benchmarks").

What a call looks like to the bridge is grpc.aio's: `await stub.Method(request, metadata=, timeout=)` for a
unary RPC, and for a server-streaming one a call to iterate and `cancel()`, both raising `grpc.aio.AioRpcError`
with the status, details and trailing metadata (`grpc-status-details-bin`) the interceptor set. So
bridge/errors.py turns them into the same OpenAI errors as over gRPC.

A streaming call runs the handler's async generator in the task that iterates it (no extra task per token; the
bridge reads each call from one task, bridge.stream.CallReader, so the interceptor's context stays one).
`cancel()` cancels that task while the generator runs, or closes the generator when it is parked between
messages: either way the interceptor sees the stream end early (CANCELLED) and the engine frees its slot, as when
a gRPC client cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from starlette.applications import Starlette

from genrpc.bridge.app import create_app
from genrpc.bridge.health import DRAINING, LOADING, READY
from genrpc.bridge.server import make_server, serve
from genrpc.service.server import SERVICE_NAME, GenrpcServer
from genrpc.settings import Settings
from genrpc.v1 import generation_service_pb2

log = logging.getLogger("genrpc.bridge")

_METHODS = generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"].methods_by_name


class LocalContext:
    """The part of grpc.aio's ServicerContext the interceptor, the servicer (through it) and the send watchdog use."""

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self._metadata = tuple(metadata)
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, Any], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> grpc.StatusCode | None:
        return self._code

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, Any]] = ()) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def rpc_error(self) -> grpc.aio.AioRpcError:
        """The error a gRPC client would get for the status this call was aborted with."""
        return grpc.aio.AioRpcError(self._code or grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(),
                                    grpc.aio.Metadata(*self._trailing), self._details)


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class LocalStreamCall:
    """A server-streaming call of the in-process servicer (see the module docstring)."""

    def __init__(self, handler: Callable[[Any, LocalContext], AsyncIterator[Any]], request: Any,
                 metadata: Sequence[tuple[str, str]], timeout: float | None):
        self._context = LocalContext(metadata)
        self._loop_deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self._replies = handler(request, self._context)
        self._running_in: asyncio.Task | None = None  # the task inside the generator now, if any
        self._done = False
        self._cancelled = False
        self._closing: asyncio.Task | None = None

    def __aiter__(self) -> LocalStreamCall:
        return self

    async def __anext__(self) -> Any:
        if self._cancelled:
            raise _error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        if self._done:
            raise StopAsyncIteration
        self._running_in = asyncio.current_task()
        try:
            if self._loop_deadline is None:
                return await self._replies.__anext__()
            async with asyncio.timeout_at(self._loop_deadline):
                return await self._replies.__anext__()
        except StopAsyncIteration:
            self._done = True
            raise
        except grpc.aio.AbortError:
            self._done = True
            raise self._context.rpc_error() from None
        except TimeoutError:
            self._done = True
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            self._done = True
            raise
        finally:
            self._running_in = None

    def cancel(self) -> bool:
        """Ends the stream as a client's cancel does (False when it had already ended)."""
        if self._done or self._cancelled:
            return False
        self._cancelled = True
        running_in = self._running_in
        if running_in is not None and running_in is not asyncio.current_task():
            running_in.cancel()  # the generator sees CancelledError where it waits
        elif running_in is None:  # parked at a yield (or never started): close it there
            self._closing = asyncio.ensure_future(self._close())
        return True

    async def _close(self) -> None:
        with contextlib.suppress(BaseException):
            await self._replies.aclose()


class _LocalUnary:
    def __init__(self, handler: Callable[[Any, LocalContext], Any]):
        self._handler = handler

    async def __call__(self, request: Any, *, metadata: Sequence[tuple[str, str]] = (),
                       timeout: float | None = None) -> Any:
        context = LocalContext(metadata)
        try:
            async with asyncio.timeout(timeout):
                return await self._handler(request, context)
        except grpc.aio.AbortError:
            raise context.rpc_error() from None
        except TimeoutError:
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None


class _LocalStream:
    def __init__(self, handler: Callable[[Any, LocalContext], AsyncIterator[Any]]):
        self._handler = handler

    def __call__(self, request: Any, *, metadata: Sequence[tuple[str, str]] = (),
                 timeout: float | None = None) -> LocalStreamCall:
        return LocalStreamCall(self._handler, request, metadata, timeout)


class _Draining:
    """A stub method of a service that is shutting down: UNAVAILABLE, as grpc.aio answers once it stops."""

    def __init__(self, streaming: bool):
        self._streaming = streaming

    def __call__(self, request: Any, **_: Any) -> Any:
        error = _error(grpc.StatusCode.UNAVAILABLE, "The service is shutting down; retry on another replica.")
        if self._streaming:
            return _Refused(error)

        async def refuse() -> Any:
            raise error
        return refuse()


class _Refused:
    def __init__(self, error: grpc.aio.AioRpcError):
        self._error = error

    def __aiter__(self) -> _Refused:
        return self

    async def __anext__(self) -> Any:
        raise self._error

    def cancel(self) -> bool:
        return False


class LocalStub:
    """GenerationService's methods, as `GenerationServiceStub` offers them, calling `server`'s servicer."""

    def __init__(self, server: GenrpcServer):
        self._server = server
        self._methods: dict[str, Any] = {}
        for name, method in _METHODS.items():
            behaviour = getattr(server.servicer, name)
            if method.server_streaming:
                self._methods[name] = _LocalStream(server.interceptor.wrap_stream(name, behaviour))
            else:
                self._methods[name] = _LocalUnary(server.interceptor.wrap_unary(name, behaviour))
        self._draining = {name: _Draining(method.server_streaming) for name, method in _METHODS.items()}

    def __getattr__(self, name: str) -> Any:
        methods = self._draining if self._server.state == "draining" else self._methods
        try:
            return methods[name]
        except KeyError:
            raise AttributeError(f"{SERVICE_NAME} has no method {name}") from None


class LocalReadiness:
    """The service's readiness as `/health/ready` reports it (bridge.health's states), read from the server."""

    def __init__(self, server: GenrpcServer):
        self._server = server

    @property
    def status(self) -> str:
        return {"loading": LOADING, "serving": READY, "draining": DRAINING}[self._server.state]

    @property
    def ready(self) -> bool:
        return self.status == READY

    @property
    def message(self) -> str:
        return {LOADING: "the model is loading or warming up", DRAINING: "the service is shutting down",
                READY: ""}[self.status]

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class LocalUpstream:
    """The bridge's upstream (bridge.app.Upstream's interface) inside the service process."""

    def __init__(self, server: GenrpcServer):
        self.stub = LocalStub(server)
        self.readiness = LocalReadiness(server)

    async def close(self) -> None:
        pass


class BridgeInService:
    """The bridge's app on --bridge-port, served by uvicorn in the service's event loop (a service.server.Front),
    and its metrics on --bridge-metrics-port, as `genrpc bridge` serves them (bridge.server.serve). With
    --service-workers every worker binds the port (SO_REUSEPORT: the kernel spreads connections) and worker i
    serves metrics on the port + i."""

    def __init__(self, settings: Settings, server: GenrpcServer):
        self._settings = settings
        self.app: Starlette = create_app(settings, upstream=lambda: LocalUpstream(server))
        self._uvicorn = make_server(settings, self.app, embedded=True)
        self._task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self._uvicorn.servers[0].sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._task = asyncio.create_task(serve(self._settings, self._uvicorn), name="bridge-in-service")
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()  # a failed start raises here
                raise RuntimeError("the bridge stopped while starting")
            await asyncio.sleep(0.01)
        log.info("bridge serving on %s:%d in the service process", self._settings.host, self.port)

    async def stop(self, grace_s: float) -> None:
        if self._task is None:
            return
        self._uvicorn.config.timeout_graceful_shutdown = grace_s
        self._uvicorn.should_exit = True
        await self._task
