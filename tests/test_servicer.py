"""Unit tests of the servicer on a scripted engine: validation, errors, stream shape, stop strings, cancel.

The real model is exercised in tests/test_cpu_engine.py and end to end in tests/test_stack.py.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from genrpc.settings import Settings
from genrpc.service.engines.base import (EngineBadRequest, EngineInternalError, EngineOverloaded, EngineUnavailable,
                                         EngineUnsupported)
from genrpc.v1 import chat_pb2, completion_pb2, generation_service_pb2_grpc, model_pb2
from genrpc.service.server import create_server
from tests.scripted_engine import ScriptedEngine


def chat(**fields) -> chat_pb2.ChatCompletionRequest:
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json_format.ParseDict(body, chat_pb2.ChatCompletionRequest())


@pytest.fixture
async def served():
    engine = ScriptedEngine(reply="Hello world! Bye.", context_length=4096)
    # no generation ceiling: these tests probe the context window itself (test_limits.py covers the ceiling)
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1, max_tokens_limit=0), engine)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield engine, generation_service_pb2_grpc.GenerationServiceStub(channel), channel
    finally:
        await channel.close()
        await server.stop(0)


def details(error: grpc.aio.AioRpcError):
    status = rpc_status.from_call(error)
    out = {}
    for any_detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if any_detail.Is(cls.DESCRIPTOR):
                msg = cls()
                any_detail.Unpack(msg)
                out[cls.__name__] = msg
    return out


async def test_health_serving_after_start(served):
    _, _, channel = served
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "genrpc.v1.GenerationService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_not_serving_and_unavailable_before_start():
    engine = ScriptedEngine()
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1), engine)
    await server.grpc_server.start()  # serving RPCs, engine not started
    await server._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generation_service_pb2_grpc.GenerationServiceStub(channel).CreateChatCompletion(chat())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await server.stop(0)


async def test_chat_stream_order_and_usage(served):
    _, stub, _ = served
    chunks = [c async for c in stub.Chat(chat(stream_options={"include_usage": True}))]
    first, *middle, final, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content for c in middle) == "Hello world! Bye."
    assert all(c.choices[0].finish_reason.WhichOneof("kind") == "null_value" for c in [first, *middle])
    assert final.choices[0].finish_reason.string_value == "stop"
    assert len(usage_chunk.choices) == 0
    prompt_tokens = len("<user>hi<assistant>")
    assert usage_chunk.usage.prompt_tokens == prompt_tokens
    assert usage_chunk.usage.completion_tokens == len("Hello world! Bye.")
    assert usage_chunk.usage.total_tokens == prompt_tokens + len("Hello world! Bye.")
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


async def test_stop_string_trimmed_and_engine_released(served):
    engine, stub, _ = served
    reply = await stub.CreateChatCompletion(chat(stop=["rld", "zzz"]))
    assert reply.choices[0].message.content.string_value == "Hello wo"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len("Hello world")  # tokens generated up to the match
    assert engine.running == 0 and engine.closed_early  # generation stopped at the match


async def test_stop_string_across_deltas_never_streamed(served):
    _, stub, _ = served
    text = "".join([c.choices[0].delta.content async for c in stub.Chat(chat(stop="! B"))
                    if c.choices])
    assert text == "Hello world"


async def test_max_tokens_length(served):
    _, stub, _ = served
    reply = await stub.CreateChatCompletion(chat(max_completion_tokens=5))
    assert reply.choices[0].message.content.string_value == "Hello"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


async def test_generate_stream(served):
    _, stub, _ = served
    request = json_format.ParseDict({"model": "scripted", "prompt": "Once", "max_tokens": 5},
                                    completion_pb2.CompletionRequest())
    chunks = [c async for c in stub.Generate(request)]
    assert "".join(c.choices[0].text for c in chunks) == "Hello"
    assert chunks[-1].choices[0].finish_reason.string_value == "length"
    assert chunks[-1].usage.prompt_tokens == 4 and chunks[-1].usage.completion_tokens == 5


@pytest.mark.parametrize("fields, field", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"top_k": -2}, "top_k"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"verbosity": "low"}, "verbosity"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"tools": [{"type": "web", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"truncation": "sometimes"}, "truncation"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                           "function": {"name": "f", "arguments": "{nope"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
async def test_bad_parameters_invalid_argument_with_bad_request(served, fields, field):
    _, stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateChatCompletion(chat(**fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = details(caught.value)
    assert found["BadRequest"].field_violations[0].field == field
    assert found["ErrorInfo"].domain == "genrpc.dev"
    assert field.split("[")[0] in caught.value.details()


async def test_content_parts_accepted(served):
    _, stub, _ = served
    reply = await stub.CreateChatCompletion(chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]))
    assert reply.usage.prompt_tokens == len("<system>be brief<user>hi<assistant>")


async def test_harmless_fields_accepted(served):
    _, stub, _ = served
    reply = await stub.CreateChatCompletion(chat(user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
                                                 n=1, seed=3, parallel_tool_calls=True, tool_choice="none"))
    assert reply.choices[0].finish_reason == "stop"


async def test_unknown_model_not_found(served):
    _, stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateChatCompletion(chat(model="gpt-nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(caught.value)["ErrorInfo"].reason == "MODEL_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModel(model_pb2.GetModelRequest(model="gpt-nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_context_length_exceeded_names_both_numbers(served):
    _, stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateChatCompletion(chat(max_tokens=4090))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    prompt_tokens = len("<user>hi<assistant>")
    assert f"{prompt_tokens} in the prompt" in caught.value.details()
    assert "4090 for the completion" in caught.value.details() and "4096 tokens" in caught.value.details()
    assert details(caught.value)["ErrorInfo"].reason == "CONTEXT_LENGTH_EXCEEDED"


async def test_stream_flag_mismatch(served):
    _, stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateChatCompletion(chat(stream=True))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_models(served):
    _, stub, _ = served
    listed = await stub.ListModels(model_pb2.ListModelsRequest())
    assert [m.id for m in listed.data] == ["scripted"] and listed.object == "list"
    one = await stub.GetModel(model_pb2.GetModelRequest(model="scripted"))
    assert one.object == "model" and one.context_length_tokens == 4096


async def test_client_cancel_closes_engine_stream():
    engine = ScriptedEngine(reply="x" * 200, step_delay_s=0.01)
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1), engine)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = generation_service_pb2_grpc.GenerationServiceStub(channel).Chat(chat(model="scripted"))
        await call.read()
        await call.read()
        assert engine.running == 1
        call.cancel()
        for _ in range(200):  # bounded poll of an observable state, not a sleep standing in for readiness
            if engine.running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.running == 0 and len(engine.closed_early) == 1
    await server.stop(0)


def requests_total(server, method: str, code: str) -> float:
    return server.metrics.registry.get_sample_value("genrpc_requests_total", {"model_name": "scripted", "method": method,
                                                                                 "code": code}) or 0.0


async def test_cancelled_stream_counts_as_cancelled_and_finished_one_as_ok():
    engine = ScriptedEngine(reply="x" * 200, step_delay_s=0.01)
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1), engine)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        assert len([c async for c in stub.Chat(chat(max_tokens=3))]) == 5
        assert requests_total(server, "Chat", "OK") == 1
        call = stub.Chat(chat())
        await call.read()
        call.cancel()
        for _ in range(300):  # bounded poll of an observable state
            if requests_total(server, "Chat", "CANCELLED"):
                break
            await asyncio.sleep(0.01)
        assert requests_total(server, "Chat", "CANCELLED") == 1
        assert requests_total(server, "Chat", "OK") == 1
    await server.stop(0)


class FailingEngine(ScriptedEngine):
    """Raises `error` from generate(), as a real engine does for a full queue, a bad grammar, a crash..."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    async def generate(self, request):
        raise self.error
        yield  # an async generator, like every engine's generate()


