"""Runs the choices of one request (n × prompts) on the engine concurrently and merges their events.

Per choice: stop strings are trimmed (text that might start one is held back), tool calls are parsed out of
the text when tools are in play, and the last event carries the finish reason. Leaving the merged iterator
for any reason (client cancel, stop string, error) closes every engine stream, which frees the batch slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from genrpc.service.engines.base import Engine, GenerationRequest, SamplingParams, TokenLogprob
from genrpc.service.errors import EngineFailure
from genrpc.service.stop_strings import StopStringMatcher
from genrpc.service.tool_calls import ParsedToolCall, ToolCallParser


@dataclass(frozen=True)
class ChoiceSpec:
    index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    parse_tool_calls: bool = False
    images: tuple[str, ...] = ()  # image URLs / data URIs, in prompt order (vision models only)


@dataclass(frozen=True)
class ChoiceEvent:
    index: int
    text: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # stop | length | tool_calls, on the choice's last event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_time_s: float | None = None  # on the choice's first event, when the engine measured it


async def _run_one(engine: Engine, spec: ChoiceSpec) -> AsyncIterator[ChoiceEvent]:
    request = GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=spec.prompt_ids, sampling=spec.sampling,
                                images=spec.images)
    matcher = StopStringMatcher(spec.stop)
    parser = ToolCallParser() if spec.parse_tool_calls else None
    queue_time_s: float | None = None  # carried to the first event that is yielded
    async with contextlib.aclosing(engine.generate(request)) as deltas:
        async for delta in deltas:
            if delta.queue_time_s is not None:
                queue_time_s = delta.queue_time_s
            text = matcher.feed(delta.text)
            finish = "stop" if matcher.matched else (delta.finish_reason.value if delta.finish_reason else None)
            if finish is not None and not matcher.matched:
                text += matcher.flush()
            calls: list[ParsedToolCall] = []
            if parser is not None:
                parsed = parser.feed(text)
                if finish is not None:
                    rest = parser.flush()
                    parsed.content += rest.content
                    parsed.calls += rest.calls
                text, calls = parsed.content, parsed.calls
                if finish == "stop" and parser.calls_made:
                    finish = "tool_calls"
            if text or calls or finish or delta.logprobs:
                yield ChoiceEvent(spec.index, text, calls, delta.logprobs, finish, delta.prompt_tokens,
                                  delta.completion_tokens, delta.cached_prompt_tokens, queue_time_s)
                queue_time_s = None
            if finish:
                return
    raise EngineFailure("the engine ended a stream without a finish reason")


async def run_choices(engine: Engine, specs: list[ChoiceSpec]) -> AsyncIterator[ChoiceEvent]:
    """Yields every choice's events as they come; re-raises the first failure after closing the rest."""
    if len(specs) == 1:
        async with contextlib.aclosing(_run_one(engine, specs[0])) as events:
            async for event in events:
                yield event
        return
    queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

    async def pump(spec: ChoiceSpec) -> None:
        try:
            async with contextlib.aclosing(_run_one(engine, spec)) as events:
                async for event in events:
                    queue.put_nowait(event)
            queue.put_nowait(None)
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait(error)

    tasks = [asyncio.create_task(pump(spec)) for spec in specs]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
