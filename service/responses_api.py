"""The OpenAI Responses API and token counting on GenerationService (a mixin of GenerationServicer).

A Responses request is converted into a ChatCompletionRequest and run through the chat path itself
(`_prepare_chat`: validation, chat template, constraints; `_events`: the engine), so every option behaves as
in chat. Field names in the chat path's errors are renamed back to the Responses names (`messages[3]` →
`input[2]`, `response_format` → `text.format`, ...). Stored responses live in service.response_store.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from genrpc.v1 import chat_pb2, responses_pb2
from genrpc.service import validation
from genrpc.service.admission import within_capacity
from genrpc.service.errors import InvalidArgument, ModelNotFound, ServiceError, UnsupportedParameter
from genrpc.service.interceptor import reported_error
from genrpc.service.response_store import ResponseStore, StoredResponse
from genrpc.service.responses import NULL, json_value, string_value
# Chat's canonical JSON (deterministic key order for prompts and grammars), so tools render exactly as in chat.
from genrpc.service.validation import as_json, canonical_json

MAX_METADATA_KEYS = 16
MAX_INPUT_ITEMS_PAGE = 100
_EMPTY_LIST = struct_pb2.ListValue()
# Refused request fields: (field, why). Each is refused when present (and, for booleans, true).
_REFUSED = {
    "reasoning": "applies to reasoning models; the served model does not reason",
    "include": "(extra output data such as logprobs or encrypted reasoning) is not supported",
    "top_logprobs": "(token log probabilities) is not supported on the Responses API",
    "conversation": "(stored conversations) is not supported; continue with 'previous_response_id'",
    "prompt": "(stored prompt templates) is not supported; send 'input' and 'instructions'",
    "max_tool_calls": "caps built-in tool calls, which are not supported",
    "prompt_cache_retention": "is not supported",
    "context_management": "(server-side compaction) is not supported",
    "moderation": "is not supported",
    "image": "(image output) is not supported: the served model writes text",
    "access_programs": "(programmatic tool calling) is not supported",
    "prompt_cache_options": "is not supported",
}


class ResponseNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "RESPONSE_NOT_FOUND"

    def __init__(self, response_id: str, param: str):
        super().__init__(f"No response with id '{response_id}' is stored on this server (it never existed, was "
                         "created with 'store': false, was deleted, or its retention ended).",
                         field_violations=[(param, "unknown response id")],
                         metadata={"param": param, "response_id": response_id})


class StoreFailure(ServiceError):
    reason = "RESPONSE_STORE_FAILURE"


async def _in_store(call, *args):
    """Runs a blocking store call in a thread; SQLite failures (disk full, unwritable cache_dir) say so."""
    try:
        return await asyncio.to_thread(call, *args)
    except (sqlite3.Error, OSError) as exc:
        raise StoreFailure(f"The response store failed: {exc}. Send 'store': false to skip it.") from exc


def _hex() -> str:
    return uuid.uuid4().hex


def _is_set(request: Any, name: str) -> bool:
    if request.DESCRIPTOR.fields_by_name[name].is_repeated:
        return len(getattr(request, name)) > 0
    if not request.HasField(name):
        return False
    value = getattr(request, name)
    if isinstance(value, struct_pb2.Value):
        return value.WhichOneof("kind") not in (None, "null_value")
    if isinstance(value, (struct_pb2.Struct, struct_pb2.ListValue)):
        return len(value) > 0 if isinstance(value, struct_pb2.ListValue) else len(value.fields) > 0
    return value not in (False, "")


# ---- request conversion ---------------------------------------------------------------------------------

@dataclass
class _Converted:
    """A Responses request as a chat request, plus what the response and the store need."""

    chat: chat_pb2.ChatCompletionRequest
    sources: list[str]  # per chat message: the Responses field it came from (for error names)
    input_items: list[dict[str, Any]]  # ResponseItem JSON of the request's own input
    conversation: list[dict[str, Any]]  # chat messages (history + input), instructions excluded
    tools: list[dict[str, Any]] = field(default_factory=list)  # the Responses tools, echoed back
    tool_choice: Any = "auto"
    text: dict[str, Any] = field(default_factory=lambda: {"format": {"type": "text"}})


def _text_of_parts(name: str, content: Any, allow_images: bool) -> Any:
    """A Responses message content → a chat content (string, or chat parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidArgument(name, f"'{name}' must be a string or an array of content parts.")
    parts = []
    for index, part in enumerate(content):
        part_name = f"{name}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and allow_images:
            if part.get("file_id"):
                raise UnsupportedParameter(f"{part_name}.file_id", f"'{part_name}.file_id' (uploaded files) is not "
                                                                   "supported; send 'image_url'.")
            image = {"url": part.get("image_url")}
            if part.get("detail") is not None:
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind in ("input_image", "input_file", "input_audio"):
            # The chat path refuses images on a text-only model with the model-specific message.
            parts.append({"type": {"input_image": "image_url", "input_file": "file",
                                   "input_audio": "input_audio"}[kind]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        else:
            raise InvalidArgument(part_name, f"'{part_name}' must be a content part like "
                                             "{'type': 'input_text', 'text': ...}.")
    return parts


def _input_item(item: dict[str, Any], kind: str) -> dict[str, Any]:
    """The ResponseItem JSON of one input item (what ListInputItems returns)."""
    if kind == "message":
        content = item["content"]
        if isinstance(content, str):
            content = [{"type": "input_text" if item["role"] != "assistant" else "output_text", "text": content}]
        parts = []
        for part in content:
            if part.get("type") == "input_image":
                parts.append({k: part[k] for k in ("type", "image_url", "detail") if part.get(k) is not None})
            elif part.get("type") == "output_text":
                parts.append({"type": "output_text", "text": part.get("text", ""), "annotations": []})
            else:
                parts.append({"type": part.get("type"), "text": part.get("text", part.get("refusal", ""))})
        return {"id": item.get("id") or f"msg_{_hex()}", "type": "message", "role": item["role"],
                "status": "completed", "content": parts}
    if kind == "function_call":
        return {"id": item.get("id") or f"fc_{_hex()}", "type": "function_call", "status": "completed",
                "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
    return {"id": item.get("id") or f"fco_{_hex()}", "type": "function_call_output", "status": "completed",
            "call_id": item["call_id"], "output": item["output"]}


def _input_messages(value: Any, allow_images: bool) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """`input` → chat messages (chat request JSON), their source names, and the input items."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}], ["input"], [_input_item(
            {"role": "user", "content": value}, "message")]
    if not isinstance(value, list) or not value:
        raise InvalidArgument("input", "'input' must be a string or a non-empty array of input items.")
    messages: list[dict[str, Any]] = []
    sources: list[str] = []
    items: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        name = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidArgument(name, f"'{name}' must be an input item object.")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidArgument(f"{name}.role", f"'{name}.role' must be one of 'user', 'assistant', 'system', "
                                                      f"'developer', got {role!r}.")
            content = _text_of_parts(f"{name}.content", item.get("content"), allow_images)
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str) or (key != "arguments" and not item[key]):
                    raise InvalidArgument(f"{name}.{key}", f"'{name}.{key}' is required (a string).")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant":
                # One assistant turn: its text, then its calls (OpenAI lists them as separate items).
                messages[-1].setdefault("tool_calls", []).append(call)
                messages[-1]["content"] = messages[-1]["content"] or None
                items.append(_input_item(item, kind))
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise InvalidArgument(f"{name}.call_id", f"'{name}.call_id' is required (a string).")
            if not isinstance(output, str):
                raise InvalidArgument(f"{name}.output", f"'{name}.output' must be a string.")
            item = {**item, "output": output}
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "item_reference":
            raise UnsupportedParameter(f"{name}.type", f"'{name}.type' item_reference is not supported; continue "
                                                       "with 'previous_response_id' or send the item itself.")
        else:
            raise UnsupportedParameter(f"{name}.type", f"'{name}.type' is {kind!r}; only 'message', "
                                                       "'function_call' and 'function_call_output' items are "
                                                       "supported.")
        sources.append(name)
        items.append(_input_item(item, kind))
    return messages, sources, items


def _tools(request: responses_pb2.CreateResponseRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the Responses tools as given, the same tools in chat shape)."""
    given, chat_tools = [], []
    for index, tool in enumerate(request.tools):
        data = canonical_json(tool, f"tools[{index}]")
        kind = data.get("type")
        if kind != "function":
            raise UnsupportedParameter(f"tools[{index}].type", f"'tools[{index}].type' is {kind!r}: built-in tools "
                                                               "are not supported; only 'function' tools are.")
        function = {k: data[k] for k in ("name", "description", "parameters", "strict") if data.get(k) is not None}
        # Echoed as given: `strict` is not enforced under tool_choice auto (as in chat), so no default is claimed.
        given.append({"type": "function", "name": data.get("name", ""), "description": data.get("description"),
                      "parameters": data.get("parameters"), "strict": data.get("strict")})
        chat_tools.append({"type": "function", "function": function})
    return given, chat_tools


def _tool_choice(request: responses_pb2.CreateResponseRequest) -> tuple[Any, Any]:
    """(the tool choice to echo, the chat tool_choice or None)."""
    if not _is_set(request, "tool_choice"):
        return "auto", None
    choice = as_json(request.tool_choice, "tool_choice")
    if choice in ("none", "auto", "required"):
        return choice, choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "name": choice["name"]}, {"type": "function", "function": {"name": choice["name"]}}
    raise UnsupportedParameter("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                                              "{'type': 'function', 'name': ...}; built-in tool choices and "
                                              "allowed_tools are not supported.")


def _text_format(request: responses_pb2.CreateResponseRequest) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the text config to echo, the chat response_format or None)."""
    if request.text.HasField("verbosity"):
        raise UnsupportedParameter("text.verbosity", "'text.verbosity' has no effect on the served models, so it "
                                                     "is refused rather than ignored.")
    if not request.text.HasField("format"):
        return {"format": {"type": "text"}}, None
    fmt = canonical_json(request.text.format, "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return {"format": {"type": "text"}}, None
    if kind == "json_object":
        return {"format": fmt}, {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise InvalidArgument("text.format.name", "'text.format.name' is required for type 'json_schema'.")
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"format": {"strict": False, **fmt}}, {"type": "json_schema", "json_schema": schema}
    raise InvalidArgument("text.format.type", "'text.format.type' must be 'text', 'json_object' or 'json_schema', "
                                              f"got {kind!r}.")


def _refusals(request: responses_pb2.CreateResponseRequest) -> None:
    if request.background:
        raise UnsupportedParameter("background", "'background' is not supported: responses run within the request.")
    for name, why in _REFUSED.items():
        if _is_set(request, name):
            raise UnsupportedParameter(name, f"'{name}' {why}.")
    if request.service_tier not in ("", "auto", "default"):
        raise UnsupportedParameter("service_tier", "'service_tier' may only be 'auto' or 'default' here.")
    unknown = set(request.stream_options.fields) - {"include_obfuscation"}
    if unknown:
        raise InvalidArgument("stream_options", f"'stream_options' has unknown field(s) {sorted(unknown)}.")
    if len(request.metadata) > MAX_METADATA_KEYS:
        raise InvalidArgument("metadata", f"'metadata' holds {len(request.metadata)} keys; at most "
                                          f"{MAX_METADATA_KEYS} are allowed.")


_COPIED = ("temperature", "top_p", "parallel_tool_calls", "seed", "stop", "top_k", "min_p", "repetition_penalty",
           "frequency_penalty", "presence_penalty", "truncation", "stream_interval")


def convert(request: responses_pb2.CreateResponseRequest, history: list[dict[str, Any]],
            allow_images: bool) -> _Converted:
    """The chat request for a Responses request; `history` is the stored conversation of previous_response_id."""
    _refusals(request)
    if not _is_set(request, "input"):
        raise InvalidArgument("input", "'input' is required.")
    messages, sources, items = _input_messages(as_json(request.input, "input"), allow_images)
    given_tools, chat_tools = _tools(request)
    echo_choice, chat_choice = _tool_choice(request)
    text, response_format = _text_format(request)
    conversation = [*history, *messages]
    chat: dict[str, Any] = {"model": request.model}
    prefix, prefix_sources = [], []
    if request.HasField("instructions") and request.instructions:
        prefix, prefix_sources = [{"role": "system", "content": request.instructions}], ["instructions"]
    chat["messages"] = [*prefix, *history, *messages]
    if request.HasField("max_output_tokens"):
        chat["max_completion_tokens"] = request.max_output_tokens
    if chat_tools:
        chat["tools"] = chat_tools
    if chat_choice is not None:
        chat["tool_choice"] = chat_choice
    if response_format is not None:
        chat["response_format"] = response_format
    chat_request = json_format.ParseDict(chat, chat_pb2.ChatCompletionRequest())
    for name in _COPIED:
        if request.HasField(name):
            target = getattr(chat_request, name)
            if isinstance(target, struct_pb2.Value):
                target.CopyFrom(getattr(request, name))
            else:
                setattr(chat_request, name, getattr(request, name))
    return _Converted(chat_request, [*prefix_sources, *(["previous_response_id"] * len(history)), *sources],
                      items, conversation, given_tools, echo_choice, text)


_RENAMES = [(re.compile(r"\bmax_(completion_)?tokens\b"), "max_output_tokens"),
            (re.compile(r"\bresponse_format\.json_schema\.schema\b"), "text.format.schema"),
            (re.compile(r"\bresponse_format\b"), "text.format"),
            (re.compile(r"\btools\[(\d+)\]\.function\."), r"tools[\1].")]


def _rename_fields(error: InvalidArgument, sources: list[str]) -> InvalidArgument:
    """Rewrites a chat-path error's field names (in field, message and metadata) into Responses names."""
    def rename(text: str) -> str:
        text = re.sub(r"\bmessages\[(\d+)\]",
                      lambda m: sources[int(m[1])] if int(m[1]) < len(sources) else m[0], text)
        text = re.sub(r"'messages'", "'input'", text)
        for pattern, replacement in _RENAMES:
            text = pattern.sub(replacement, text)
        return text

    error.field = rename(error.field)
    error.message = rename(error.message)
    error.field_violations = [(rename(f), rename(d)) for f, d in error.field_violations]
    if "param" in error.metadata:
        error.metadata["param"] = rename(error.metadata["param"])
    return error


# ---- building the Response ------------------------------------------------------------------------------

def _message_item(item_id: str, text: str | None, status: str) -> responses_pb2.ResponseItem:
    content = [] if text is None else [responses_pb2.ResponseContentPart(
        type="output_text", text=text, annotations=_EMPTY_LIST, logprobs=_EMPTY_LIST)]
    return responses_pb2.ResponseItem(id=item_id, type="message", status=status, role="assistant", content=content)


def _function_item(item_id: str, call, status: str, arguments: str | None = None) -> responses_pb2.ResponseItem:
    return responses_pb2.ResponseItem(id=item_id, type="function_call", status=status, call_id=call.id,
                                      name=call.name, arguments=call.arguments if arguments is None else arguments)


@dataclass
class _Run:
    """The state of one response being generated."""

    response: responses_pb2.Response
    converted: _Converted
    sequence: int = 0
    items: list[responses_pb2.ResponseItem] = field(default_factory=list)
    open_message: int | None = None  # output index of the message item being written
    text: list[str] = field(default_factory=list)

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence - 1


class ResponsesMixin:
    """GenerationService's Responses API, tokenizer and store RPCs (mixed into GenerationServicer, whose
    `_prepare_chat`, `_events`, `_request_stream_interval` and `_render_chat` it uses)."""

    _response_store: ResponseStore | None = None

    def _store(self) -> ResponseStore:
        if self._response_store is None:
            raise ServiceError("the response store is not configured")
        return self._response_store

    async def _stored(self, response_id: str, param: str) -> StoredResponse:
        stored = await _in_store(self._store().get, response_id) if response_id else None
        if stored is None:
            raise ResponseNotFound(response_id, param)
        return stored

    async def _convert(self, request: responses_pb2.CreateResponseRequest) -> _Converted:
        self._check_ready()
        history: list[dict[str, Any]] = []
        if request.previous_response_id:
            history = (await self._stored(request.previous_response_id, "previous_response_id")).conversation
        return convert(request, history, self._engine.model_info.accepts_images)

    async def _prepare_response(self, request: responses_pb2.CreateResponseRequest):
        converted = await self._convert(request)
        try:
            prepared = await self._prepare_chat(converted.chat)
        except InvalidArgument as error:
            raise _rename_fields(error, converted.sources) from None
        return converted, prepared

    def _new_response(self, request: responses_pb2.CreateResponseRequest, converted: _Converted, model: str):
        decoding_temperature = request.temperature if request.HasField("temperature") else 1.0
        response = responses_pb2.Response(
            id=f"resp_{_hex()}", object="response", created_at=int(time.time()), status="in_progress",
            error=NULL, incomplete_details=NULL,
            instructions=string_value(request.instructions) if request.instructions else NULL,
            model=model, parallel_tool_calls=request.parallel_tool_calls if request.HasField(
                "parallel_tool_calls") else True,
            previous_response_id=string_value(request.previous_response_id) if request.previous_response_id else NULL,
            temperature=decoding_temperature, top_p=request.top_p if request.HasField("top_p") else 1.0,
            tool_choice=json_value(converted.tool_choice),
            tools=json_format.ParseDict(converted.tools, struct_pb2.ListValue()),
            text=json_format.ParseDict(converted.text, struct_pb2.Struct()),
            truncation=request.truncation or "disabled", metadata=dict(request.metadata),
            store=request.store if request.HasField("store") else True, background=False, reasoning=NULL,
            service_tier="default")
        if request.HasField("max_output_tokens"):
            response.max_output_tokens = request.max_output_tokens
        if request.HasField("user"):
            response.user = request.user
        return response

    async def _generate(self, run: _Run, prepared,
                        stream_interval: int = 0) -> AsyncIterator[responses_pb2.ResponseStreamEvent]:
        """The events after response.in_progress, up to and including the terminal one."""
        Event = responses_pb2.ResponseStreamEvent

        def close_message(status: str):
            index = run.open_message
            run.open_message = None
            text = "".join(run.text)
            item = run.items[index]
            item.status = status
            item.content[0].text = text
            part = item.content[0]
            sequence = run.next_sequence
            yield Event(output_text_done=responses_pb2.ResponseOutputTextDoneEvent(
                type="response.output_text.done", sequence_number=sequence(), item_id=item.id, output_index=index,
                content_index=0, text=text, logprobs=_EMPTY_LIST))
            yield Event(content_part_done=responses_pb2.ResponseContentPartEvent(
                type="response.content_part.done", sequence_number=sequence(), item_id=item.id, output_index=index,
                content_index=0, part=part))
            yield Event(output_item_done=responses_pb2.ResponseOutputItemEvent(
                type="response.output_item.done", sequence_number=sequence(), output_index=index, item=item))

        def open_message():
            index = len(run.items)
            item = _message_item(f"msg_{_hex()}", None, "in_progress")
            run.items.append(item)
            run.open_message, run.text = index, []
            yield Event(output_item_added=responses_pb2.ResponseOutputItemEvent(
                type="response.output_item.added", sequence_number=run.next_sequence(), output_index=index,
                item=item))
            part = responses_pb2.ResponseContentPart(type="output_text", text="", annotations=_EMPTY_LIST,
                                                     logprobs=_EMPTY_LIST)
            item.content.append(part)
            yield Event(content_part_added=responses_pb2.ResponseContentPartEvent(
                type="response.content_part.added", sequence_number=run.next_sequence(), item_id=item.id,
                output_index=index, content_index=0, part=part))

        finish, completion_tokens, cached = None, 0, 0
        async for event, _ in self._events(prepared, stream_interval):
            if event.text:
                if run.open_message is None:
                    for out in open_message():
                        yield out
                run.text.append(event.text)
                yield Event(output_text_delta=responses_pb2.ResponseOutputTextDeltaEvent(
                    type="response.output_text.delta", sequence_number=run.next_sequence(),
                    item_id=run.items[run.open_message].id, output_index=run.open_message, content_index=0,
                    delta=event.text, logprobs=_EMPTY_LIST))
            for call in event.tool_calls:
                if run.open_message is not None:
                    for out in close_message("completed"):
                        yield out
                index = len(run.items)
                item = _function_item(f"fc_{_hex()}", call, "in_progress", arguments="")
                run.items.append(item)
                yield Event(output_item_added=responses_pb2.ResponseOutputItemEvent(
                    type="response.output_item.added", sequence_number=run.next_sequence(), output_index=index,
                    item=item))
                yield Event(function_call_arguments_delta=responses_pb2.ResponseFunctionCallArgumentsDeltaEvent(
                    type="response.function_call_arguments.delta", sequence_number=run.next_sequence(),
                    item_id=item.id, output_index=index, delta=call.arguments))
                yield Event(function_call_arguments_done=responses_pb2.ResponseFunctionCallArgumentsDoneEvent(
                    type="response.function_call_arguments.done", sequence_number=run.next_sequence(),
                    item_id=item.id, output_index=index, name=call.name, arguments=call.arguments))
                item.arguments, item.status = call.arguments, "completed"
                yield Event(output_item_done=responses_pb2.ResponseOutputItemEvent(
                    type="response.output_item.done", sequence_number=run.next_sequence(), output_index=index,
                    item=item))
            if event.finish_reason:
                finish, completion_tokens, cached = event.finish_reason, event.completion_tokens, event.cached_tokens
        incomplete = finish == "length"
        if run.open_message is None and not run.items:  # no text and no calls: still one (empty) message
            for out in open_message():
                yield out
        if run.open_message is not None:
            for out in close_message("incomplete" if incomplete else "completed"):
                yield out
        response = run.response
        response.status = "incomplete" if incomplete else "completed"
        if incomplete:
            response.incomplete_details.CopyFrom(json_value({"reason": "max_output_tokens"}))
        response.completed_at = int(time.time())
        del response.output[:]
        response.output.extend(run.items)
        response.usage.CopyFrom(responses_pb2.ResponseUsage(
            input_tokens=prepared.prompt_tokens, output_tokens=completion_tokens,
            total_tokens=prepared.prompt_tokens + completion_tokens,
            input_tokens_details=responses_pb2.ResponseInputTokensDetails(cached_tokens=cached, cache_write_tokens=0),
            output_tokens_details=responses_pb2.ResponseOutputTokensDetails(reasoning_tokens=0)))
        if response.store:
            await self._save(run)
        terminal = responses_pb2.ResponseLifecycleEvent(
            type="response.incomplete" if incomplete else "response.completed", sequence_number=run.next_sequence(),
            response=response)
        yield Event(incomplete=terminal) if incomplete else Event(completed=terminal)

    async def _save(self, run: _Run) -> None:
        text = "".join(p.text for item in run.items if item.type == "message" for p in item.content)
        calls = [{"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
                 for item in run.items if item.type == "function_call"]
        reply: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            reply["tool_calls"] = calls
        stored = StoredResponse(json_format.MessageToDict(run.response, preserving_proto_field_name=True),
                                run.converted.input_items, [*run.converted.conversation, reply])
        await _in_store(self._store().put, run.response.id, stored)

    # ---- RPCs ------------------------------------------------------------------------------------------
    # Like every GenerationService method, these only return or yield messages and raise; service.interceptor
    # maps the errors, counts and logs each RPC.

    @within_capacity
    async def CreateResponse(self, request: responses_pb2.CreateResponseRequest, context):
        if request.stream:
            raise InvalidArgument("stream", "'stream' is true; call the streaming StreamResponse RPC instead.")
        converted, prepared = await self._prepare_response(request)
        run = _Run(self._new_response(request, converted, prepared.model), converted)
        async with contextlib.aclosing(self._generate(run, prepared)) as events:
            async for _ in events:
                pass
        return run.response

    @within_capacity
    async def StreamResponse(self, request: responses_pb2.CreateResponseRequest, context):
        if request.HasField("stream") and not request.stream:
            raise InvalidArgument("stream", "'stream' is false; call CreateResponse for a whole response.")
        converted, prepared = await self._prepare_response(request)
        stream_interval = self._request_stream_interval(converted.chat)
        # created (0) and in_progress (1) are sent with the first output event, so that failures before it
        # (overload, engine errors) stay clean statuses.
        run = _Run(self._new_response(request, converted, prepared.model), converted, sequence=2)
        Event = responses_pb2.ResponseStreamEvent
        started = False
        try:
            async with contextlib.aclosing(self._generate(run, prepared, stream_interval)) as events:
                async for event in events:
                    if not started:
                        started = True
                        yield Event(created=responses_pb2.ResponseLifecycleEvent(
                            type="response.created", sequence_number=0, response=run.response))
                        yield Event(in_progress=responses_pb2.ResponseLifecycleEvent(
                            type="response.in_progress", sequence_number=1, response=run.response))
                    yield event
        except Exception as exc:  # noqa: BLE001 - after the start, failures are events (cancel is not caught)
            if not started:
                raise
            # OpenAI's protocol: an `error` event, then `response.failed`; the RPC itself ends OK.
            error = reported_error("StreamResponse", exc)
            param = error.metadata.get("param")
            yield Event(error=responses_pb2.ResponseErrorEvent(
                type="error", sequence_number=run.next_sequence(), code=error.reason, message=error.message,
                param=string_value(param) if param else NULL))
            run.response.status = "failed"
            run.response.error.CopyFrom(json_value({"code": "server_error", "message": error.message}))
            yield Event(failed=responses_pb2.ResponseLifecycleEvent(
                type="response.failed", sequence_number=run.next_sequence(), response=run.response))

    async def GetResponse(self, request: responses_pb2.GetResponseRequest, context):
        self._check_ready()
        stored = await self._stored(request.response_id, "response_id")
        return json_format.ParseDict(stored.response, responses_pb2.Response())

    async def DeleteResponse(self, request: responses_pb2.DeleteResponseRequest, context):
        self._check_ready()
        if not request.response_id or not await _in_store(self._store().delete, request.response_id):
            raise ResponseNotFound(request.response_id, "response_id")
        return responses_pb2.DeleteResponseResult(id=request.response_id, object="response", deleted=True)

    async def ListInputItems(self, request: responses_pb2.ListInputItemsRequest, context):
        self._check_ready()
        if request.include:
            raise UnsupportedParameter("include", "'include' is not supported.")
        limit = request.limit if request.HasField("limit") else 20
        if not 1 <= limit <= MAX_INPUT_ITEMS_PAGE:
            raise InvalidArgument("limit", f"'limit' must be between 1 and {MAX_INPUT_ITEMS_PAGE}, got {limit}.")
        order = request.order or "desc"
        if order not in ("asc", "desc"):
            raise InvalidArgument("order", f"'order' must be 'asc' or 'desc', got '{order}'.")
        stored = await self._stored(request.response_id, "response_id")
        items = stored.input_items if order == "asc" else stored.input_items[::-1]
        if request.after:
            ids = [item["id"] for item in items]
            if request.after not in ids:
                raise InvalidArgument("after", f"'after' is not an input item id of '{request.response_id}'.")
            items = items[ids.index(request.after) + 1:]
        page = items[:limit]
        data = [json_format.ParseDict(item, responses_pb2.ResponseItem()) for item in page]
        return responses_pb2.ResponseItemList(object="list", data=data, first_id=page[0]["id"] if page else "",
                                              last_id=page[-1]["id"] if page else "", has_more=len(items) > limit)

    async def CountInputTokens(self, request: responses_pb2.CreateResponseRequest, context):
        converted = await self._convert(request)
        if not converted.chat.model:  # OpenAI's counting endpoint does not require the model
            converted.chat.model = self._engine.model_info.model_id
        try:
            job = validation.chat_job(converted.chat, vocab_size=self._engine.tokenizer.vocab_size,
                                      image_input=self._engine.model_info.accepts_images)
            self._check_model(job.model)
        except InvalidArgument as error:
            raise _rename_fields(error, converted.sources) from None
        ids, _, _ = await asyncio.to_thread(self._render_chat, job)
        return responses_pb2.InputTokenCount(object="response.input_tokens", input_tokens=len(ids))

    def _check_tokenizer_model(self, model: str) -> None:
        self._check_ready()
        if model and model != self._engine.model_info.model_id:
            raise ModelNotFound(model)

    async def Tokenize(self, request: responses_pb2.TokenizeRequest, context):
        self._check_tokenizer_model(request.model)
        tokenizer = self._engine.tokenizer
        for name in ("continue_final_message", "chat_template"):
            if _is_set(request, name):
                raise UnsupportedParameter(name, f"'{name}' is not supported: the model's own chat template is "
                                                 "always used.")
        if request.HasField("add_special_tokens") and not request.add_special_tokens:
            raise UnsupportedParameter("add_special_tokens", "'add_special_tokens' false is not supported.")
        if request.HasField("prompt") == bool(request.messages):
            raise InvalidArgument("prompt", "Send exactly one of 'prompt' and 'messages'.")
        if request.HasField("prompt"):
            if request.HasField("add_generation_prompt") or request.tools:
                name = "add_generation_prompt" if request.HasField("add_generation_prompt") else "tools"
                raise InvalidArgument(name, f"'{name}' applies to 'messages' only.")
            ids = await asyncio.to_thread(tokenizer.encode, request.prompt)
        else:
            if request.HasField("add_generation_prompt") and not request.add_generation_prompt:
                raise UnsupportedParameter("add_generation_prompt", "'add_generation_prompt' false is not supported: "
                                                                    "prompts always end with the assistant turn "
                                                                    "header.")
            chat = chat_pb2.ChatCompletionRequest(model=self._engine.model_info.model_id, messages=request.messages,
                                                  tools=request.tools)
            job = validation.chat_job(chat, vocab_size=tokenizer.vocab_size,
                                      image_input=self._engine.model_info.accepts_images)
            ids, _, _ = await asyncio.to_thread(self._render_chat, job)
        strs = [tokenizer.token_bytes(t).decode("utf-8", errors="replace") for t in ids] \
            if request.return_token_strs else []
        return responses_pb2.TokenizeResult(count=len(ids), tokens=ids, token_strs=strs,
                                            max_model_len=self._engine.model_info.context_length_tokens)

    async def Detokenize(self, request: responses_pb2.DetokenizeRequest, context):
        self._check_tokenizer_model(request.model)
        tokenizer = self._engine.tokenizer
        bad = [t for t in request.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise InvalidArgument("tokens", f"'tokens' holds {bad[0]}, outside the vocabulary "
                                            f"(0 to {tokenizer.vocab_size - 1}).")
        text = await asyncio.to_thread(tokenizer.decode, list(request.tokens))
        return responses_pb2.DetokenizeResult(prompt=text)