@pytest.mark.parametrize(("error", "code", "reason", "message"), [
    (EngineOverloaded("3 requests are already waiting"), grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_OVERLOADED",
     "3 requests are already waiting"),
    (EngineUnavailable("the engine was shut down"), grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY",
     "the engine was shut down"),
    (EngineBadRequest("invalid JSON schema: bad", field="response_format"), grpc.StatusCode.INVALID_ARGUMENT,
     "INVALID_PARAMETER", "invalid JSON schema: bad"),
    (EngineUnsupported("'top_a' is not supported by the SGLang engine.", field="top_a"),
     grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_PARAMETER", "'top_a' is not supported by the SGLang engine."),
    (EngineInternalError("generation failed: RuntimeError: boom"), grpc.StatusCode.INTERNAL, "ENGINE_FAILURE",
     "generation failed: RuntimeError: boom"),
    (RuntimeError("a bug with private details"), grpc.StatusCode.INTERNAL, "ENGINE_FAILURE",
     "internal error (RuntimeError); see the service log"),
])
@pytest.mark.parametrize("rpc", ["Chat", "CreateChatCompletion"])
async def test_engine_errors_map_to_one_status_each(error, code, reason, message, rpc):
    server, channel = await serve_engine(FailingEngine(error))
    try:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if rpc == "Chat":
                [c async for c in stub.Chat(chat())]
            else:
                await stub.CreateChatCompletion(chat())
        assert caught.value.code() == code
        assert caught.value.details() == message  # the engine's message, never wrapped twice
        info = details(caught.value)
        assert info["ErrorInfo"].reason == reason and info["ErrorInfo"].domain == "genrpc.dev"
        if isinstance(error, EngineBadRequest):
            violation, = info["BadRequest"].field_violations
            assert violation.field == error.field and info["ErrorInfo"].metadata["param"] == error.field
        else:
            assert "BadRequest" not in info
        # The interceptor counts once the RPC has ended on the server, which may be just after the client saw it.
        deadline = asyncio.get_running_loop().time() + 10
        while requests_total(server, rpc, code.name) < 1 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert requests_total(server, rpc, code.name) == 1
    finally:
        await channel.close()
        await server.stop(0)


async def test_stop_drains_health_for_good():
    server, channel = await serve_engine(ScriptedEngine())
    await channel.close()
    await server.stop(0)
    await server._set_health(health_pb2.HealthCheckResponse.SERVING)  # ignored once draining
    reply = await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def serve_engine(engine):
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1), engine)
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


