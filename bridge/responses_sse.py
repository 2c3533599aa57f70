"""The Responses API route: `POST /v1/responses` on the StreamResponse / CreateResponse RPCs.

The route is openai_api's handler (body parsing, OpenAI error bodies, the stream core's first-message wait,
deadline, metadata and disconnect -> cancel) with this module's renderer: each gRPC ResponseStreamEvent becomes one
`event: <type>\\ndata: <json>\\n\\n` frame whose JSON is the oneof's inner message in Envoy's JSON mapping (the
shape the unary route returns), plus the empty lists protobuf does not print (`response.output`, a message
item's `content`). OpenAI's Responses stream has no `[DONE]` frame: it ends after `response.completed` /
`response.incomplete` / `response.failed`.

Errors before the first event are plain OpenAI JSON errors; a gRPC error after it (e.g. the service shutting
down) is one `error` event with the next sequence number, and the stream ends. Envoy routes only `"stream":
true` bodies here; a body without it is served by the unary CreateResponse, so the bridge is a complete front
without Envoy too.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import Message

from genrpc.bridge.encoding import dumps, message_to_dict
from genrpc.bridge.errors import OpenAIError, from_rpc_error, http_error
from genrpc.bridge.openai_api import SSE_HEADERS, Endpoint
from genrpc.v1 import responses_pb2

PATH = "/v1/responses"


def _complete_item(item: dict[str, Any]) -> None:
    if item.get("type") == "message":
        item.setdefault("content", [])


def _complete_response(response: dict[str, Any]) -> None:
    response.setdefault("output", [])
    for item in response["output"]:
        _complete_item(item)


def response_json(response: responses_pb2.Response) -> dict[str, Any]:
    """A Response as OpenAI's JSON (the unary body)."""
    data = message_to_dict(response)
    _complete_response(data)
    return data


def event_json(event: responses_pb2.ResponseStreamEvent) -> dict[str, Any]:
    """One stream event as OpenAI's JSON (the `data` of its SSE frame)."""
    kind = event.WhichOneof("event")
    if kind is None:
        raise ValueError("empty ResponseStreamEvent")
    data = message_to_dict(getattr(event, kind))
    if "response" in data:
        _complete_response(data["response"])
    if "item" in data:
        _complete_item(data["item"])
    return data


def sse_frame(data: dict[str, Any]) -> bytes:
    return b"event: " + data["type"].encode() + b"\ndata: " + dumps(data) + b"\n\n"


def error_frame(error: OpenAIError, sequence_number: int) -> bytes:
    """OpenAI's `error` stream event for a failure after the stream started."""
    body = error.body["error"]
    return sse_frame({"type": "error", "code": body.get("code") or body.get("type"), "message": body["message"],
                      "param": body.get("param"), "sequence_number": sequence_number})


class ResponseEventRenderer:
    """One Responses stream's SSE frames (a `stream.Renderer`)."""

    headers = SSE_HEADERS

    def __init__(self) -> None:
        self._next_sequence = 0  # the sequence number an error event after the last frame takes

    def feed(self, message: Message) -> bytes:
        data = event_json(message)
        self._next_sequence = data.get("sequence_number", self._next_sequence) + 1
        return sse_frame(data)

    def finish(self) -> bytes:
        if self._next_sequence == 0:  # the service always sends events; an empty stream is a bug, not a reply
            return error_frame(http_error(500, "The service ended the response stream without events."), 0)
        return b""

    def error(self, error: grpc.aio.AioRpcError) -> bytes:
        return error_frame(from_rpc_error(error), self._next_sequence)


ENDPOINT = Endpoint(responses_pb2.CreateResponseRequest, "StreamResponse", "CreateResponse",
                    renderer=lambda request: ResponseEventRenderer(), unary_json=response_json)
