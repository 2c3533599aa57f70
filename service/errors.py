"""The service's errors and their one mapping to gRPC (AIP-193: google.rpc.Status with ErrorInfo/BadRequest).

Every failure a client can see is raised as a ServiceError subclass; `to_rpc_status` is the only place that
turns one into a gRPC status. Engine-specific exceptions are translated by `from_engine_error`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "genrpc.dev"


class ServiceError(Exception):
    """Base class: a message for humans, a machine-readable reason, optional field violations."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None,
                 field_violations: Iterable[tuple[str, str]] = (), metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
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
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=getattr(code_pb2, error.code.name), message=error.message, details=packed)


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """Ends the RPC with the error's status and details (raises, as context.abort does)."""
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(error)))


def from_engine_error(exc: BaseException) -> ServiceError:
    """Translates an engine's own exception into a ServiceError (one table for every engine)."""
    if isinstance(exc, ServiceError):
        return exc
    for exc_type_name, make_error in _ENGINE_ERRORS:
        if any(cls.__name__ == exc_type_name for cls in type(exc).__mro__):
            return make_error(exc)
    grpc_code = getattr(exc, "grpc_code", None)  # engines may attach one (e.g. SGLang abort status codes)
    if isinstance(grpc_code, grpc.StatusCode):
        error = EngineFailure(str(exc))
        error.code = grpc_code
        return error
    return EngineFailure(f"generation failed: {type(exc).__name__}: {exc}")


# Matched by class name (most specific first) so engine modules and their heavy imports stay optional here.
_ENGINE_ERRORS: list[tuple[str, Callable[[BaseException], ServiceError]]] = [
    ("QueueFullError", lambda e: Overloaded(str(e) or "The server is at capacity; retry later.")),
    ("EngineNotReadyError", lambda e: NotReady(str(e) or "The engine is not running.")),
    ("EngineStoppedError", lambda e: NotReady(str(e) or "The engine is shutting down.")),
    ("InvalidGrammarError", lambda e: InvalidArgument(getattr(e, "field", "response_format"), str(e))),
    ("UnsupportedParameterError", lambda e: UnsupportedParameter(getattr(e, "field", "request"), str(e))),
    ("UnsupportedRequestError", lambda e: UnsupportedParameter(getattr(e, "field", "request"), str(e))),
    ("SGLangRequestError", lambda e: InvalidArgument(getattr(e, "field", "request"), str(e))),
    # The typed engine errors of engines/base.py (the llama.cpp engine raises only these).
    ("EngineOverloaded", lambda e: Overloaded(str(e) or "The server is at capacity; retry later.")),
    ("EngineUnavailable", lambda e: NotReady(str(e) or "The engine is not running.")),
    ("EngineUnsupported", lambda e: UnsupportedParameter(getattr(e, "field", "request"), str(e))),
    ("EngineBadRequest", lambda e: InvalidArgument(getattr(e, "field", "request"), str(e))),
]
