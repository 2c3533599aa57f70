"""Request limits and admission control in the service, on a scripted engine (the real stack: test_hostile_input.py
and test_overload.py): every limit is a setting, a request over one is INVALID_ARGUMENT naming it (ErrorInfo
reason LIMIT_EXCEEDED, metadata `limit`), and the size checks run before templating."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from genrpc.service.server import create_server
from genrpc.settings import Settings
from genrpc.v1 import chat_pb2, completion_pb2, generation_service_pb2_grpc, responses_pb2
from tests.scripted_engine import ScriptedEngine

REPLY = "Hello world! Bye."


def chat(**fields) -> chat_pb2.ChatCompletionRequest:
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json_format.ParseDict(body, chat_pb2.ChatCompletionRequest())


async def serve(engine: ScriptedEngine, **settings):
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1, **settings), engine)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, generation_service_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture
async def limited():
    engine = ScriptedEngine(reply=REPLY, context_length=4096)
    server, channel, stub = await serve(engine, max_tokens_limit=5, max_n=2, max_stop=2, max_logit_bias=3,
                                        max_messages=3, max_prompt_tokens=40)
    try:
        yield engine, stub, channel
    finally:
        await channel.close()
        await server.stop(0)


def details(error: grpc.aio.AioRpcError) -> dict:
    out = {}
    for any_detail in rpc_status.from_call(error).details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if any_detail.Is(cls.DESCRIPTOR):
                msg = cls()
                any_detail.Unpack(msg)
                out[cls.__name__] = msg
    return out


async def refused(call, limit: str, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    info = details(error)["ErrorInfo"]
    assert info.reason == "LIMIT_EXCEEDED" and info.metadata["limit"] == limit, info
    assert limit in error.details()
    assert details(error)["BadRequest"].field_violations[0].field == field


async def test_max_tokens_limit_is_the_default_and_the_ceiling(limited):
    engine, stub, _ = limited
    reply = await stub.CreateChatCompletion(chat())
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    assert engine.requests[-1].sampling.max_tokens == 5
    assert (await stub.CreateChatCompletion(chat(max_tokens=5))).usage.completion_tokens == 5
    await refused(stub.CreateChatCompletion(chat(max_tokens=6)), "max_tokens_limit", "max_tokens")
    completion = json_format.ParseDict({"model": "scripted", "prompt": "x", "max_tokens": 6},
                                       completion_pb2.CompletionRequest())
    await refused(stub.CreateCompletion(completion), "max_tokens_limit", "max_tokens")


async def test_count_limits_name_the_limit(limited):
    _, stub, _ = limited
    await refused(stub.CreateChatCompletion(chat(n=3, max_tokens=1)), "max_n", "n")
    await refused(stub.CreateChatCompletion(chat(stop=["a", "b", "c"], max_tokens=1)), "max_stop", "stop")
    await refused(stub.CreateChatCompletion(chat(logit_bias={"1": 1, "2": 1, "3": 1, "4": 1}, max_tokens=1)),
                  "max_logit_bias", "logit_bias")
    await refused(stub.CreateChatCompletion(chat(messages=[{"role": "user", "content": "x"}] * 4, max_tokens=1)),
                  "max_messages", "messages")
    # at the limits: served
    ok = await stub.CreateChatCompletion(chat(n=2, stop=["a", "b"], logit_bias={"1": 1, "2": 1, "3": 1},
                                              messages=[{"role": "user", "content": "x"}] * 3, max_tokens=1))
    assert len(ok.choices) == 2


async def test_oversize_prompt_is_refused_before_templating(limited):
    engine, stub, _ = limited
    before = len(engine.tokenizer.templated)
    await refused(stub.CreateChatCompletion(chat(messages=[{"role": "user", "content": "x" * 1300}], max_tokens=1)),
                  "max_prompt_tokens", "messages")
    assert len(engine.tokenizer.templated) == before  # never templated nor tokenised
    # under the character bound but over the token limit once templated: refused after templating, naming it
    await refused(stub.CreateChatCompletion(chat(messages=[{"role": "user", "content": "x" * 30}], max_tokens=1)),
                  "max_prompt_tokens", "messages")


async def test_corrupt_protobuf_is_invalid_argument_not_internal(limited):
    _, _, channel = limited
    raw = channel.unary_unary("/genrpc.v1.GenerationService/CreateChatCompletion",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(b"\x72\x05\x0a\x01x\x11\xff")  # a map entry (logit_bias) whose double value is truncated
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert details(caught.value)["ErrorInfo"].reason == "MALFORMED_REQUEST"


async def test_admission_refuses_beyond_slots_plus_queue_with_retry_info():
    engine = ScriptedEngine(reply=REPLY, context_length=4096, step_delay_s=0.05)
    server, channel, stub = await serve(engine, max_batch_size=1, max_queue=1)
    try:
        streams = [stub.Chat(chat(max_tokens=10)) for _ in range(2)]
        firsts = await asyncio.gather(*(s.read() for s in streams))  # both admitted and generating
        assert all(f.choices for f in firsts)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateChatCompletion(chat(max_tokens=1))
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        found = details(error)
        assert found["ErrorInfo"].reason == "SERVER_OVERLOADED" and found["ErrorInfo"].metadata["limit"] == "max_queue"
        assert found["RetryInfo"].retry_delay.ToTimedelta().total_seconds() == 1
        # every generating RPC is refused alike, the Responses API included, before reaching the engine
        response = json_format.ParseDict({"model": "scripted", "input": "hi", "max_output_tokens": 1},
                                         responses_pb2.CreateResponseRequest())
        completion = completion_pb2.CompletionRequest(model="scripted", prompt={"string_value": "x"})
        for name, call in (("CreateResponse", lambda: stub.CreateResponse(response)),
                           ("StreamResponse", lambda: stub.StreamResponse(response).read()),
                           ("Generate", lambda: stub.Generate(completion).read())):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call()
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (name, caught.value.details())
        assert len(engine.requests) == 2  # the refused request never reached the engine
        for s in streams:  # the admitted ones complete
            last = None
            while (message := await s.read()) is not grpc.aio.EOF:
                last = message if message.choices else last
            assert last.choices[0].finish_reason.string_value == "length"
        # capacity is released: served again
        assert (await stub.CreateChatCompletion(chat(max_tokens=1))).usage.completion_tokens == 1
        # a cancelled stream releases its share too
        stream = stub.Chat(chat(max_tokens=10))
        await stream.read()
        stream.cancel()
        deadline = asyncio.get_running_loop().time() + 5
        while server.servicer.admitted and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert server.servicer.admitted == 0
    finally:
        await channel.close()
        await server.stop(0)
