"""The OpenAI routes: `POST /v1/chat/completions` and `POST /v1/completions`, stream and non-stream (and the
route handler `POST /v1/responses` shares, with its own renderer: bridge/responses_sse.py).

- The body is parsed once (`json.loads`, then `json_format.ParseDict(..., ignore_unknown_fields=True)`): the
  same semantics as Envoy's transcoder (unknown fields dropped, declared fields type-checked).
- Chunks print as Envoy's JSON mapping (`preserve_proto_field_names`), compact, in `data: {chunk}\\n\\n` frames,
  then `data: [DONE]\\n\\n`. OpenAI order: role chunk, content chunks, finish_reason chunk, then (only if
  `stream_options.include_usage`) the usage chunk with `"choices": []`; `usage` is dropped from chunks that
  have choices (the service puts it on the request's last chunk for gRPC clients).
- Rendering without reflection: a chunk of the usual shape (one choice, a text delta, a null or string
  finish_reason and logprobs) is printed from a per-stream template (the constant head and tail cached, only
  the text escaped per chunk); any other chunk (tool calls, logprobs, usage, several choices) goes through the
  generic mapping. Both print the same bytes (tests/test_bridge_render.py).
- Errors before the first message are plain HTTP OpenAI errors; after it, one SSE error event and the stream
  ends without `[DONE]` (bridge/errors.py).
- A non-stream body that reaches the bridge is served by the unary RPC, so the bridge is a complete OpenAI
  front on its own (useful without Envoy).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import Response

from genrpc.bridge.encoding import align_with_transcoder, dumps, loads_object, message_to_dict, quote
from genrpc.bridge.errors import OpenAIError, from_rpc_error, http_error
from genrpc.bridge.observability import annotate
from genrpc.bridge.stream import DISCONNECTED, Renderer, SSEResponse, call_options, first_message
from genrpc.v1 import chat_pb2, completion_pb2

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
DONE_FRAME = b"data: [DONE]\n\n"


def chunk_to_dict(chunk: Message) -> dict[str, Any]:
    """A stream message as OpenAI JSON (the generic mapping): usage only on the choiceless usage chunk."""
    d = message_to_dict(chunk)
    if d.get("choices"):
        d.pop("usage", None)
    else:
        d["choices"] = []  # an empty repeated field does not print; OpenAI's usage chunk has "choices": []
    return d


def frame(d: dict[str, Any]) -> bytes:
    return b"data: " + dumps(d) + b"\n\n"


# ---- the per-chunk fast path ----------------------------------------------------------------------------
# `_chat_choice` and `_completion_choice` return the JSON text of one choice, or None when the choice has a shape
# the fast path leaves to the generic mapping. Fields print in field-number order, as the mapping prints them.

def _close(choice: Message, parts: list[str], value_fields: tuple[str, str]) -> str | None:
    """The choice's JSON from `parts` plus its google.protobuf.Value fields (in field order), or None when one of
    them is neither null nor a string."""
    for name in value_fields:
        if choice.HasField(name):
            value = getattr(choice, name)
            kind = value.WhichOneof("kind")
            if kind is None or kind == "null_value":
                parts.append(f'"{name}":null')
            elif kind == "string_value":
                parts.append(f'"{name}":{quote(value.string_value)}')
            else:
                return None
    return "{" + ",".join(parts) + "}"


def _chat_choice(choice: chat_pb2.ChatCompletionChunkChoice) -> str | None:
    parts = []
    if choice.HasField("index"):
        parts.append(f'"index":{choice.index}')
    if choice.HasField("delta"):
        delta = choice.delta
        if delta.tool_calls:
            return None
        if delta.HasField("role"):
            if delta.HasField("content"):
                parts.append(f'"delta":{{"role":{quote(delta.role)},"content":{quote(delta.content)}}}')
            else:
                parts.append(f'"delta":{{"role":{quote(delta.role)}}}')
        elif delta.HasField("content"):
            parts.append(f'"delta":{{"content":{quote(delta.content)}}}')
        else:
            parts.append('"delta":{}')
    return _close(choice, parts, ("finish_reason", "logprobs"))


def _completion_choice(choice: completion_pb2.CompletionChoice) -> str | None:
    parts = []
    if choice.HasField("text"):
        parts.append('"text":' + quote(choice.text))
    if choice.HasField("index"):
        parts.append(f'"index":{choice.index}')
    return _close(choice, parts, ("logprobs", "finish_reason"))


def _template(head: tuple[str, str, int, str, str | None]) -> tuple[str, str]:
    """The SSE frame around a chunk's choices for these header fields: (prefix, suffix)."""
    id_, object_, created, model, fingerprint = head
    fields = []
    if id_:
        fields.append('"id":' + quote(id_))
    if object_:
        fields.append('"object":' + quote(object_))
    if created:
        fields.append(f'"created":{created}')
    if model:
        fields.append('"model":' + quote(model))
    prefix = "data: {" + "".join(f + "," for f in fields) + '"choices":['
    suffix = "]" + ("" if fingerprint is None else ',"system_fingerprint":' + quote(fingerprint)) + "}\n\n"
    return prefix, suffix