TOOL_REPLY = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


async def test_tool_calls_parsed_unary_and_streamed():
    engine = ScriptedEngine(reply=TOOL_REPLY, context_length=4096)
    server, channel = await serve_engine(engine)
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    request = chat(model="scripted", tools=[WEATHER_TOOL])
    reply = await stub.CreateChatCompletion(request)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content.string_value == "Let me check."
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json_format.MessageToDict(choice.message, preserving_proto_field_name=True)["tool_calls"][0]["function"]["arguments"] == '{"city":"Paris"}'
    chunks = [c async for c in stub.Chat(request)]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
    assert not deltas[1].HasField("id") and deltas[1].function.arguments == '{"city":"Paris"}'
    text = "".join(c.choices[0].delta.content for c in chunks)
    assert text == "Let me check." and "<tool" not in text
    assert chunks[-1].choices[0].finish_reason.string_value == "tool_calls"
    # tool_choice none: tools are not rendered and text is not parsed.
    plain = await stub.CreateChatCompletion(chat(model="scripted", tools=[WEATHER_TOOL], tool_choice="none"))
    assert plain.choices[0].message.content.string_value == TOOL_REPLY and plain.choices[0].finish_reason == "stop"
    await channel.close()
    await server.stop(0)


async def test_tool_results_render_into_prompt(served):
    engine, stub, _ = served
    await stub.CreateChatCompletion(chat(tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22C and sunny"}]))
    prompt = "".join(chr(t) for t in engine.requests[-1].prompt_token_ids)
    assert "<tools>" in prompt and '"get_weather"' in prompt  # tools section for a template without tool support
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n22C and sunny\n</tool_response>" in prompt


async def test_forced_tool_choice_sends_grammar(served):
    engine, stub, _ = served
    await stub.CreateChatCompletion(chat(tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False))
    sampling = engine.requests[-1].sampling
    assert sampling.ebnf and "<tool_call>" in sampling.ebnf and sampling.json_schema is None
    await stub.CreateChatCompletion(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}))
    assert json.loads(engine.requests[-1].sampling.json_schema)["properties"]["a"]["type"] == "integer"


async def test_n_choices_indexed_and_usage_summed(served):
    engine, stub, _ = served
    reply = await stub.CreateChatCompletion(chat(n=3, seed=10, max_tokens=5))
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content.string_value == "Hello" for c in reply.choices)
    assert reply.usage.completion_tokens == 15 and reply.usage.prompt_tokens == len("<user>hi<assistant>")
    assert [r.sampling.seed for r in engine.requests[-3:]] == [10, 11, 12]
    chunks = [c async for c in stub.Chat(chat(n=2, max_tokens=3))]
    per_choice = {i: "".join(c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].index == i)
                  for i in (0, 1)}
    assert per_choice == {0: "Hel", 1: "Hel"}
    assert sum(1 for c in chunks if c.choices[0].finish_reason.string_value) == 2
    assert chunks[-1].usage.completion_tokens == 6


async def test_sampling_fields_reach_engine(served):
    engine, stub, _ = served
    await stub.CreateChatCompletion(chat(top_k=5, min_p=0.1, top_a=0.2, frequency_penalty=0.5, presence_penalty=-0.5,
                                         repetition_penalty=1.2, logit_bias={"65": -100}, ignore_eos=True,
                                         min_tokens=2, max_tokens=8, logprobs=True, top_logprobs=3, temperature=0.3,
                                         top_p=0.9))
    s = engine.requests[-1].sampling
    assert (s.top_k, s.min_p, s.top_a, s.frequency_penalty, s.presence_penalty, s.repetition_penalty) == \
        (5, 0.1, 0.2, 0.5, -0.5, 1.2)
    assert s.logit_bias == {65: -100} and s.ignore_eos and s.min_tokens == 2 and s.logprobs == 3
    assert (s.temperature, s.top_p, s.max_tokens) == (0.3, 0.9, 8)


