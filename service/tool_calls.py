"""Qwen2.5 / Hermes tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the model's text.

`ToolCallParser` consumes streamed text and separates plain content from tool calls. Text inside a
`<tool_call>` block is held until the block closes; a complete block becomes a ParsedToolCall. Text that
only might be the start of `<tool_call>` is held back too, so the tag never leaks into content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from genrpc.service.stop_strings import partial_suffix_length

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


@dataclass(frozen=True)
class ParsedToolCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON object, compact


@dataclass
class ParserOutput:
    content: str = ""
    calls: list[ParsedToolCall] = field(default_factory=list)


class ToolCallParser:
    def __init__(self):
        self._held = ""
        self._inside = False
        self._count = 0

    @property
    def calls_made(self) -> int:
        return self._count

    def feed(self, text: str) -> ParserOutput:
        out = ParserOutput()
        buffer = self._held + text
        self._held = ""
        while buffer:
            if self._inside:
                end = buffer.find(CLOSE_TAG)
                if end < 0:
                    self._held = buffer
                    return out
                try:
                    out.calls.append(self._parse(buffer[:end]))
                except ValueError:  # not a valid call: the model's text, returned as such
                    out.content += OPEN_TAG + buffer[:end] + CLOSE_TAG
                buffer = buffer[end + len(CLOSE_TAG):]
                self._inside = False
                continue
            start = buffer.find(OPEN_TAG)
            if start >= 0:
                out.content += buffer[:start]
                buffer = buffer[start + len(OPEN_TAG):]
                self._inside = True
                continue
            keep = partial_suffix_length(buffer, (OPEN_TAG,))
            out.content += buffer[:len(buffer) - keep]
            self._held = buffer[len(buffer) - keep:]
            return out
        return out

    def flush(self) -> ParserOutput:
        """End of generation: an unclosed block is parsed if it holds a whole call, else returned as text."""
        held, self._held = self._held, ""
        if not self._inside:
            return ParserOutput(content=held)
        self._inside = False
        try:
            return ParserOutput(calls=[self._parse(held)])
        except ValueError:
            return ParserOutput(content=OPEN_TAG + held)

    def _parse(self, body: str) -> ParsedToolCall:
        try:
            call = json.loads(body)
        except json.JSONDecodeError as error:
            raise ValueError(f"tool call is not JSON: {error}") from error
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError("tool call has no name")
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):  # some models double-encode
            arguments = json.loads(arguments)
        parsed = ParsedToolCall(index=self._count, id=f"call_{uuid.uuid4().hex[:24]}", name=call["name"],
                                arguments=json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))
        self._count += 1
        return parsed
