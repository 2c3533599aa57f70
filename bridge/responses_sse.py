"""The Responses API over REST with `"stream": true`: StreamResponse events → OpenAI's typed SSE.

Each gRPC ResponseStreamEvent becomes one `event: <type>\\ndata: <json>\\n\\n` frame; the JSON is the oneof's
inner message in Envoy's JSON mapping (the same shape the unary route returns), plus the empty lists that
protobuf does not print (`response.output`, a message item's `content`). OpenAI's Responses stream has no
`[DONE]` frame: it ends after `response.completed` / `response.incomplete` / `response.failed`.

Errors before the first event are plain OpenAI JSON errors with the HTTP status of bridge.errors; a gRPC error
after it (e.g. the service shutting down) is one `error` event, and the stream ends. A client disconnect
cancels the gRPC call, which frees the engine slot. A body without `"stream": true` is served by the unary
CreateResponse, so the bridge is a complete front without Envoy too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from genrpc.bridge.errors import OpenAIError, from_rpc_error, http_error
from genrpc.v1 import responses_pb2

log = logging.getLogger("genrpc.bridge")
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


def _dumps(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _complete_item(item: dict[str, Any]) -> None:
    if item.get("type") == "message":
        item.setdefault("content", [])


def _complete_response(response: dict[str, Any]) -> None:
    response.setdefault("output", [])
    for item in response["output"]:
        _complete_item(item)


def event_json(event: responses_pb2.ResponseStreamEvent) -> dict[str, Any]:
    """One stream event as OpenAI's JSON (the `data` of its SSE frame)."""
    kind = event.WhichOneof("event")
    if kind is None:
        raise ValueError("empty ResponseStreamEvent")
    data = json_format.MessageToDict(getattr(event, kind), preserving_proto_field_name=True)
    if "response" in data:
        _complete_response(data["response"])
    if "item" in data:
        _complete_item(data["item"])
    return data


def sse_frame(data: dict[str, Any]) -> bytes:
    return b"event: " + data["type"].encode() + b"\ndata: " + _dumps(data) + b"\n\n"


def error_frame(error: OpenAIError, sequence_number: int) -> bytes:
    body = error.body["error"]
    return sse_frame({"type": "error", "code": body.get("code") or body.get("type"), "message": body["message"],
                      "param": body.get("param"), "sequence_number": sequence_number})


def response_json(response: responses_pb2.Response) -> dict[str, Any]:
    data = json_format.MessageToDict(response, preserving_proto_field_name=True)
    _complete_response(data)
    return data


class _ResponsesSSE:
    """ASGI response streaming the rest of a StreamResponse call, cancelling it on client disconnect."""

    def __init__(self, call: Any, iterator: AsyncIterator[Any], first: Any):
        self.call, self.iterator, self.first = call, iterator, first
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected = True
            self.call.cancel()

        watcher = asyncio.create_task(watch_disconnect())
        sequence = 0
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            try:
                event = self.first
                while event is not None:
                    data = event_json(event)
                    sequence = data.get("sequence_number", sequence) + 1
                    await send({"type": "http.response.body", "body": sse_frame(data), "more_body": True})
                    event = await anext(self.iterator, None)
            except grpc.aio.AioRpcError as rpc_error:
                if not self.disconnected:
                    error = from_rpc_error(rpc_error)
                    log.info("responses stream failed after start: %s", error.body)
                    await send({"type": "http.response.body", "body": error_frame(error, sequence),
                                "more_body": True})
            except asyncio.CancelledError:
                if not self.disconnected:
                    raise
                return
            if not self.disconnected:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were writing
            self.disconnected = True
        finally:
            watcher.cancel()
            self.call.cancel()  # no-op when the call already finished
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher


def routes(stub: Callable[[], Any]) -> list[Route]:
    """`POST /v1/responses` (stream and not), on the StreamResponse / CreateResponse RPCs."""
    from genrpc.bridge.app import DISCONNECTED, _metadata_and_timeout, await_first_message  # shared helpers

    def error_response(error: OpenAIError) -> Response:
        return Response(error.json_bytes(), status_code=error.status, media_type="application/json")

    async def create(request: Request) -> Any:
        body = await request.body()
        try:
            text = body.decode("utf-8")
            parsed = json.loads(text) if text.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error_response(http_error(400, f"We could not parse the JSON body of your request: {e}"))
        if not isinstance(parsed, dict):
            return error_response(http_error(400, "The request body must be a JSON object."))
        try:
            # The transcoder's semantics: unknown fields dropped, declared fields type-checked.
            req = json_format.Parse(text, responses_pb2.CreateResponseRequest(), ignore_unknown_fields=True)
        except json_format.ParseError as e:
            return error_response(http_error(400, f"Invalid request body: {e}"))
        metadata, timeout = _metadata_and_timeout(request)
        if not req.stream:
            try:
                reply = await stub().CreateResponse(req, metadata=metadata, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                return error_response(from_rpc_error(e))
            return Response(_dumps(response_json(reply)), media_type="application/json")
        call = stub().StreamResponse(req, metadata=metadata, timeout=timeout)
        try:
            iterator, first = await await_first_message(call, request.receive)
        except grpc.aio.AioRpcError as e:
            return error_response(from_rpc_error(e))
        if first is DISCONNECTED:
            return Response(status_code=499)
        if first is None:  # the service always sends events; an empty stream is a bug, not a reply
            return error_response(http_error(500, "The service ended the response stream without events."))
        return _ResponsesSSE(call, iterator, first)

    return [Route("/v1/responses", create, methods=["POST"])]