class ChunkRenderer:
    """One OpenAI stream's SSE frames (a `stream.Renderer`)."""

    headers = SSE_HEADERS

    def __init__(self, chat: bool, include_usage: bool):
        self._choice = _chat_choice if chat else _completion_choice
        self._chat = chat
        self.include_usage = include_usage
        self._usage_sent = False
        self._head: tuple[str, str, int, str, str | None] | None = None
        self._prefix = self._suffix = ""

    def fast(self, chunk: Message) -> bytes | None:
        """The frame from the stream's template, or None when the chunk needs the generic mapping."""
        choices = chunk.choices
        if len(choices) != 1 or (self._chat and chunk.HasField("dropped_messages")):
            return None
        body = self._choice(choices[0])
        if body is None:
            return None
        head = (chunk.id, chunk.object, chunk.created, chunk.model,
                chunk.system_fingerprint if chunk.HasField("system_fingerprint") else None)
        if head != self._head:
            self._head = head
            self._prefix, self._suffix = _template(head)
        return (self._prefix + body + self._suffix).encode()

    def generic(self, chunk: Message) -> bytes:
        """The frame through the generic mapping (b"" for a usage chunk the client did not ask for, or a second
        one)."""
        d = chunk_to_dict(chunk)
        if not d["choices"]:
            if not self.include_usage or self._usage_sent:
                return b""
            self._usage_sent = True
        return frame(d)

    def feed(self, message: Message) -> bytes:
        data = self.fast(message)
        return self.generic(message) if data is None else data

    def finish(self) -> bytes:
        return DONE_FRAME

    def error(self, error: grpc.aio.AioRpcError) -> bytes:
        return from_rpc_error(error).sse_event()


# ---- the routes ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    """A POST route on a pair of RPCs: `stream_rpc` for `"stream": true`, else `unary_rpc`."""

    request_cls: type[Message]
    stream_rpc: str
    unary_rpc: str
    renderer: Callable[[Message], Renderer]  # the SSE renderer for a stream request
    unary_json: Callable[[Message], dict[str, Any]] = message_to_dict  # the unary reply's JSON body


def _chunk_renderer(chat: bool) -> Callable[[Message], ChunkRenderer]:
    def make(req: Message) -> ChunkRenderer:
        return ChunkRenderer(chat, req.HasField("stream_options") and req.stream_options.include_usage)
    return make


ENDPOINTS = {
    "/v1/chat/completions": Endpoint(chat_pb2.ChatCompletionRequest, "Chat", "CreateChatCompletion",
                                     _chunk_renderer(chat=True)),
    "/v1/completions": Endpoint(completion_pb2.CompletionRequest, "Generate", "CreateCompletion",
                                _chunk_renderer(chat=False)),
}


def _max_tokens(req: Message) -> int | None:
    """The request's token cap, whatever the endpoint calls it (for the span's gen_ai.request.max_tokens)."""
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if name in req.DESCRIPTOR.fields_by_name and req.HasField(name):
            return getattr(req, name)
    return None


def error_response(err: OpenAIError) -> Response:
    # a 429 says when to retry (the computed wait of a per-client limit, else 1 s), as Envoy does on its path
    headers = ({"retry-after": err.retry_after_s} if err.retry_after_s
               else {"retry-after": "1"} if err.status == 429 else None)
    return Response(err.json_bytes(), status_code=err.status, media_type="application/json", headers=headers)


def endpoint_handler(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response | SSEResponse]]:
    """The route handler of `endpoint` (OpenAI's error bodies, the stream core for `"stream": true`)."""

    async def handle(request: Request) -> Response | SSEResponse:
        try:
            body = loads_object(await request.body())
        except ValueError as e:
            return error_response(http_error(400, f"We could not parse the JSON body of your request: {e}."))
        try:
            body = align_with_transcoder(body, endpoint.request_cls.DESCRIPTOR)
            req = json_format.ParseDict(body, endpoint.request_cls(), ignore_unknown_fields=True)
        except (json_format.ParseError, ValueError, TypeError, RecursionError) as e:
            return error_response(http_error(400, f"Invalid request body: {e}"))
        annotate(**{"gen_ai.request.model": getattr(req, "model", "") or None,
                    "gen_ai.request.max_tokens": _max_tokens(req)})
        metadata, timeout = call_options(request.headers)
        stub = request.app.state.upstream.stub
        if not req.stream:
            try:
                resp = await getattr(stub, endpoint.unary_rpc)(req, metadata=metadata, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                return error_response(from_rpc_error(e))
            return Response(dumps(endpoint.unary_json(resp)), media_type="application/json")
        renderer = endpoint.renderer(req)  # before the call: nothing may fail between the call and its response
        call = getattr(stub, endpoint.stream_rpc)(req, metadata=metadata, timeout=timeout)
        try:
            reader, first = await first_message(call, request.receive)
        except grpc.aio.AioRpcError as e:
            return error_response(from_rpc_error(e))
        if first is DISCONNECTED:
            return Response(status_code=499)  # nobody is listening any more
        return SSEResponse(reader, first, renderer)

    return handle
