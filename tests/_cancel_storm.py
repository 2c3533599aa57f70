"""One round of a cancel storm against a running stack (shared by tests/test_cancel_storm.py and
benchmarks/bench_cancel_storm.py): `streams` streams opened at once, half SSE through Envoy (httpx), half native
gRPC through Envoy (grpcio); each is cancelled at a random point (one in ten after a random delay, mostly before
its first chunk; the others mid-stream after a random number of chunks, see _plan); then the time from the last
cancel until the service reports nothing running and nothing waiting (its /metrics: genrpc_running_requests,
which reads the engine's own count, and genrpc_waiting_requests)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import httpx

from genrpc.v1 import chat_pb2, generation_service_pb2_grpc


GRPC_STREAMS_PER_CONNECTION = 100


@dataclass
class RoundResult:
    opened: int  # streams that got at least their response headers / were started
    chunks: int  # chunks read before the cancels, all streams
    refused: int  # streams refused outright (e.g. 429) - a storm within capacity has none
    drain_s: float  # last cancel -> running == waiting == 0


async def _sse(http: httpx.AsyncClient, body: dict, plan: tuple[float, int], counts: dict, headers: dict) -> float:
    timeout_s, chunks = plan
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    counts["refused"] += 1
                    await resp.aread()
                    return time.monotonic()
                counts["opened"] += 1
                async for _ in resp.aiter_raw():
                    counts["chunks"] += 1
                    chunks -= 1
                    if chunks <= 0:
                        break  # leaving the `async with` closes the connection: the cancel
    except TimeoutError:
        pass
    return time.monotonic()


async def _grpc(stub, request, plan: tuple[float, int], counts: dict, metadata: tuple) -> float:
    timeout_s, chunks = plan
    call = stub.Chat(request, metadata=metadata)
    try:
        async with asyncio.timeout(timeout_s):
            async for _ in call:
                if chunks == plan[1]:
                    counts["opened"] += 1
                counts["chunks"] += 1
                chunks -= 1
                if chunks <= 0:
                    break
    except TimeoutError:
        pass
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            counts["refused"] += 1
        else:
            raise
    call.cancel()
    return time.monotonic()


def _plan(rng: random.Random, early_cancel_s: float) -> tuple[float, int]:
    """(timeout, chunks to read): one stream in ten is cancelled after a random delay of up to early_cancel_s,
    usually before its first chunk; the others after a random number (1-10) of chunks."""
    if rng.random() < 0.1:
        return rng.uniform(0, early_cancel_s), 1 << 30
    return 120.0, rng.randint(1, 10)


async def storm_round(envoy: str, model: str, streams: int, running_and_waiting: Callable[[], tuple[float, float]],
                      *, early_cancel_s: float = 0.5, seed: int = 0, api_key: str = "",
                      drain_limit_s: float = 30.0, max_tokens: int = 2048) -> RoundResult:
    rng = random.Random(seed)
    counts = {"opened": 0, "chunks": 0, "refused": 0}
    # ignore_eos: a real model must not end a stream before its cancel
    body = {"model": model, "messages": [{"role": "user", "content": "storm"}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    request = chat_pb2.ChatCompletionRequest(model=model, max_tokens=max_tokens, ignore_eos=True, messages=[
        chat_pb2.ChatMessage(role="user", content={"string_value": "storm"})])
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    metadata = tuple(headers.items())
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(None, connect=30)  # a queued stream may wait long for its first chunk
    # gRPC streams are spread over connections of GRPC_STREAMS_PER_CONNECTION: Envoy closes an HTTP/2 connection
    # on which 500+ streams were mostly reset within a second of opening (its HTTP/2 rapid-reset protection,
    # runtime overload.premature_reset_*), which is what one connection carrying the whole storm looks like.
    channels = [grpc.aio.insecure_channel(envoy, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(-(-streams // 2 // GRPC_STREAMS_PER_CONNECTION))]
    try:
        async with httpx.AsyncClient(base_url=f"http://{envoy}", timeout=timeout, limits=limits) as http:
            stubs = [generation_service_pb2_grpc.GenerationServiceStub(channel) for channel in channels]
            tasks = []
            for i in range(streams):
                plan = _plan(rng, early_cancel_s)
                if i % 2 == 0:
                    tasks.append(_sse(http, body, plan, counts, headers))
                else:
                    stub = stubs[(i // 2) // GRPC_STREAMS_PER_CONNECTION]
                    tasks.append(_grpc(stub, request, plan, counts, metadata))
            cancelled_at = await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    last_cancel = max(cancelled_at)
    while True:
        state = await asyncio.to_thread(running_and_waiting)
        now = time.monotonic()
        if state == (0, 0):
            return RoundResult(counts["opened"], counts["chunks"], counts["refused"], max(0.0, now - last_cancel))
        if now - last_cancel > drain_limit_s:
            raise AssertionError(f"still running/waiting {state} {drain_limit_s} s after the last cancel")
        await asyncio.sleep(0.01)
