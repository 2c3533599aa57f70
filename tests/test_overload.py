"""Overload at 4x capacity through the real stack (the real engine, Envoy, the bridge): the excess is refused with
429 + `retry-after` (REST, both paths) or RESOURCE_EXHAUSTED + RetryInfo (gRPC), every admitted request completes,
nothing is a 5xx, and the engine's queue never holds more than `--max-queue`. Bounded: slots 2 + queue 4, 24
concurrent requests of 4 tokens. The figures at scale: benchmarks/bench_overload.py."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from _stack_up import QueueWatch
from conftest import running_stack
from genrpc.envoy.config import GATEWAY_FULL_MESSAGE
from genrpc.v1 import chat_pb2, generation_service_pb2_grpc, model_pb2

SLOTS, QUEUE, REQUESTS = 2, 4, 24
MESSAGES = [{"role": "user", "content": "Count from one to ten."}]


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory):
    # Envoy's admission off (its ceiling): the service decides every request (the gateway's own: gated_stack)
    with running_stack(tmp_path_factory.mktemp("overload"), {
            "GENRPC_MAX_BATCH_SIZE": str(SLOTS), "GENRPC_MAX_QUEUE": str(QUEUE),
            "GENRPC_ENVOY_MAX_REQUESTS": "0"}) as running:
        yield running


async def rest_call(client: httpx.AsyncClient, model: str, stream: bool) -> tuple[str, int, float, dict]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "stream": stream}
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        data = await response.aread()
    elapsed = time.perf_counter() - started
    info = {"headers": dict(response.headers), "body": data}
    return ("sse" if stream else "rest"), response.status_code, elapsed, info


async def grpc_call(stub, model: str) -> tuple[str, int, float, dict]:
    request = json_format.ParseDict({"model": model, "messages": MESSAGES, "max_tokens": 4},
                                    chat_pb2.ChatCompletionRequest())
    started = time.perf_counter()
    try:
        reply = await stub.CreateChatCompletion(request, timeout=120)
        return "grpc", 0, time.perf_counter() - started, {"reply": reply}
    except grpc.aio.AioRpcError as error:
        return "grpc", error.code().value[0], time.perf_counter() - started, {"error": error}


async def burst(stack) -> list[tuple[str, int, float, dict]]:
    async with httpx.AsyncClient(base_url=f"http://{stack.envoy_address}", timeout=120,
                                 limits=httpx.Limits(max_connections=REQUESTS)) as client, \
            grpc.aio.insecure_channel(stack.envoy_address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        calls = []
        for i in range(REQUESTS):
            kind = i % 3
            calls.append(rest_call(client, stack.model, False) if kind == 0 else
                         rest_call(client, stack.model, True) if kind == 1 else grpc_call(stub, stack.model))
        return await asyncio.gather(*calls)


def test_overload_refuses_the_excess_quickly_and_completes_the_rest(small_stack):
    with QueueWatch(small_stack.metrics_url) as watch:
        results = asyncio.run(burst(small_stack))
    admitted, refused, refusal_latency = 0, 0, []
    for kind, status, elapsed, info in results:
        if kind == "grpc":
            if status == 0:
                admitted += 1
                assert info["reply"].choices[0].finish_reason in ("stop", "length")
                continue
            error = info["error"]
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
            retry = [d for d in rpc_status.from_call(error).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert retry, "RESOURCE_EXHAUSTED without RetryInfo"
        else:
            assert status < 500, (kind, status, info["body"][:300])
            if status == 200:
                admitted += 1
                if kind == "sse":
                    assert info["body"].rstrip().endswith(b"data: [DONE]"), info["body"][-200:]
                continue
            assert status == 429, (kind, status, info["body"][:300])
            assert info["headers"].get("retry-after") == "1", (kind, info["headers"])
            error = json.loads(info["body"])["error"]
            assert error["type"] == "rate_limit_error" and "max_queue" in error["message"], error
        refused += 1
        refusal_latency.append(elapsed)
    refusal_latency.sort()
    print(f"\n{REQUESTS} requests for {SLOTS} slots + {QUEUE} queue: {admitted} admitted (all completed), "
          f"{refused} refused; refusal latency p50 {refusal_latency[len(refusal_latency) // 2] * 1000:.0f} ms, "
          f"max {refusal_latency[-1] * 1000:.0f} ms; max waiting {watch.max_waiting:.0f}, "
          f"max running {watch.max_running:.0f}")
    assert admitted + refused == REQUESTS
    assert admitted >= SLOTS + QUEUE  # capacity was used (the burst arrives at once, before any finishes)
    assert refused >= REQUESTS - 2 * (SLOTS + QUEUE)  # and the excess refused
    assert watch.max_waiting <= QUEUE and watch.max_running <= SLOTS


# ---- gateway admission: Envoy refuses the excess of all paths together itself (envoy_max_requests) ----------------

GATEWAY_LIMIT = 2


@pytest.fixture(scope="module")
def gated_stack(tmp_path_factory):
    # synthetic tokens at 5/s with no token ceiling: the streams that fill a path stay open until the test ends them
    with running_stack(tmp_path_factory.mktemp("gated"), {
            "GENRPC_ENGINE": "synthetic", "GENRPC_SYNTHETIC_TOKENS_PER_S": "5", "GENRPC_MAX_TOKENS_LIMIT": "0",
            "GENRPC_ENVOY_MAX_REQUESTS": str(GATEWAY_LIMIT)}) as running:
        yield running


async def test_gateway_refuses_past_its_limit_in_every_shape_and_answers_the_rest(gated_stack):
    stack = gated_stack
    long_chat = {"model": stack.model, "messages": MESSAGES, "max_tokens": 10_000}
    async with httpx.AsyncClient(base_url=f"http://{stack.envoy_address}", timeout=30) as client, \
            grpc.aio.insecure_channel(stack.envoy_address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        request = json_format.ParseDict(long_chat, chat_pb2.ChatCompletionRequest())
        # fill the gateway's one count with a gRPC stream and an SSE stream: every path is then refused
        calls = [stub.Chat(request) for _ in range(GATEWAY_LIMIT // 2)]
        for call in calls:
            assert (await call.read()).choices is not None
        sse = [client.stream("POST", "/v1/chat/completions", json={**long_chat, "stream": True})
               for _ in range(GATEWAY_LIMIT - len(calls))]
        responses = [await s.__aenter__() for s in sse]
        frames = [response.aiter_lines() for response in responses]  # held: a dropped iterator closes its stream
        for response, lines in zip(responses, frames):
            assert response.status_code == 200
            assert (await lines.__anext__()).startswith("data: ")  # the first frame: the stream is generating
        try:
            # native gRPC: RESOURCE_EXHAUSTED with the service's own reason and RetryInfo, decided by Envoy
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateChatCompletion(request, timeout=10)
            error = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
            assert "envoy_max_requests" in error.details()
            status = rpc_status.from_call(error)
            info = error_details_pb2.ErrorInfo()
            retry = error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(info) and status.details[1].Unpack(retry)
            assert info.reason == "SERVER_OVERLOADED" and info.metadata["limit"] == "envoy_max_requests"
            assert retry.retry_delay.seconds == 1
            # unary REST and SSE: 429, retry-after, OpenAI's shape
            for body in ({**long_chat, "max_tokens": 1}, {**long_chat, "stream": True}):
                refused = await client.post("/v1/chat/completions", json=body)
                assert refused.status_code == 429, (body.get("stream"), refused.text)
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"] == {
                    "message": GATEWAY_FULL_MESSAGE.format(limit=GATEWAY_LIMIT), "type": "rate_limit_error", "param": None,
                    "code": "server_overloaded"}
            # DashScope's route: its own error shape
            refused = await client.post("/api/v1/services/aigc/text-generation/generation", json={
                "model": stack.model, "input": {"messages": MESSAGES}, "parameters": {"max_tokens": 1}})
            assert refused.status_code == 429 and refused.json()["code"] == "Throttling", refused.text
            # everything that does not generate is still answered while generation is full
            assert (await client.get("/v1/models")).status_code == 200
            assert (await client.get("/health/ready")).status_code == 200
            assert (await stub.ListModels(model_pb2.ListModelsRequest(), timeout=10)).data
        finally:
            for call in calls:
                call.cancel()
            for s in sse:
                await s.__aexit__(None, None, None)
        # the paths free up as the streams end: the next request is served
        for _ in range(100):
            reply = await client.post("/v1/chat/completions", json={**long_chat, "max_tokens": 1})
            if reply.status_code != 429:
                break
            await asyncio.sleep(0.05)  # Envoy counts a stream until its reset reaches it: poll, bounded
        assert reply.status_code == 200, reply.text
