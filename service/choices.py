"""Runs the choices of one request (n × prompts) on the engine concurrently and merges their events.

Per choice: stop strings are trimmed (text that might start one is held back), tool calls are parsed out of
the text when tools are in play, and the last event carries the finish reason. Leaving the merged iterator
for any reason (client cancel, stop string, error) closes every engine stream, which frees the batch slots.

Coalescing: each choice runs in its own task that turns engine deltas into events one by one (so stop
strings, tool calls, logprobs and token counts are exactly what they would be unmerged) and queues them. The
consumer (the RPC writing messages) takes the first event as soon as it exists and then, without awaiting,
everything else already queued, merging each choice's consecutive events into one. So when the writer keeps
up every token is its own message, and when it falls behind (a busy process, a slow reader) one message
carries the tokens that piled up meanwhile: per-message costs (gRPC send, SSE frame, Envoy DATA frame) are
paid per batch, and nothing is ever held back on a timer. `stream_interval` N > 1 instead sends a choice's
events once N tokens have accumulated (its first output and its finish at once); 1 sends every event alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
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


async def _run_one(engine: Engine, spec: ChoiceSpec, trace_context: Mapping[str, str]) -> AsyncIterator[ChoiceEvent]:
    request = GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=spec.prompt_ids, sampling=spec.sampling,
                                images=spec.images, trace_context=trace_context)
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


def merge_events(events: list[ChoiceEvent]) -> list[ChoiceEvent]:
    """One choice's consecutive events as few events as keep their rendering identical: text, tool calls and
    logprobs concatenated in order, counts and finish reason from the last. A group ends at an event with tool
    calls when more text follows (a message renders its text before its tool calls)."""
    if len(events) == 1:
        return events
    merged, group = [], []
    for event in events:
        if group and event.text and group[-1].tool_calls:
            merged.append(_merged(group))
            group = []
        group.append(event)
    merged.append(_merged(group))
    return merged


def _merged(group: list[ChoiceEvent]) -> ChoiceEvent:
    if len(group) == 1:
        return group[0]
    last = group[-1]
    return ChoiceEvent(last.index, "".join(e.text for e in group), [c for e in group for c in e.tool_calls],
                       tuple(lp for e in group for lp in e.logprobs), last.finish_reason, last.prompt_tokens,
                       last.completion_tokens, last.cached_tokens)


async def run_choices(engine: Engine, specs: list[ChoiceSpec], stream_interval: int = 0,
                      trace_context: Mapping[str, str] | None = None) -> AsyncIterator[ChoiceEvent]:
    """Yields every choice's events as they come, coalesced (module docstring); re-raises the first failure
    after closing the rest. Within a choice the order is kept; choices interleave freely. `trace_context` (W3C
    headers of the request's span, when the service traces) goes to the engine with every choice."""
    trace_context = trace_context or {}
    queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

    async def pump(spec: ChoiceSpec) -> None:
        try:
            async with contextlib.aclosing(_run_one(engine, spec, trace_context)) as events:
                async for event in events:
                    queue.put_nowait(event)
            queue.put_nowait(None)
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait(error)

    tasks = [asyncio.create_task(pump(spec)) for spec in specs]
    pending: dict[int, list[ChoiceEvent]] = {spec.index: [] for spec in specs}
    sent_tokens: dict[int, int] = {}  # completion_tokens at the choice's last release (absent: nothing sent)
    try:
        remaining = len(tasks)
        while remaining or any(pending.values()):
            item = await queue.get() if remaining else None
            while True:
                if isinstance(item, ChoiceEvent):
                    pending[item.index].append(item)
                elif isinstance(item, BaseException):
                    raise item
                elif remaining:  # None: one choice's stream ended (its finish event is already pending)
                    remaining -= 1
                if queue.empty():
                    break
                item = queue.get_nowait()
            for index, events in pending.items():
                if not events:
                    continue
                if stream_interval == 1:
                    released = events
                elif stream_interval > 1 and index in sent_tokens and events[-1].finish_reason is None \
                        and events[-1].completion_tokens - sent_tokens[index] < stream_interval:
                    continue  # fewer than N tokens since the last message: wait for more
                else:
                    released = merge_events(events)
                pending[index] = []
                sent_tokens[index] = events[-1].completion_tokens
                for event in released:
                    yield event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
