"""The SSE bridge: OpenAI REST (`"stream": true`) in, `Chat`/`Generate` gRPC streams out, SSE frames back.

Envoy routes `"stream": true` bodies of `POST /v1/chat/completions` and `POST /v1/completions` here untouched.

- The body is parsed with `json_format.Parse(..., ignore_unknown_fields=True)`: the same semantics as Envoy's
  transcoder (unknown fields dropped, declared fields type-checked).
- Chunks are printed with `MessageToDict(preserving_proto_field_name=True)`, Envoy's JSON mapping, as compact
  JSON in `data: {chunk}\\n\\n` frames, then `data: [DONE]\\n\\n`.
- OpenAI order: role chunk, content chunks, finish_reason chunk, then (only if `stream_options.include_usage`)
  one usage chunk with `"choices": []`. `usage` is dropped from chunks that have choices.
- Errors before the first gRPC message are plain HTTP OpenAI errors (status from `bridge.errors`); the 200
  headers are only sent once the first message (or the clean end of the stream) arrived. Errors after that are
  one SSE error event and the stream ends without `[DONE]` (see bridge/errors.py).
- A non-stream body that reaches the bridge (`stream` false/absent) is served by the unary RPC
  (`CreateChatCompletion`/`CreateCompletion`) and returned as JSON, so the bridge is a complete OpenAI
  front on its own (useful without Envoy, e.g. in tests).
- A client disconnect cancels the gRPC call at once (a watcher waits for `http.disconnect`).
- `POST /api/v1/services/aigc/text-generation/generation` is the DashScope-style route (bridge/dashscope.py),
  stream and non-stream, on the same RPCs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from genrpc.bridge.errors import OpenAIError, from_grpc_status, from_rpc_error, http_error
from genrpc.v1 import chat_pb2, completion_pb2, generation_service_pb2_grpc

log = logging.getLogger("genrpc.bridge")

# Request headers forwarded to the service as gRPC metadata (lower case).
FORWARDED_HEADERS = ("x-request-id", "x-client-id", "traceparent", "tracestate", "openai-organization",
                     "openai-project")
# Request headers that carry a deadline, in milliseconds (Envoy sets it when the route has a timeout).
DEADLINE_HEADER_MS = "x-envoy-expected-rq-timeout-ms"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
DONE_FRAME = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class _Endpoint:
    request_cls: type[Message]
    stream_method: str  # GenerationServiceStub attribute
    unary_method: str


ENDPOINTS = {
    "/v1/chat/completions": _Endpoint(chat_pb2.ChatCompletionRequest, "Chat", "CreateChatCompletion"),
    "/v1/completions": _Endpoint(completion_pb2.CompletionRequest, "Generate", "CreateCompletion"),
}


def chunk_to_json(chunk: Message) -> dict[str, Any]:
    """A stream message as OpenAI JSON: Envoy's mapping; usage only on the choiceless usage chunk."""
    d = json_format.MessageToDict(chunk, preserving_proto_field_name=True)
    if d.get("choices"):
        d.pop("usage", None)
    else:
        d["choices"] = []  # an empty repeated field does not print; OpenAI's usage chunk has "choices": []
    return d


