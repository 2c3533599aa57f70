"""The DashScope-style route: DashScope's native text-generation API in, the same `Chat`/`Generate` RPCs out.

`POST /api/v1/services/aigc/text-generation/generation` with `{"model", "input": {"messages"|"prompt"},
"parameters": {...}}`, answered as `{"output": {...}, "usage": {"input_tokens", "output_tokens",
"total_tokens"}, "request_id"}`. Envoy routes the `/api/v1/services/aigc/` prefix here (both stream and
non-stream). See docs/dashscope.md for the parameter mapping.

What this follows of DashScope's real API (checked against its documentation and official SDK, not guessed):
- endpoint, body and response shapes, `result_format` `text` (default) | `message`, `incremental_output`,
  usage names: DashScope API reference https://help.aliyun.com/en/model-studio/qwen-api-via-dashscope and
  https://docs.qwencloud.com/api-reference/chat/dashscope ;
- parameters accepted by `dashscope.Generation.call` (temperature, top_p, top_k (0 = off), seed, max_tokens,
  stop (strings or token-id lists), repetition_penalty, enable_search, result_format, incremental_output):
  github.com/dashscope/dashscope-sdk-python dashscope/aigc/generation.py ;
- streaming is asked for with the request header `X-DashScope-SSE: enable` (the SDK also sends
  `Accept: text/event-stream`): dashscope-sdk-python dashscope/api_entities/http_request.py ;
- SSE framing `id:N` / `event:result` / `:HTTP_STATUS/200` / `data:{json}` (no space after the colon), with
  `"finish_reason": "null"` (a string) until the last event; errors as `event:error` (the SDK's stream parser,
  dashscope/common/utils.py `_handle_stream`, treats `event:error` as a failure and reads `code`/`message`
  from its data); examples in the DashScope docs (web search / code interpreter pages);
- error body `{"code", "message", "request_id"}` with codes from DashScope's status-code table
  (https://help.aliyun.com/zh/model-studio/developer-reference/error-code), rendered by bridge/errors.py from
  the same gRPC-status table as the OpenAI errors.

Policy: every DashScope parameter is either mapped onto a field of the OpenAI-shaped protobuf request (the
service then honours it or refuses it with INVALID_ARGUMENT, which comes back here as a DashScope
`InvalidParameter`), consumed by this module (`result_format`, `incremental_output`, `stream`), or refused with
400 `InvalidParameter` naming it. Nothing is silently dropped. Feature switches that are off
(`enable_search: false`, `enable_thinking: false`, `enable_code_interpreter: false`) ask for what the server
does anyway and are accepted.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import Response

from genrpc.bridge.encoding import dumps, loads_object, message_to_dict
from genrpc.bridge.errors import DashScopeError, dashscope_error, from_rpc_error, to_dashscope
from genrpc.bridge.stream import DISCONNECTED, SSEResponse, call_options, first_message
from genrpc.v1 import chat_pb2, completion_pb2

PREFIX = "/api/v1/services/aigc/"
TEXT_GENERATION_PATH = PREFIX + "text-generation/generation"

SSE_HEADERS = [(b"content-type", b"text/event-stream;charset=UTF-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]

# DashScope parameter -> OpenAI (protobuf JSON) field, for both input kinds. `kind` checks the JSON type.
_NUMBER, _INT, _BOOL = "number", "integer", "boolean"
COMMON_PARAMS: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", _NUMBER),
    "top_p": ("top_p", _NUMBER),
    "seed": ("seed", _INT),
    "max_tokens": ("max_tokens", _INT),
    "repetition_penalty": ("repetition_penalty", _NUMBER),
    "presence_penalty": ("presence_penalty", _NUMBER),
    "frequency_penalty": ("frequency_penalty", _NUMBER),
    "n": ("n", _INT),
}
# Only with input.messages (ChatCompletionRequest has them; CompletionRequest does not).
CHAT_ONLY_PARAMS: dict[str, tuple[str, str | None]] = {
    "logprobs": ("logprobs", _BOOL),
    "top_logprobs": ("top_logprobs", _INT),
    "response_format": ("response_format", None),
    "tools": ("tools", None),
    "tool_choice": ("tool_choice", None),
    "parallel_tool_calls": ("parallel_tool_calls", _BOOL),
}
# Consumed by this module.
BRIDGE_PARAMS = {"result_format", "incremental_output", "stream"}
# Feature switches: accepted when false (that is what the server does), refused when true.
OFF_SWITCHES = {"enable_search", "enable_thinking", "enable_code_interpreter"}
RESULT_FORMATS = ("text", "message")


class BadRequest(Exception):
    """A DashScope request this module refuses (400 InvalidParameter naming the parameter)."""

    def __init__(self, message: str, code: str = "InvalidParameter", status: int = 400):
        super().__init__(message)
        self.message, self.code, self.status = message, code, status


@dataclass
class Plan:
    """A translated DashScope request."""

    request: Message  # ChatCompletionRequest or CompletionRequest
    chat: bool
    result_format: str
    incremental: bool
    stream: bool
    n: int


def _check_type(name: str, value: Any, kind: str | None) -> None:
    if kind is None:
        return
    ok = {
        _NUMBER: isinstance(value, (int, float)) and not isinstance(value, bool),
        _INT: isinstance(value, int) and not isinstance(value, bool)
        or isinstance(value, float) and value.is_integer(),
        _BOOL: isinstance(value, bool),
    }[kind]
    if not ok:
        raise BadRequest(f"'parameters.{name}' must be a {kind}, got {dumps(value).decode()}.")


def _stop(value: Any) -> Any:
    """DashScope `stop`: a string, a list of strings, or token-id lists (not supported here)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    if isinstance(value, list) and any(isinstance(s, (list, int)) for s in value):
        raise BadRequest("'parameters.stop' as token ids is not supported by this server; use strings.")
    raise BadRequest("'parameters.stop' must be a string or an array of strings.")