async def test_completion_prompt_batch_tokens_and_echo(served):
    engine, stub, _ = served
    request = json_format.ParseDict({"model": "scripted", "prompt": ["ab", "cde"], "max_tokens": 2, "n": 2,
                                     "echo": True}, completion_pb2.CompletionRequest())
    reply = await stub.CreateCompletion(request)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == ["abHe", "abHe", "cdeHe", "cdeHe"]
    assert reply.usage.prompt_tokens == 5 and reply.usage.completion_tokens == 8
    tokens = json_format.ParseDict({"model": "scripted", "prompt": [72, 105], "max_tokens": 1},
                                   completion_pb2.CompletionRequest())
    await stub.CreateCompletion(tokens)
    assert list(engine.requests[-1].prompt_token_ids) == [72, 105]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateCompletion(json_format.ParseDict({"model": "scripted", "prompt": "x", "suffix": "y"},
                                                          completion_pb2.CompletionRequest()))
    assert "suffix" in caught.value.details()


async def test_truncation_auto_drops_oldest_turns():
    engine = ScriptedEngine(reply="ok", context_length=120)
    server, channel = await serve_engine(engine)
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    history = [{"role": "system", "content": "sys"}]
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 2}, {"role": "assistant", "content": "x" * 10}]
    history.append({"role": "user", "content": "last"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateChatCompletion(chat(model="scripted", messages=history, max_tokens=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = await stub.CreateChatCompletion(chat(model="scripted", messages=history, max_tokens=10, truncation="auto"))
    assert reply.dropped_messages > 0 and reply.choices[0].message.content.string_value == "ok"
    prompt = "".join(chr(t) for t in engine.requests[-1].prompt_token_ids)
    assert prompt.startswith("<system>sys") and prompt.endswith("<user>last<assistant>")
    assert len(engine.requests[-1].prompt_token_ids) + 10 <= 120
    await channel.close()
    await server.stop(0)


async def test_struct_key_order_is_canonical(served):
    """Struct maps lose JSON key order; the service restores a deterministic one (required order first)."""
    engine, stub, _ = served
    schema = {"type": "object", "required": ["zeta", "alpha", "mid"],
              "properties": {"mid": {"type": "string", "maxLength": 4}, "alpha": {"type": "string"},
                             "zeta": {"type": "number", "maximum": 2.5},
                             "extra": {"type": "string"}}}
    await stub.CreateChatCompletion(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}}))
    sent = json.loads(engine.requests[-1].sampling.json_schema)
    assert list(sent["properties"]) == ["zeta", "alpha", "mid", "extra"]
    assert list(sent) == sorted(sent)
    assert sent["properties"]["mid"]["maxLength"] == 4 and isinstance(sent["properties"]["mid"]["maxLength"], int)
    assert sent["properties"]["zeta"]["maximum"] == 2.5


async def test_reflection_lists_services():
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    server, port = create_server(Settings(grpc_port=0, metrics_port=-1), ScriptedEngine())
    await server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # the reflection client is synchronous
            database = ProtoReflectionDescriptorDatabase(channel)
            services = await asyncio.to_thread(database.get_services)
            assert {"genrpc.v1.GenerationService", "grpc.health.v1.Health"} <= set(services)
            found = await asyncio.to_thread(database.FindFileContainingSymbol, "genrpc.v1.GenerationService")
            assert found.name == "genrpc/v1/generation_service.proto"
    finally:
        await server.stop(0)


# ---- images (a vision model: the engine's ModelInfo.accepts_images) ----------------------------------------

PNG_DATA_URI = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg=="


@pytest.fixture
async def vision():
    engine = ScriptedEngine(reply="A cat.", context_length=4096, accepts_images=True)
    server, channel = await serve_engine(engine)
    try:
        yield engine, generation_service_pb2_grpc.GenerationServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


def image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


async def test_images_reach_the_engine_in_order_with_template_parts(vision):
    engine, stub = vision
    messages = [
        {"role": "system", "content": "describe"},
        {"role": "user", "content": [image_part("https://example.com/a.png", detail="low"),
                                     {"type": "text", "text": "and"}, image_part(PNG_DATA_URI, detail="auto")]},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": [{"type": "text", "text": "now "}, image_part("http://example.com/c.jpg"),
                                     {"type": "text", "text": "?"}]},
        {"role": "user", "content": [{"type": "text", "text": "plain"}]},
    ]
    reply = await stub.CreateChatCompletion(chat(messages=messages, n=2, seed=1))
    assert [c.message.content.string_value for c in reply.choices] == ["A cat.", "A cat."]
    expected = ("https://example.com/a.png", PNG_DATA_URI, "http://example.com/c.jpg")
    assert [r.images for r in engine.requests] == [expected, expected]  # every choice gets them, in order
    templated = engine.tokenizer.templated[-1]
    assert templated[1]["content"] == [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]
    assert templated[3]["content"] == [{"type": "text", "text": "now "}, {"type": "image"},
                                       {"type": "text", "text": "?"}]
    assert templated[0]["content"] == "describe" and templated[4]["content"] == "plain"  # no images: a string
    prompt = "".join(chr(t) for t in engine.requests[-1].prompt_token_ids)
    assert prompt == "<system>describe<user><image>and<image><assistant>two<user>now <image>?<user>plain<assistant>"


