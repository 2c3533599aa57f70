"""Domain results → the OpenAI-shaped protobuf pieces that are not plain copies (logprobs, usage, tool calls)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format, struct_pb2

from genrpc.v1 import chat_pb2, common_pb2
from genrpc.service.engines.base import TokenLogprob, Tokenizer
from genrpc.service.tool_calls import ParsedToolCall

NULL = struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)


def string_value(text: str) -> struct_pb2.Value:
    return struct_pb2.Value(string_value=text)


def json_value(data: Any) -> struct_pb2.Value:
    return json_format.ParseDict(data, struct_pb2.Value())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=common_pb2.PromptTokensDetails(cached_tokens=cached_tokens),
        completion_tokens_details=common_pb2.CompletionTokensDetails(reasoning_tokens=0),
    )


def _token(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer: Tokenizer, logprobs: Iterable[TokenLogprob]) -> struct_pb2.Value:
    """OpenAI chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": null}."""
    content = []
    for item in logprobs:
        token, raw = _token(tokenizer, item.token_id)
        top = []
        for token_id, logprob in item.top:
            alt, alt_raw = _token(tokenizer, token_id)
            top.append({"token": alt, "logprob": logprob, "bytes": alt_raw})
        content.append({"token": token, "logprob": item.logprob, "bytes": raw, "top_logprobs": top})
    return json_value({"content": content, "refusal": None})


def completion_logprobs(tokenizer: Tokenizer, logprobs: Iterable[TokenLogprob], text_offset: int) -> struct_pb2.Value:
    """Legacy completions format: parallel arrays plus a token → logprob map per position."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for item in logprobs:
        token, _ = _token(tokenizer, item.token_id)
        tokens.append(token)
        token_logprobs.append(item.logprob)
        top_logprobs.append({_token(tokenizer, t)[0]: lp for t, lp in item.top})
        offsets.append(offset)
        offset += len(token)
    return json_value({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                       "text_offset": offsets})


def tool_call(call: ParsedToolCall) -> chat_pb2.ToolCall:
    return chat_pb2.ToolCall(id=call.id, type="function",
                             function=chat_pb2.FunctionCall(name=call.name, arguments=call.arguments))


def tool_call_deltas(call: ParsedToolCall) -> list[chat_pb2.ToolCallDelta]:
    """OpenAI's streamed form: a header (index, id, type, name) and then the arguments."""
    return [
        chat_pb2.ToolCallDelta(index=call.index, id=call.id, type="function",
                               function=chat_pb2.FunctionCallDelta(name=call.name, arguments="")),
        chat_pb2.ToolCallDelta(index=call.index, function=chat_pb2.FunctionCallDelta(arguments=call.arguments)),
    ]
