"""The service's errors and their one mapping to gRPC (AIP-193: google.rpc.Status with ErrorInfo/BadRequest).

Every failure a client can see is raised as a ServiceError subclass, or by an engine as one of the typed
engine errors (engines/base.py); `to_service_error` maps those with isinstance, and `to_rpc_status` is the only
place that turns a ServiceError into a gRPC status. service.interceptor applies both to every RPC.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from genrpc.service.engines.base import (EngineBadRequest, EngineError, EngineInternalError, EngineOverloaded,
                                         EngineUnavailable, EngineUnsupported)

ERROR_DOMAIN = "genrpc.dev"


class ServiceError(Exception):
    """Base class: a message for humans, a machine-readable reason, optional field violations."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None,
                 field_violations: Iterable[tuple[str, str]] = (), metadata: dict[str, str] | None = None,
                 retry_delay_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_delay_s = retry_delay_s  # sent as google.rpc.RetryInfo (REST: Envoy's `retry-after`)
        if reason is not None:
            self.reason = reason
        self.field_violations = list(field_violations)
        self.metadata = dict(metadata or {})


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_PARAMETER"

    def __init__(self, field: str, message: str, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None):
        super().__init__(message, reason=reason, field_violations=[(field, message)],
                         metadata={"param": field, **(metadata or {})})
        self.field = field


class UnsupportedParameter(InvalidArgument):
    reason = "UNSUPPORTED_PARAMETER"


class ContextLengthExceeded(InvalidArgument):
    reason = "CONTEXT_LENGTH_EXCEEDED"


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"

    def __init__(self, model: str):
        super().__init__(f"The model '{model}' does not exist or is not served here.",
                         metadata={"model": model, "param": "model"})


class Overloaded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "SERVER_OVERLOADED"


class NotReady(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "MODEL_NOT_READY"


class EngineFailure(ServiceError):
    code = grpc.StatusCode.INTERNAL
    reason = "ENGINE_FAILURE"


def to_rpc_status(error: ServiceError) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    details = [info]
    if error.field_violations:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in error.field_violations
        ]))
    if error.retry_delay_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromTimedelta(datetime.timedelta(seconds=error.retry_delay_s))
        details.append(retry)
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail, deterministic=True)  # map order would otherwise vary per process
        packed.append(any_detail)
    return status_pb2.Status(code=getattr(code_pb2, error.code.name), message=error.message, details=packed)


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """Ends the RPC with the error's status and details (raises, as context.abort does)."""
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(error)))


def to_service_error(exc: BaseException) -> ServiceError:
    """The ServiceError a client sees for any exception an RPC body raised (one table for every engine)."""
    if isinstance(exc, ServiceError):
        return exc
    for engine_error_type, make_error in _ENGINE_ERRORS:
        if isinstance(exc, engine_error_type):
            return make_error(exc)
    # Not an EngineError: a bug. Clients get the type only; the traceback goes to the log.
    return EngineFailure(f"internal error ({type(exc).__name__}); see the service log")


# Most specific first: EngineUnsupported is an EngineBadRequest.
_ENGINE_ERRORS: list[tuple[type[EngineError], Callable[[Any], ServiceError]]] = [
    (EngineUnsupported, lambda e: UnsupportedParameter(e.field, e.message)),
    (EngineBadRequest, lambda e: InvalidArgument(e.field, e.message)),
    (EngineOverloaded, lambda e: Overloaded(e.message or "The server is at capacity; retry later.",
                                            retry_delay_s=1.0)),
    (EngineUnavailable, lambda e: NotReady(e.message or "The engine is not serving.")),
    (EngineInternalError, lambda e: EngineFailure(e.message)),
    (EngineError, lambda e: EngineFailure(e.message)),
]