async def test_text_only_request_on_a_vision_model_sends_no_images(vision):
    engine, stub = vision
    await stub.CreateChatCompletion(chat())
    assert engine.requests[-1].images == ()


async def test_truncation_keeps_only_the_images_of_kept_messages():
    engine = ScriptedEngine(reply="ok", context_length=120, accepts_images=True)
    server, channel = await serve_engine(engine)
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    history = [{"role": "user", "content": [image_part("https://example.com/old.png"),
                                            {"type": "text", "text": "old " * 20}]},
               {"role": "assistant", "content": "x" * 10},
               {"role": "user", "content": [image_part("https://example.com/new.png"), {"type": "text", "text": "?"}]}]
    reply = await stub.CreateChatCompletion(chat(messages=history, max_tokens=10, truncation="auto"))
    assert reply.dropped_messages >= 1
    assert engine.requests[-1].images == ("https://example.com/new.png",)
    await channel.close()
    await server.stop(0)


@pytest.mark.parametrize("content, field", [
    ([image_part("file:///etc/passwd")], "messages[0].content[0].image_url.url"),
    ([image_part("/srv/cat.png")], "messages[0].content[0].image_url.url"),
    ([{"type": "text", "text": "x"}, image_part("ftp://example.com/a.png")], "messages[0].content[1].image_url.url"),
    ([image_part("https://")], "messages[0].content[0].image_url.url"),
    ([image_part("iVBORw0KGgo=")], "messages[0].content[0].image_url.url"),  # bare base64
    ([image_part("data:text/plain;base64,aGk=")], "messages[0].content[0].image_url.url"),
    ([image_part("data:image/png;base64,not base64!")], "messages[0].content[0].image_url.url"),
    ([image_part("data:image/png;base64,")], "messages[0].content[0].image_url.url"),
    ([image_part("https://example.com/a.png", detail="ultra")], "messages[0].content[0].image_url.detail"),
    ([{"type": "image_url"}], "messages[0].content[0].image_url"),
    ([image_part(f"https://example.com/{i}.png") for i in range(9)], "messages[0].content[8]"),
])
async def test_bad_images_are_400s_naming_the_part(vision, content, field):
    _, stub = vision
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateChatCompletion(chat(messages=[{"role": "user", "content": content}]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)["BadRequest"].field_violations[0].field == field
    assert field in caught.value.details()


async def test_image_cap_counts_across_messages(vision):
    _, stub = vision
    first = {"role": "user", "content": [image_part(f"https://example.com/{i}.png") for i in range(5)]}
    second = {"role": "user", "content": [image_part(f"https://example.com/b{i}.png") for i in range(4)]}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateChatCompletion(chat(messages=[first, second]))
    assert details(caught.value)["BadRequest"].field_violations[0].field == "messages[1].content[3]"
    assert "at most 8 images" in caught.value.details()


async def test_images_only_in_user_messages(vision):
    _, stub = vision
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateChatCompletion(chat(messages=[
            {"role": "system", "content": [image_part("https://example.com/a.png")]},
            {"role": "user", "content": "hi"}]))
    assert details(caught.value)["BadRequest"].field_violations[0].field == "messages[0].content[0]"


async def test_text_only_model_still_refuses_images(served):
    engine, stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateChatCompletion(chat(messages=[
            {"role": "user", "content": [image_part("https://example.com/a.png")]}]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not accept images" in caught.value.details()
    assert details(caught.value)["BadRequest"].field_violations[0].field == "messages[0].content[0]"
    assert engine.requests == []
