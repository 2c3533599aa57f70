"""Adaptive coalescing and stream_interval (service.choices.run_choices) on a scripted engine whose decode steps
the test releases by hand, so "the writer is behind" is a fact of the test, not a timing accident.

The real stack's proof is tests/test_stack.py::test_stream_interval_groups_tokens_same_text.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import grpc
import pytest
from google.protobuf import json_format

from genrpc.service.choices import ChoiceSpec, run_choices
from genrpc.service.engines.base import FinishReason, GenerationDelta, GenerationRequest, ModelInfo, SamplingParams, \
    TokenLogprob
from genrpc.service.server import create_server
from genrpc.settings import Settings
from genrpc.v1 import chat_pb2, generation_service_pb2_grpc
from tests.scripted_engine import CharTokenizer


class SteppedEngine:
    """Generates `reply` one character (token) per step; `release(k)` runs k steps for every live request.
    Each token carries a logprob entry (token id = code point) when logprobs are asked for."""

    def __init__(self, reply: str):
        self.reply = reply
        self._info = ModelInfo(model_id="stepped", context_length_tokens=4096)
        self._tokenizer = CharTokenizer()
        self.queues: list[asyncio.Queue] = []

    model_info = property(lambda self: self._info)
    tokenizer = property(lambda self: self._tokenizer)
    running_requests = property(lambda self: len(self.queues))
    waiting_requests = 0

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def release(self, steps: int) -> None:
        for queue in self.queues:
            for _ in range(steps):
                queue.put_nowait(None)

    async def generate(self, request: GenerationRequest):
        queue: asyncio.Queue = asyncio.Queue()
        self.queues.append(queue)
        limit = min(request.sampling.max_tokens, len(self.reply))
        try:
            for i, char in enumerate(self.reply[:limit]):
                await queue.get()
                last = i + 1 == limit
                reason = (FinishReason.STOP if len(self.reply) <= request.sampling.max_tokens
                          else FinishReason.LENGTH) if last else None
                logprobs = (TokenLogprob(ord(char), -0.01 * i),) if request.sampling.logprobs is not None else ()
                yield GenerationDelta(text=char, token_ids=(ord(char),), completion_tokens=i + 1,
                                      prompt_tokens=len(request.prompt_token_ids), finish_reason=reason,
                                      logprobs=logprobs)
        finally:
            self.queues.remove(queue)


async def settle() -> None:
    """Lets every ready task run until the loop is idle (the engine's released steps are all consumed)."""
    for _ in range(50):
        await asyncio.sleep(0)


def spec(index: int = 0, *, stop: tuple[str, ...] = (), tools: bool = False, logprobs: int | None = None,
         max_tokens: int = 1000) -> ChoiceSpec:
    return ChoiceSpec(index, [1, 2, 3], SamplingParams(max_tokens=max_tokens, logprobs=logprobs), stop, tools)


async def test_first_token_alone_then_queued_deltas_merge_under_backpressure():
    engine = SteppedEngine("abcdefghij")
    async with contextlib.aclosing(run_choices(engine, [spec()])) as events:
        first = asyncio.ensure_future(anext(events))
        await settle()
        assert not first.done()  # nothing generated yet: nothing sent
        engine.release(1)
        event = await first
        assert (event.text, event.completion_tokens) == ("a", 1)  # the first token at once, alone
        engine.release(5)  # five steps while the writer is busy (the consumer is not reading)
        await settle()
        event = await anext(events)
        assert (event.text, event.completion_tokens) == ("bcdef", 6)  # one message for the five queued tokens
        nxt = asyncio.ensure_future(anext(events))
        engine.release(1)  # the writer is ready and waiting: the next token is not held back
        event = await nxt
        assert (event.text, event.completion_tokens) == ("g", 7)
        engine.release(3)
        await settle()
        event = await anext(events)
        assert (event.text, event.finish_reason, event.completion_tokens) == ("hij", "stop", 10)


async def collect(reply: str, specs: list[ChoiceSpec], stream_interval: int, burst: bool) -> list:
    """All events of a request; `burst`: every step is released before reading (the writer maximally behind);
    otherwise one step at a time, each read before the next (the writer always ready)."""
    engine = SteppedEngine(reply)
    out = []
    async with contextlib.aclosing(run_choices(engine, specs, stream_interval)) as events:
        pending = asyncio.ensure_future(anext(events))  # starts the request
        await settle()
        assert len(engine.queues) == len(specs)
        if burst:
            engine.release(len(reply))
            await settle()
            out = [await pending] + [event async for event in events]
        else:
            for _ in range(len(reply)):
                engine.release(1)
                await settle()
                while pending is not None and pending.done():
                    try:
                        out.append(pending.result())
                    except StopAsyncIteration:
                        pending = None
                        break
                    pending = asyncio.ensure_future(anext(events))
                    await settle()
            if pending is not None:  # only when the test is wrong: do not leave a read running
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
    return out


def rendered(events) -> dict:
    """What a client sees per choice: text and tool calls in stream order, logprobs, finish, token count."""
    out: dict[int, dict] = {}
    for event in events:
        choice = out.setdefault(event.index, {"items": [], "logprobs": [], "finish": None, "tokens": 0})
        if event.text:
            if choice["items"] and choice["items"][-1][0] == "text":
                choice["items"][-1] = ("text", choice["items"][-1][1] + event.text)
            else:
                choice["items"].append(("text", event.text))
        choice["items"] += [("call", call.name, call.arguments) for call in event.tool_calls]
        choice["logprobs"] += [(lp.token_id, lp.logprob) for lp in event.logprobs]
        if event.finish_reason:
            choice["finish"], choice["tokens"] = event.finish_reason, event.completion_tokens
    return out


TOOL_REPLY = ('Let me look. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> and '
              '<tool_call>{"name": "b", "arguments": {}}</tool_call> done')


@pytest.mark.parametrize(("reply", "specs"), [
    ("Hello world! STOP and more text after", [spec(stop=("STOP",), logprobs=0)]),
    ("split stop st|op here", [spec(stop=("st|op",))]),
    (TOOL_REPLY, [spec(tools=True, logprobs=2)]),
    ("two choices interleave, each exact", [spec(0, stop=("exact",), logprobs=0), spec(1, max_tokens=9)]),
], ids=["stop-string+logprobs", "stop-string-split", "tool-calls+logprobs", "n=2"])
async def test_merged_events_render_exactly_like_unmerged(reply, specs):
    unmerged = await collect(reply, specs, stream_interval=1, burst=True)
    merged = await collect(reply, specs, stream_interval=0, burst=True)
    stepped = await collect(reply, specs, stream_interval=0, burst=False)
    assert rendered(merged) == rendered(unmerged) == rendered(stepped)
    assert len(merged) < len(unmerged)  # merging really happened
    assert len(stepped) > len(merged)  # and a writer that keeps up gets the tokens one by one
    for choice in rendered(unmerged).values():
        if choice["logprobs"]:
            assert len(choice["logprobs"]) == choice["tokens"]  # one entry per token, none after a stop
    text = "".join(item[1] for item in rendered(merged)[0]["items"] if item[0] == "text")
    assert "STOP" not in text and "after" not in text and "st|op" not in text and "<tool" not in text


async def test_stream_interval_sends_every_n_tokens_first_at_once():
    reply = "abcdefghijk"  # 11 tokens
    events = await collect(reply, [spec()], stream_interval=4, burst=False)
    assert [e.completion_tokens for e in events] == [1, 5, 9, 11]  # first at once, then every 4, then the finish
    assert "".join(e.text for e in events) == reply and events[-1].finish_reason == "stop"
    assert len(events) <= math.ceil(len(reply) / 4) + 1


async def test_negative_stream_interval_is_invalid_argument():
    engine = SteppedEngine("abc")
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1), engine)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            request = json_format.ParseDict({"model": "stepped", "messages": [{"role": "user", "content": "hi"}],
                                             "stream_interval": -2}, chat_pb2.ChatCompletionRequest())
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Chat(request):
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "stream_interval" in caught.value.details()
    finally:
        await server.stop(0)


async def test_server_default_stream_interval_applies_over_grpc():
    engine = SteppedEngine("abcdefghij")
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1, stream_interval=3), engine)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            request = json_format.ParseDict({"model": "stepped", "messages": [{"role": "user", "content": "hi"}]},
                                            chat_pb2.ChatCompletionRequest())
            call = stub.Chat(request)
            reader = asyncio.ensure_future(_read_all(call))
            deadline = time.monotonic() + 10
            while not engine.queues:  # the request reached the engine
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            for _ in range(10):  # one step at a time, each taken by the engine before the next
                engine.release(1)
                while engine.queues and not engine.queues[0].empty():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.001)
            chunks = await reader
    finally:
        await server.stop(0)
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(contents) == "abcdefghij"
    assert contents[0] == "a"  # the first token at once
    assert all(len(c) >= 3 for c in contents[1:-1])  # then never fewer than 3 tokens, except with the finish
    assert len(contents) <= math.ceil(10 / 3) + 1


async def _read_all(call) -> list:
    return [chunk async for chunk in call]
