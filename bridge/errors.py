"""The one mapping from a gRPC status to an OpenAI error (`{"error": {"message", "type", "param", "code"}}`).

Used by the bridge (HTTP error responses before the stream starts, SSE error events after) and rendered into
Envoy's Lua error shaper by `genrpc.envoy_config`, so REST clients see the same error whichever path served
them.

- HTTP status: Envoy's own gRPC->HTTP mapping (3->400, 5->404, 7->403, 8->429, 16->401, 14->503, 4->504, ...).
- `type`: OpenAI's error type for that class of error.
- `param`: the first BadRequest field violation, else ErrorInfo metadata["param"], else null.
- `code`: ErrorInfo.reason in lower case (MODEL_NOT_FOUND -> "model_not_found"), else a per-status default.

SSE errors: once a stream has started (200 headers sent), an error is one `data: {"error": {...}}\\n\\n` event and
the stream ends WITHOUT `data: [DONE]` — `[DONE]` means "complete"; a stream that ends without it was cut short.
(The OpenAI SDKs raise `APIError` on the error event, before they would look for `[DONE]`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from genrpc.bridge.encoding import dumps
from genrpc.error_table import (
    DASHSCOPE_GRPC_CODES,
    DASHSCOPE_REASON_CODES,
    DEFAULT_ERROR,
    GRPC_ERROR_MAP,
    HTTP_ERROR_TYPES,
    dashscope_code_for_status,
)

_ERROR_INFO = error_details_pb2.ErrorInfo.DESCRIPTOR.full_name
_BAD_REQUEST = error_details_pb2.BadRequest.DESCRIPTOR.full_name
_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class OpenAIError:
    status: int  # HTTP status
    body: dict[str, Any]  # {"error": {...}}
    grpc_code: int | None = None  # the gRPC status code it came from (None: not a gRPC error)
    retry_after_s: str | None = None  # the `retry-after` header (from ErrorInfo.metadata["retry_after_s"])

    def json_bytes(self) -> bytes:
        return dumps(self.body)

    def sse_event(self) -> bytes:
        """The SSE error event sent once a stream has started (the stream then ends, no [DONE])."""
        return b"data: " + self.json_bytes() + b"\n\n"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def http_error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> OpenAIError:
    """An OpenAI error for a failure that did not come from gRPC (bad JSON, wrong method, ...)."""
    type_ = HTTP_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return OpenAIError(status, error_body(message, type_, param, code))


def from_grpc_status(code: grpc.StatusCode | int, message: str | None,
                     status: status_pb2.Status | None = None) -> OpenAIError:
    """THE mapping: gRPC code + message + optional google.rpc.Status (with details) -> OpenAI error."""
    code_int = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
    http_status, type_, default_code = GRPC_ERROR_MAP.get(code_int, DEFAULT_ERROR)
    param: str | None = None
    err_code = default_code
    meta_param: str | None = None
    retry_after_s: str | None = None
    if status is not None:
        if status.message:
            message = status.message
        for detail in status.details:
            name = detail.TypeName()
            if name == _ERROR_INFO:
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.reason:
                    err_code = info.reason.lower()
                meta_param = info.metadata.get("param") or meta_param
                if info.metadata.get("retry_after_s", "").isdigit():
                    retry_after_s = info.metadata["retry_after_s"]
            elif name == _BAD_REQUEST and param is None:
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    param = bad.field_violations[0].field
    if not message:
        message = next((c.name for c in grpc.StatusCode if c.value[0] == code_int), "error")
    return OpenAIError(http_status, error_body(message, type_, param or meta_param, err_code), code_int,
                       retry_after_s)



def status_from_trailers(trailing_metadata: Any) -> status_pb2.Status | None:
    """The google.rpc.Status in `grpc-status-details-bin`, if any (what grpc_status.rpc_status.from_call reads)."""
    for key, value in (trailing_metadata or ()):
        if key == _DETAILS_KEY:
            st = status_pb2.Status()
            try:
                st.MergeFromString(value)
            except Exception:  # noqa: BLE001 - a corrupt detail must not hide the real error
                return None
            return st
    return None


def from_rpc_error(err: grpc.RpcError) -> OpenAIError:
    """OpenAI error for a failed gRPC call (grpc.aio.AioRpcError or a sync grpc.Call)."""
    status = None
    try:
        from grpc_status import rpc_status

        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - from_call raises if message/code disagree; fall back to raw trailers
        status = None
    if status is None:
        try:
            status = status_from_trailers(err.trailing_metadata())  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            status = None
    return from_grpc_status(err.code(), err.details(), status)  # type: ignore[attr-defined]


# ---- DashScope rendering ------------------------------------------------------------------------------------
# The same errors (same HTTP status, from GRPC_ERROR_MAP above) in DashScope's native shape,
# `{"code": "InvalidParameter", "message": "...", "request_id": "..."}`, for the DashScope-style route
# (bridge/dashscope.py). Codes follow DashScope's documented status-code table ("InvalidParameter",
# "InvalidApiKey", "AccessDenied", "Throttling", "InternalError", "RequestTimeOut", ...; see
# https://help.aliyun.com/zh/model-studio/developer-reference/error-code).

@dataclass(frozen=True)
class DashScopeError:
    status: int  # HTTP status
    body: dict[str, Any]  # {"code", "message", "request_id"}

    def json_bytes(self) -> bytes:
        return dumps(self.body)

    def sse_event(self, event_id: int) -> bytes:
        """DashScope's SSE error event (sent once a stream has started; the stream then ends)."""
        return (f"id:{event_id}\nevent:error\n:HTTP_STATUS/{self.status}\ndata:".encode()
                + self.json_bytes() + b"\n\n")


def to_dashscope(err: OpenAIError, request_id: str) -> DashScopeError:
    """An OpenAIError (from `from_grpc_status`/`from_rpc_error`/`http_error`) in DashScope's shape: same HTTP
    status and message; the code from the gRPC code (refined by ErrorInfo.reason), else from the HTTP status."""
    e = err.body.get("error", {})
    openai_code = e.get("code")
    if openai_code in DASHSCOPE_REASON_CODES:
        code = DASHSCOPE_REASON_CODES[openai_code]
    elif err.grpc_code is not None:
        code = DASHSCOPE_GRPC_CODES.get(err.grpc_code, "InternalError")
    else:
        code = dashscope_code_for_status(err.status)
    return DashScopeError(err.status, {"code": code, "message": e.get("message") or code, "request_id": request_id})


def dashscope_error(status: int, code: str, message: str, request_id: str) -> DashScopeError:
    return DashScopeError(status, {"code": code, "message": message, "request_id": request_id})
