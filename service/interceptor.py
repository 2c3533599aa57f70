"""What every GenerationService RPC gets, done once: error mapping, metrics and logging (a grpc.aio interceptor).

The servicer's methods just return or yield messages and raise ServiceError or typed engine errors; this
interceptor turns any exception into a gRPC status with AIP-193 details (service.errors), counts the RPC by
method and final code (`genrpc_requests_total`), times it, and logs failures that are not the client's.

A stream that ends before its body finished without an error of its own was cancelled (client cancel,
deadline, disconnect): it counts as CANCELLED. grpc.aio then cancels the handler task, so the body sees
CancelledError, or, when the cancel lands while grpc is sending, is closed with GeneratorExit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from genrpc.service.errors import InvalidArgument, ServiceError, abort, to_service_error
from genrpc.service.metrics import ServiceMetrics

log = logging.getLogger("genrpc.service")


class _Undecodable:
    """A request whose bytes are not a valid message. gRPC would answer INTERNAL for a deserializer failure; it is
    the caller's bad input (e.g. Envoy's transcoder turns `"logit_bias": {"x": {}}` into a corrupt map entry)."""

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or anything a corrupt message raises
            return _Undecodable(str(exc) or type(exc).__name__)
    return deserialize


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("body", f"The request could not be decoded ({request.reason}); a field has a value "
                                      "of the wrong type (e.g. an object where a number is expected).",
                              reason="MALFORMED_REQUEST")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary-unary and unary-stream methods of the services whose full names are given."""

    def __init__(self, metrics: ServiceMetrics, service_names: tuple[str, ...]):
        self._metrics = metrics
        self._prefixes = tuple(f"/{name}/" for name in service_names)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        if handler is None or not full_method.startswith(self._prefixes):
            return handler  # health, reflection: theirs to handle
        method = full_method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        raise TypeError(f"{full_method}: client-streaming RPCs are not wrapped by ServiceInterceptor")

    def _unary(self, method: str, behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]):
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._observed(method) as outcome:
                try:
                    _check_decoded(request)
                    return await behaviour(request, context)
                except BaseException as exc:  # noqa: BLE001 - every failure becomes a precise status
                    await self._fail(method, context, exc, outcome)
        return handle

    def _stream(self, method: str, behaviour: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]):
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with self._observed(method) as outcome:
                try:
                    _check_decoded(request)
                    async with contextlib.aclosing(behaviour(request, context)) as replies:
                        async for reply in replies:
                            yield reply
                except BaseException as exc:  # noqa: BLE001 - every failure becomes a precise status
                    await self._fail(method, context, exc, outcome)
        return handle

    @contextlib.contextmanager
    def _observed(self, method: str):
        """Counts and times the RPC. `outcome["code"]` is the final code: OK only if the body completed."""
        started = time.perf_counter()
        outcome: dict[str, grpc.StatusCode | None] = {"code": None}
        try:
            yield outcome
            if outcome["code"] is None:
                outcome["code"] = grpc.StatusCode.OK
        finally:
            code = outcome["code"] or grpc.StatusCode.CANCELLED  # left early without an error: cancelled
            self._metrics.requests.labels(method, code.name).inc()
            self._metrics.request_duration.labels(method).observe(time.perf_counter() - started)

    @staticmethod
    async def _fail(method: str, context: grpc.aio.ServicerContext, exc: BaseException,
                    outcome: dict[str, grpc.StatusCode | None]) -> None:
        """Ends the RPC for `exc` (re-raises cancellation and an abort already under way)."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            outcome["code"] = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, grpc.aio.AbortError):  # the body aborted by itself; the status is already set
            code = context.code()
            outcome["code"] = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            raise exc
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
            raise exc
        error = reported_error(method, exc)
        outcome["code"] = error.code
        await abort(context, error)


def reported_error(method: str, exc: Exception) -> ServiceError:
    """The ServiceError a client sees for `exc`, logged as every RPC failure is (a traceback for INTERNAL). Also
    for a failure a stream reports as a message of its own (the Responses API's `error` event)."""
    error = to_service_error(exc)
    if error.code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    elif not isinstance(exc, ServiceError):
        log.info("%s: %s: %s", method, error.code.name, error.message)
    return error