def _message(index: int, m: Any) -> dict[str, Any]:
    """A DashScope message as an OpenAI message. DashScope's multimodal content list `[{"text": ...},
    {"image": ...}]` becomes OpenAI content parts (images are then refused by the service, text-only model)."""
    if not isinstance(m, dict):
        raise BadRequest(f"'input.messages[{index}]' must be an object with 'role' and 'content'.")
    out = dict(m)
    content = m.get("content")
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and "type" not in p and set(p) == {"text"}:
                parts.append({"type": "text", "text": p["text"]})
            elif isinstance(p, dict) and "type" not in p and len(p) == 1 and next(iter(p)) in ("image", "video",
                                                                                                  "audio"):
                kind = next(iter(p))
                parts.append({"type": "image_url", "image_url": {"url": p[kind]}} if kind == "image"
                             else {"type": "input_audio" if kind == "audio" else "file", kind: p[kind]})
            else:
                parts.append(p)
        out["content"] = parts
    return out


def plan_request(body: Any, *, sse_header: bool) -> Plan:
    """DashScope JSON body -> the protobuf request and how to render the answer (raises BadRequest)."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    unknown = sorted(set(body) - {"model", "input", "parameters"})
    if unknown:
        raise BadRequest(f"Unknown field '{unknown[0]}' in the request body; expected 'model', 'input' and "
                         "'parameters'.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("Required parameter \"model\" missing from request.", code="BadRequest.EmptyModel")
    inp = body.get("input")
    if not isinstance(inp, dict) or not inp:
        raise BadRequest("Required input parameter missing from request.", code="BadRequest.EmptyInput")
    params = body.get("parameters", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object.")

    unknown_input = sorted(set(inp) - {"messages", "prompt"})
    if unknown_input:
        raise BadRequest(f"'input.{unknown_input[0]}' is not supported by this server; send 'input.messages' "
                         "or 'input.prompt'.")
    has_messages, has_prompt = "messages" in inp, "prompt" in inp
    if has_messages == has_prompt:
        raise BadRequest("Either \"prompt\" or \"messages\" must exist (and not both).")
    chat = has_messages

    result_format = params.get("result_format", "text")
    if result_format not in RESULT_FORMATS:
        raise BadRequest(f"'parameters.result_format' must be 'text' or 'message', got {dumps(result_format).decode()}.")
    incremental = params.get("incremental_output", False)
    _check_type("incremental_output", incremental, _BOOL)
    stream_param = params.get("stream", None)
    if stream_param is not None:
        _check_type("stream", stream_param, _BOOL)
    stream = sse_header or bool(stream_param)

    req: dict[str, Any] = {"model": model}
    if chat:
        messages = inp["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'input.messages' must be a non-empty array of messages.")
        req["messages"] = [_message(i, m) for i, m in enumerate(messages)]
    else:
        prompt = inp["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'input.prompt' must be a non-empty string.")
        req["prompt"] = prompt

    for name, value in params.items():
        if name in BRIDGE_PARAMS:
            continue
        if value is None:
            continue  # JSON null = not set (as DashScope's SDK omits unset parameters)
        if name in OFF_SWITCHES:
            if value is False:
                continue
            raise BadRequest(f"'parameters.{name}' is not supported by this server (only false is accepted).")
        if name == "top_k":
            _check_type(name, value, _INT)
            if int(value) != 0:  # DashScope: 0 (or absent) disables top-k
                req["top_k"] = int(value)
            continue
        if name == "stop":
            req["stop"] = _stop(value)
            continue
        if name in COMMON_PARAMS:
            target, kind = COMMON_PARAMS[name]
            _check_type(name, value, kind)
            req[target] = int(value) if kind == _INT else value
            continue
        if name in CHAT_ONLY_PARAMS:
            target, kind = CHAT_ONLY_PARAMS[name]
            if not chat:
                if name == "logprobs":  # completions: logprobs = number of alternatives per token
                    _check_type(name, value, _BOOL)
                    if value:
                        req["logprobs"] = int(params.get("top_logprobs") or 0)
                    continue
                if name == "top_logprobs":
                    _check_type(name, value, _INT)
                    if not params.get("logprobs"):
                        raise BadRequest("'parameters.top_logprobs' needs 'parameters.logprobs': true.")
                    continue
                raise BadRequest(f"'parameters.{name}' needs 'input.messages' (it is not supported with "
                                 "'input.prompt').")
            _check_type(name, value, kind)
            req[target] = int(value) if kind == _INT else value
            continue
        raise BadRequest(f"'parameters.{name}' is not supported by this server.")

    n = int(req.get("n", 1) or 1)
    if n > 1 and result_format == "text":
        raise BadRequest("'parameters.n' greater than 1 needs 'parameters.result_format': 'message'.")
    if stream:
        req["stream_options"] = {"include_usage": True}
    cls = chat_pb2.ChatCompletionRequest if chat else completion_pb2.CompletionRequest
    try:
        message = json_format.ParseDict(req, cls())
    except json_format.ParseError as e:
        raise BadRequest(f"Invalid request: {e}") from e
    return Plan(message, chat, result_format, bool(incremental), stream, n)


# ---- rendering ----------------------------------------------------------------------------------------------

def _usage(u: dict[str, Any] | None) -> dict[str, int] | None:
    if not u:
        return None
    return {"input_tokens": int(u.get("prompt_tokens", 0)), "output_tokens": int(u.get("completion_tokens", 0)),
            "total_tokens": int(u.get("total_tokens", 0))}


def _choice_message(content: str, tool_calls: list[dict[str, Any]] | None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def _output(plan: Plan, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """choices: [{"index", "text", "tool_calls", "finish_reason", "logprobs"}] -> DashScope `output`."""
    if plan.result_format == "text":
        c = choices[0] if choices else {"text": "", "finish_reason": "null"}
        return {"text": c["text"], "finish_reason": c["finish_reason"]}
    out = []
    for c in choices:
        d: dict[str, Any] = {"finish_reason": c["finish_reason"],
                             "message": _choice_message(c["text"], c.get("tool_calls"))}
        if plan.n > 1:
            d["index"] = c["index"]
        if c.get("logprobs") is not None:
            d["logprobs"] = c["logprobs"]
        out.append(d)
    return {"choices": out}


def render_unary(plan: Plan, resp: Message, request_id: str) -> dict[str, Any]:
    d = message_to_dict(resp)
    choices = []
    for c in d.get("choices", []):
        if plan.chat:
            m = c.get("message", {})
            text = m.get("content") or ""
            tool_calls = m.get("tool_calls")
        else:
            text, tool_calls = c.get("text", ""), None
        choices.append({"index": c.get("index", 0), "text": text, "tool_calls": tool_calls,
                        "finish_reason": c.get("finish_reason") or "stop", "logprobs": c.get("logprobs")})
    choices.sort(key=lambda c: c["index"])
    out: dict[str, Any] = {"output": _output(plan, choices)}
    usage = _usage(d.get("usage"))
    if usage:
        out["usage"] = usage
    out["request_id"] = request_id
    return out


def sse_event(event_id: int, data: dict[str, Any]) -> bytes:
    return f"id:{event_id}\nevent:result\n:HTTP_STATUS/200\ndata:".encode() + dumps(data) + b"\n\n"


@dataclass
class _ChoiceState:
    index: int
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)


def _merge_tool_calls(acc: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """OpenAI tool-call deltas (first: index/id/type/name; then argument pieces) -> whole calls."""
    for d in deltas:
        i = int(d.get("index", len(acc)))
        while len(acc) <= i:
            acc.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = acc[i]
        if d.get("id"):
            call["id"] = d["id"]
        if d.get("type"):
            call["type"] = d["type"]
        fn = d.get("function") or {}
        if fn.get("name"):
            call["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            call["function"]["arguments"] += fn["arguments"]


class StreamRenderer:
    """gRPC stream messages -> DashScope SSE events (cumulative or incremental output); a `stream.Renderer`."""

    headers = SSE_HEADERS

    def __init__(self, plan: Plan, request_id: str):
        self.plan = plan
        self.request_id = request_id
        self.next_id = 1
        self.states: dict[int, _ChoiceState] = {}
        self.usage: dict[str, int] | None = None
        self.held: list[dict[str, Any]] = []  # final events, sent at the end with usage

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        data: dict[str, Any] = {"output": _output(self.plan, choices)}
        if usage:
            data["usage"] = usage
        data["request_id"] = self.request_id
        return data

    def _frame(self, data: dict[str, Any]) -> bytes:
        out = sse_event(self.next_id, data)
        self.next_id += 1
        return out

    def feed(self, msg: Message) -> bytes:
        d = message_to_dict(msg)
        if d.get("usage"):
            self.usage = _usage(d["usage"])
        out = b""
        for c in d.get("choices", []):
            idx = int(c.get("index", 0))
            st = self.states.setdefault(idx, _ChoiceState(idx))
            if self.plan.chat:
                delta = c.get("delta", {})
                piece, tc_deltas = delta.get("content") or "", delta.get("tool_calls") or []
            else:
                piece, tc_deltas = c.get("text") or "", []
            finish = c.get("finish_reason")
            logprobs = c.get("logprobs")
            st.text += piece
            _merge_tool_calls(st.tool_calls, tc_deltas)
            lp_piece = None
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                st.logprobs.extend(logprobs["content"])
                lp_piece = logprobs
            if not piece and not tc_deltas and not finish and lp_piece is None:
                continue  # nothing new (e.g. the role-only first chunk)
            if self.plan.incremental:
                choice = {"index": idx, "text": piece, "tool_calls": tc_deltas or None,
                          "finish_reason": finish or "null", "logprobs": lp_piece}
            else:
                choice = {"index": idx, "text": st.text, "tool_calls": list(st.tool_calls) or None,
                          "finish_reason": finish or "null",
                          "logprobs": {"content": list(st.logprobs)} if st.logprobs else None}
            if finish:
                self.held.append(choice)  # sent at the end, with the usage (which may come in a later message)
            else:
                out += self._frame(self._event([choice], None))
        return out

    def finish(self) -> bytes:
        if not self.held:
            return self._frame(self._event([], self.usage)) if self.usage else b""
        out = b""
        for i, choice in enumerate(self.held):
            out += self._frame(self._event([choice], self.usage if i == len(self.held) - 1 else None))
        self.held = []
        return out

    def error(self, error: grpc.aio.AioRpcError) -> bytes:
        return to_dashscope(from_rpc_error(error), self.request_id).sse_event(self.next_id)


def _error_response(err: DashScopeError) -> Response:
    return Response(err.json_bytes(), status_code=err.status, media_type="application/json")


def _wants_sse(request: Request) -> bool:
    return (request.headers.get("x-dashscope-sse", "").strip().lower() == "enable"
            or "text/event-stream" in request.headers.get("accept", "").lower())


async def text_generation(request: Request) -> Response | SSEResponse:
    """POST /api/v1/services/aigc/text-generation/generation."""
    request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
    try:
        try:
            body = loads_object(await request.body())
        except ValueError as e:
            raise BadRequest(f"The request body is not valid JSON: {e}.") from e
        plan = plan_request(body, sse_header=_wants_sse(request))
    except BadRequest as e:
        return _error_response(dashscope_error(e.status, e.code, e.message, request_id))
    metadata, timeout = call_options(request.headers)
    if not any(k == "x-request-id" for k, _ in metadata):
        metadata.append(("x-request-id", request_id))
    stub = request.app.state.upstream.stub
    if not plan.stream:
        method = stub.CreateChatCompletion if plan.chat else stub.CreateCompletion
        try:
            resp = await method(plan.request, metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            return _error_response(to_dashscope(from_rpc_error(e), request_id))
        return Response(dumps(render_unary(plan, resp, request_id)), media_type="application/json")
    renderer = StreamRenderer(plan, request_id)  # before the call: nothing may fail between it and its response
    call = (stub.Chat if plan.chat else stub.Generate)(plan.request, metadata=metadata, timeout=timeout)
    try:
        reader, first = await first_message(call, request.receive)
    except grpc.aio.AioRpcError as e:
        return _error_response(to_dashscope(from_rpc_error(e), request_id))
    if first is DISCONNECTED:
        return Response(status_code=499)
    return SSEResponse(reader, first, renderer)


async def unknown_api(request: Request) -> Response:
    """Any other path under the DashScope prefix."""
    request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
    return _error_response(dashscope_error(
        404, "InvalidURL", f"Unknown DashScope API: {request.method} {request.url.path}; this server offers "
                           f"POST {TEXT_GENERATION_PATH}.", request_id))