def frame(d: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"



class _SSEStream:
    """ASGI response streaming the rest of a gRPC call as SSE, cancelling the call on client disconnect."""

    def __init__(self, call: Any, iterator: AsyncIterator[Message], first: Message | None, include_usage: bool):
        self.call = call
        self.iterator = iterator
        self.first = first
        self.include_usage = include_usage
        self.disconnected = False

    def _render(self, msg: Message, state: dict[str, Any]) -> bytes | None:
        d = chunk_to_json(msg)
        if d["choices"]:
            if msg.HasField("usage"):
                state["usage"] = json_format.MessageToDict(msg.usage, preserving_proto_field_name=True)
            state["template"] = d
            return frame(d)
        # choiceless chunk: the usage chunk (OpenAI sends it only when include_usage is true)
        if not self.include_usage or state.get("usage_sent"):
            return None
        state["usage_sent"] = True
        return frame(d)

    def _synth_usage(self, state: dict[str, Any]) -> bytes | None:
        """The usage chunk from the final chunk's usage, if the service did not send one itself."""
        if not self.include_usage or state.get("usage_sent") or "usage" not in state:
            return None
        t = state.get("template", {})
        d = {k: t[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in t}
        d["choices"] = []
        d["usage"] = state["usage"]
        return frame(d)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    self.call.cancel()
                    return

        watcher = asyncio.create_task(watch_disconnect())
        state: dict[str, Any] = {}
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            if self.first is not None:
                data = self._render(self.first, state)
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                error: OpenAIError | None = None
                try:
                    async for msg in self.iterator:
                        data = self._render(msg, state)
                        if data:
                            await send({"type": "http.response.body", "body": data, "more_body": True})
                except grpc.aio.AioRpcError as e:
                    error = from_rpc_error(e)
                except asyncio.CancelledError:
                    if not self.disconnected:
                        raise
                    return
                if self.disconnected:
                    return
                if error is not None:
                    log.info("stream failed after start: %s", error.body)
                    await send({"type": "http.response.body", "body": error.sse_event(), "more_body": False})
                    return
            tail = (self._synth_usage(state) or b"") + DONE_FRAME
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:  # client went away while we were writing
            self.disconnected = True
        finally:
            watcher.cancel()
            self.call.cancel()  # no-op when the call already finished
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _error_response(err: OpenAIError) -> Response:
    return Response(err.json_bytes(), status_code=err.status, media_type="application/json")


def _metadata_and_timeout(request: Request) -> tuple[list[tuple[str, str]], float | None]:
    md = [(h, request.headers[h]) for h in FORWARDED_HEADERS if h in request.headers]
    timeout = None
    raw = request.headers.get(DEADLINE_HEADER_MS)
    if raw:
        with contextlib.suppress(ValueError):
            ms = float(raw)
            if ms > 0:
                timeout = ms / 1000.0
    return md, timeout


DISCONNECTED = object()  # await_first_message: the client left before the first message


async def await_first_message(call: Any, receive: Any) -> tuple[Any, Any]:
    """Waits for a stream's first message (None for an empty stream) before any response header is sent, so
    an early gRPC error becomes a normal HTTP error (raised as AioRpcError). A client that gives up meanwhile
    (queued behind other requests, long prompt) cancels the call: returns DISCONNECTED."""
    iterator = call.__aiter__()
    first_task = asyncio.ensure_future(iterator.__anext__())
    disconnect_task = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({first_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
        if not first_task.done():
            call.cancel()
            first_task.cancel()
        with contextlib.suppress(BaseException):
            await disconnect_task
    if first_task.cancelled() or not first_task.done():
        return iterator, DISCONNECTED
    try:
        return iterator, first_task.result()
    except StopAsyncIteration:
        return iterator, None


def create_app(settings: Any) -> Starlette:
    """The bridge ASGI app. One shared grpc.aio channel to `settings.grpc_address()` (created on first use
    in the running loop, closed on shutdown)."""
    target = settings.grpc_address()
    holder: dict[str, Any] = {}

    def stub() -> generation_service_pb2_grpc.GenerationServiceStub:
        if "stub" not in holder:
            holder["channel"] = grpc.aio.insecure_channel(target, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_permit_without_calls", 0),
            ])
            holder["stub"] = generation_service_pb2_grpc.GenerationServiceStub(holder["channel"])
        return holder["stub"]

    def endpoint_handler(ep: _Endpoint) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Any:
            body = await request.body()
            try:
                text = body.decode("utf-8")
                parsed = json.loads(text) if text.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return _error_response(http_error(400, f"We could not parse the JSON body of your request: {e}"))
            if not isinstance(parsed, dict):
                return _error_response(http_error(400, "The request body must be a JSON object."))
            try:
                req = json_format.Parse(text, ep.request_cls(), ignore_unknown_fields=True)
            except json_format.ParseError as e:
                return _error_response(http_error(400, f"Invalid request body: {e}"))
            md, timeout = _metadata_and_timeout(request)
            s = stub()
            if not req.stream:
                try:
                    resp = await getattr(s, ep.unary_method)(req, metadata=md, timeout=timeout)
                except grpc.aio.AioRpcError as e:
                    return _error_response(from_rpc_error(e))
                return Response(json.dumps(json_format.MessageToDict(resp, preserving_proto_field_name=True),
                                           separators=(",", ":"), ensure_ascii=False).encode(),
                                media_type="application/json")
            call = getattr(s, ep.stream_method)(req, metadata=md, timeout=timeout)
            try:
                iterator, first = await await_first_message(call, request.receive)
            except grpc.aio.AioRpcError as e:
                return _error_response(from_rpc_error(e))
            if first is DISCONNECTED:
                return Response(status_code=499)  # nobody is listening any more
            include_usage = req.HasField("stream_options") and req.stream_options.include_usage
            return _SSEStream(call, iterator, first, include_usage)

        return handle

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error_response(http_error(404, f"Unknown request URL: {request.method} {request.url.path}."))

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return _error_response(http_error(405, f"Method {request.method} is not allowed on {request.url.path}."))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("bridge failure", exc_info=exc)
        return _error_response(http_error(500, "The bridge failed to process the request."))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            channel = holder.pop("channel", None)
            holder.pop("stub", None)
            if channel is not None:
                await channel.close()

    from genrpc.bridge import dashscope, responses_sse  # they import helpers from this module

    routes = [Route("/health", health, methods=["GET"])]
    routes += [Route(path, endpoint_handler(ep), methods=["POST"]) for path, ep in ENDPOINTS.items()]
    routes += dashscope.routes(stub)  # DashScope-style route (docs/dashscope.md)
    routes += responses_sse.routes(stub)  # POST /v1/responses (OpenAI Responses API SSE)
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error})
    app.state.grpc_target = target
    return app


__all__ = ["create_app", "chunk_to_json", "frame", "from_grpc_status", "ENDPOINTS"]
