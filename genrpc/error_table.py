"""The one table of REST error shapes: gRPC status code -> HTTP status, OpenAI error type and code, and the
DashScope code for the same error.

Data only, so every layer can read it: the bridge renders errors with it (genrpc.bridge.errors) and the Envoy
config is generated from it, so a REST client sees the same error whichever path served the request.
HTTP statuses follow Envoy's own gRPC->HTTP mapping (3->400, 5->404, 7->403, 8->429, 16->401, 14->503, 4->504).
"""

from __future__ import annotations

# gRPC code (int) -> (HTTP status, OpenAI error type, default OpenAI code).
GRPC_ERROR_MAP: dict[int, tuple[int, str, str | None]] = {
    1: (499, "invalid_request_error", "cancelled"),  # CANCELLED
    2: (500, "server_error", None),  # UNKNOWN
    3: (400, "invalid_request_error", None),  # INVALID_ARGUMENT
    4: (504, "server_error", "timeout"),  # DEADLINE_EXCEEDED
    5: (404, "invalid_request_error", None),  # NOT_FOUND
    6: (409, "invalid_request_error", None),  # ALREADY_EXISTS
    7: (403, "permission_error", None),  # PERMISSION_DENIED
    8: (429, "rate_limit_error", "rate_limit_exceeded"),  # RESOURCE_EXHAUSTED
    9: (400, "invalid_request_error", None),  # FAILED_PRECONDITION
    10: (409, "server_error", None),  # ABORTED
    11: (400, "invalid_request_error", None),  # OUT_OF_RANGE
    12: (501, "invalid_request_error", "not_implemented"),  # UNIMPLEMENTED
    13: (500, "server_error", None),  # INTERNAL
    14: (503, "server_error", "service_unavailable"),  # UNAVAILABLE
    15: (500, "server_error", None),  # DATA_LOSS
    16: (401, "invalid_request_error", "invalid_api_key"),  # UNAUTHENTICATED
}
DEFAULT_ERROR = (500, "server_error", None)

# HTTP status -> OpenAI type, for errors that never were gRPC (Envoy's own replies, bad JSON, ...).
HTTP_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
    413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
}
# HTTP status -> OpenAI code, for Envoy's own replies where OpenAI has one (auth, body limit, rate limit, upstream).
HTTP_ERROR_CODES: dict[int, str] = {
    401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded", 503: "service_unavailable",
    504: "timeout",
}

# ---- DashScope (https://help.aliyun.com/zh/model-studio/developer-reference/error-code) --------------------

# gRPC code (int) -> DashScope error code.
DASHSCOPE_GRPC_CODES: dict[int, str] = {
    1: "RequestCancelled",  # CANCELLED (no DashScope equivalent: the client went away)
    2: "InternalError",  # UNKNOWN
    3: "InvalidParameter",  # INVALID_ARGUMENT
    4: "RequestTimeOut",  # DEADLINE_EXCEEDED
    5: "NotFound",  # NOT_FOUND (ModelNotFound when ErrorInfo.reason is MODEL_NOT_FOUND)
    6: "InvalidParameter",  # ALREADY_EXISTS
    7: "AccessDenied",  # PERMISSION_DENIED
    8: "Throttling",  # RESOURCE_EXHAUSTED
    9: "InvalidParameter",  # FAILED_PRECONDITION
    10: "InternalError",  # ABORTED
    11: "InvalidParameter",  # OUT_OF_RANGE
    12: "UnsupportedOperation",  # UNIMPLEMENTED
    13: "InternalError",  # INTERNAL
    14: "ServiceUnavailable",  # UNAVAILABLE
    15: "InternalError",  # DATA_LOSS
    16: "InvalidApiKey",  # UNAUTHENTICATED
}
# ErrorInfo.reason (lower case, as in the OpenAI `code`) -> DashScope code, where DashScope has a finer one.
DASHSCOPE_REASON_CODES: dict[str, str] = {"model_not_found": "ModelNotFound"}
# HTTP status -> DashScope code, for errors that never were gRPC (bad JSON, Envoy's own replies, ...).
DASHSCOPE_HTTP_CODES: dict[int, str] = {
    400: "InvalidParameter", 401: "InvalidApiKey", 403: "AccessDenied", 404: "NotFound",
    405: "UnsupportedOperation", 408: "RequestTimeOut", 409: "InvalidParameter", 413: "BadRequest.TooLarge",
    415: "InvalidParameter", 429: "Throttling", 499: "RequestCancelled", 500: "InternalError",
    501: "UnsupportedOperation", 502: "InternalError", 503: "ServiceUnavailable", 504: "RequestTimeOut",
}


def dashscope_code_for_status(status: int) -> str:
    return DASHSCOPE_HTTP_CODES.get(status, "InternalError" if status >= 500 else "InvalidParameter")
