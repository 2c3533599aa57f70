"""What every GenerationService RPC gets, done once: error mapping, metrics, logs and traces (a grpc.aio
interceptor).

The servicer's methods just return or yield messages and raise ServiceError or typed engine errors; this
interceptor turns any exception into a gRPC status with AIP-193 details (service.errors), opens the RPC's
RequestRecord (service.metrics; the servicer fills in tokens and timings), and when the RPC ends: observes the
metrics (`genrpc_requests_total` by method and final code, tokens, latencies, per client), writes one JSON
access-log line (logger `genrpc.access`), and, when tracing is on, records the RPC's span with its queue,
prefill and stream phases as children, in the caller's trace (traceparent metadata). The RPC's span is opened
when the RPC starts and is the current OpenTelemetry span while it runs (the servicer hands it to the engine). Failures that are not
the client's are logged too.

A stream that ends before its body finished without an error of its own was cancelled (client cancel,
deadline, disconnect): it counts as CANCELLED. grpc.aio then cancels the handler task, so the body sees
CancelledError, or, when the cancel lands while grpc is sending, is closed with GeneratorExit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from genrpc.service.client_limits import CLIENT_ID_METADATA, TokensPerMinute, current_client
from genrpc.service.errors import InvalidArgument, ServiceError, abort, to_service_error
from genrpc.service.metrics import RequestRecord, ServiceMetrics, current_request
from genrpc.service.send_watchdog import SendWatchdog
from genrpc.telemetry import Tracing, metadata_carrier, ns_at

log = logging.getLogger("genrpc.service")
access_log = logging.getLogger("genrpc.access")

# GenAI semconv operation names of the generating RPCs (the others are plain RPC spans).
_OPERATIONS = {"Chat": "chat", "CreateChatCompletion": "chat", "Generate": "text_completion",
               "CreateCompletion": "text_completion"}


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

    def __init__(self, metrics: ServiceMetrics, service_names: tuple[str, ...], tracing: Tracing | None = None,
                 tokens_per_minute: TokensPerMinute | None = None, *, send_watchdog: SendWatchdog):
        self._metrics = metrics
        self._send_watchdog = send_watchdog
        self._tracing = tracing or Tracing()
        self._tokens_per_minute = tokens_per_minute
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
                self.wrap_unary(method, handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self.wrap_stream(method, handler.unary_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        raise TypeError(f"{full_method}: client-streaming RPCs are not wrapped by ServiceInterceptor")

    def wrap_unary(self, method: str, behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]):
        """`behaviour` (a unary servicer method) with everything above; also for in-process callers
        (genrpc.bridge.in_service), whose context stands in for grpc.aio's."""
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._observed(method, context) as outcome:
                try:
                    self._admit(context)
                    _check_decoded(request)
                    return await behaviour(request, context)
                except BaseException as exc:  # noqa: BLE001 - every failure becomes a precise status
                    await self._fail(method, context, exc, outcome)
        return handle

    def wrap_stream(self, method: str, behaviour: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]):
        """`behaviour` (a server-streaming servicer method) with everything above (see wrap_unary)."""
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with self._observed(method, context) as outcome:
                try:
                    self._admit(context)
                    _check_decoded(request)
                    watchdog, task = self._send_watchdog, asyncio.current_task()
                    async with contextlib.aclosing(behaviour(request, context)) as replies:
                        try:
                            async for reply in replies:
                                watchdog.park(task, context)
                                yield reply  # resumed once grpc has written it
                                watchdog.unpark(task)  # not parked while the next message is being made
                        finally:
                            watchdog.unpark(task)
                except BaseException as exc:  # noqa: BLE001 - every failure becomes a precise status
                    await self._fail(method, context, exc, outcome)
        return handle

    def _admit(self, context: grpc.aio.ServicerContext) -> None:
        """Per-client token limits: records who is calling (tokens are charged to them) and refuses a client
        over its tokens per minute before any work."""
        if not self._tokens_per_minute:
            return
        client = next((v for k, v in context.invocation_metadata() or () if k == CLIENT_ID_METADATA), None)
        current_client.set(client)
        self._tokens_per_minute.check(client)

    @contextlib.contextmanager
    def _observed(self, method: str, context: grpc.aio.ServicerContext):
        """Records the RPC. `outcome["code"]` is the final code: OK only if the body completed."""
        metadata = tuple(context.invocation_metadata() or ())
        headers = {k: v for k, v in metadata if isinstance(v, str)}
        record = RequestRecord(method=method, request_id=headers.get("x-request-id") or uuid.uuid4().hex,
                               client_id=self._metrics.client_label(headers.get("x-client-id")),
                               started=time.perf_counter())
        token = current_request.set(record)
        span = span_token = None
        if self._tracing.enabled:
            # Opened now and current while the RPC runs, so the engine's own tracing (SGLang) can name it as the
            # parent of its spans (GenerationRequest.trace_context); named and filled in when the RPC ends.
            span = self._tracing.start_server_span(
                f"GenerationService/{method}", metadata_carrier(metadata),
                {"rpc.system": "grpc", "rpc.service": "genrpc.v1.GenerationService", "rpc.method": method},
                start_ns=ns_at(record.started))
            span_token = self._tracing.activate(span)
        outcome: dict[str, grpc.StatusCode | None] = {"code": None}
        try:
            yield outcome
            if outcome["code"] is None:
                outcome["code"] = grpc.StatusCode.OK
        finally:
            # A stream cut from outside (client gone, send timeout) is closed by asyncio's generator finalizer,
            # in another context: the variable then belongs to a context that is already gone.
            with contextlib.suppress(ValueError):
                current_request.reset(token)
            if span_token is not None:
                self._tracing.deactivate(span_token)
            code = outcome["code"] or grpc.StatusCode.CANCELLED  # left early without an error: cancelled
            duration_s = time.perf_counter() - record.started
            self._metrics.observe(record, code.name, duration_s)
            _log_access(record, code, duration_s)
            if span is not None:
                self._trace(span, record, code)

    def _trace(self, span: Any, record: RequestRecord, code: grpc.StatusCode) -> None:
        """Completes the RPC's span and records its phases after the fact, from the record's timestamps."""
        operation = _OPERATIONS.get(record.method)
        attributes = {"rpc.grpc.status_code": code.value[0],
                      "genrpc.request_id": record.request_id, "genrpc.client_id": record.client_id}
        if operation:
            attributes |= {"gen_ai.operation.name": operation, "gen_ai.provider.name": "genrpc",
                           "gen_ai.request.model": record.model or self._metrics.model_name,
                           "gen_ai.usage.input_tokens": record.prompt_tokens,
                           "gen_ai.usage.output_tokens": record.completion_tokens}
            if record.max_tokens is not None:
                attributes["gen_ai.request.max_tokens"] = record.max_tokens
            if record.finish_reasons:
                attributes["gen_ai.response.finish_reasons"] = tuple(record.finish_reasons)
            if record.cached_prompt_tokens:
                attributes["gen_ai.usage.cache_read.input_tokens"] = record.cached_prompt_tokens
        if operation and record.model:
            span.update_name(f"{operation} {record.model}")
        span.set_attributes(attributes)
        tracing = self._tracing
        if code != grpc.StatusCode.OK:
            tracing.set_error(span, code.name)
        end_ns = time.time_ns()
        if record.generation_started is not None:
            queued = ns_at(record.generation_started)
            admitted = queued + int((record.queue_time_s or 0.0) * 1e9)
            if record.queue_time_s is not None:
                tracing.record_span("queue", span, queued, admitted)
            if record.ttft_s is not None:
                first = ns_at(record.started + record.ttft_s)
                tracing.record_span("prefill", span, admitted, first,
                                    {"gen_ai.usage.input_tokens": record.prompt_tokens})
                tracing.record_span("stream", span, first, end_ns,
                                    {"gen_ai.usage.output_tokens": record.completion_tokens})
        span.end(end_time=end_ns)

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


def _log_access(record: RequestRecord, code: grpc.StatusCode, duration_s: float) -> None:
    """One JSON line per RPC (request id = Envoy's x-request-id, so it joins Envoy's access log)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    access_log.info(json.dumps({
        "event": "request", "request_id": record.request_id, "client_id": record.client_id,
        "model": record.model or None, "endpoint": record.method, "status": code.name,
        "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
        "cached_prompt_tokens": record.cached_prompt_tokens,
        "ttft_s": None if record.ttft_s is None else round(record.ttft_s, 6),
        "queue_time_s": None if record.queue_time_s is None else round(record.queue_time_s, 6),
        "duration_s": round(duration_s, 6), "finish_reasons": record.finish_reasons or None,
    }, separators=(",", ":")))
