"""The Responses API and token counting over gRPC (grpcio against the real server, in process).

Most checks run on the scripted engine (exact, predictable text and token counts); one runs the real model.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from genrpc.settings import Settings
from genrpc.v1 import chat_pb2, generation_service_pb2_grpc, responses_pb2
from genrpc.service.engines.base import EngineInternalError
from genrpc.service.server import create_server
from tests.scripted_engine import ScriptedEngine

REPLY = "Hello world! Bye."
TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def req(**fields) -> responses_pb2.CreateResponseRequest:
    body = {"model": "scripted", "input": "hi", **fields}
    return json_format.ParseDict(body, responses_pb2.CreateResponseRequest())


async def _serve(tmp_path, engine):
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1, cache_dir=tmp_path), engine)
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
async def served(tmp_path):
    engine = ScriptedEngine(reply=REPLY, context_length=4096)
    server, channel = await _serve(tmp_path, engine)
    try:
        yield engine, generation_service_pb2_grpc.GenerationServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


def bad_field(error: grpc.aio.AioRpcError) -> str:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    raise AssertionError("no BadRequest detail")


async def test_create_text_and_usage_equals_count(served):
    _, stub = served
    request = req(instructions="Be brief.", metadata={"k": "v"})
    response = await stub.CreateResponse(request)
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    [item] = response.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.content[0].type == "output_text" and item.content[0].text == REPLY
    prompt = len("<system>Be brief.<user>hi<assistant>")
    assert response.usage.input_tokens == prompt and response.usage.output_tokens == len(REPLY)
    assert response.usage.total_tokens == prompt + len(REPLY)
    count = await stub.CountInputTokens(request)
    assert count.object == "response.input_tokens" and count.input_tokens == response.usage.input_tokens
    assert response.incomplete_details.WhichOneof("kind") == "null_value"
    assert dict(response.metadata) == {"k": "v"} and response.instructions.string_value == "Be brief."


async def test_max_output_tokens_incomplete(served):
    _, stub = served
    response = await stub.CreateResponse(req(max_output_tokens=5))
    assert response.status == "incomplete" and response.output[0].content[0].text == "Hello"
    assert json_format.MessageToDict(response.incomplete_details) == {"reason": "max_output_tokens"}
    assert response.output[0].status == "incomplete"


async def test_json_schema_constrains_decoding(served):
    engine, stub = served
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    await stub.CreateResponse(req(text={"format": {"type": "json_schema", "name": "thing", "schema": schema}}))
    assert json.loads(engine.requests[-1].sampling.json_schema) == schema  # the chat path's constraint


async def test_stream_events_in_order(served):
    _, stub = served
    events = [e async for e in stub.StreamResponse(req(stream=True, stream_interval=1))]  # a delta per token
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["created", "in_progress", "output_item_added", "content_part_added",
                     *["output_text_delta"] * len(REPLY), "output_text_done", "content_part_done",
                     "output_item_done", "completed"]
    payloads = [getattr(e, e.WhichOneof("event")) for e in events]
    assert [p.sequence_number for p in payloads] == list(range(len(events)))
    assert payloads[0].type == "response.created" and payloads[-1].type == "response.completed"
    assert "".join(p.delta for p in payloads if p.type == "response.output_text.delta") == REPLY
    final = payloads[-1].response
    assert final.output[0].content[0].text == REPLY and final.usage.output_tokens == len(REPLY)
    assert payloads[0].response.status == "in_progress" and not payloads[0].response.output
    stored = await stub.GetResponse(responses_pb2.GetResponseRequest(response_id=final.id))
    assert stored == final


async def test_stream_interval_groups_deltas(served):
    engine, stub = served
    engine.step_delay_s = 0.005  # decode steps apart, so grouping is by count (a burst would merge anyway)
    events = [e async for e in stub.StreamResponse(req(stream=True, stream_interval=5))]
    deltas = [e.output_text_delta.delta for e in events if e.WhichOneof("event") == "output_text_delta"]
    assert "".join(deltas) == REPLY and 1 < len(deltas) < len(REPLY)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await anext(aiter(stub.StreamResponse(req(stream=True, stream_interval=-1))))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_field(caught.value) == "stream_interval"


async def test_tool_call_round_trip_and_stream(tmp_path):
    engine = ScriptedEngine(reply=TOOL_REPLY, context_length=4096)
    server, channel = await _serve(tmp_path, engine)
    try:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        first = await stub.CreateResponse(req(input="Weather in Paris?", tools=[TOOL]))
        [call] = first.output
        assert call.type == "function_call" and call.name == "get_weather" and call.id.startswith("fc_")
        assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id

        engine.reply = "It is sunny."
        second = await stub.CreateResponse(req(previous_response_id=first.id, tools=[TOOL], input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}]))
        assert second.output[0].content[0].text == "It is sunny."
        templated = engine.tokenizer.templated[-1]
        assert [m["role"] for m in templated] == ["system", "user", "assistant", "user"]  # tools inlined
        assert '"city": "Paris"' in templated[2]["content"] and '{"sky": "sunny"}' in templated[3]["content"]
        items = await stub.ListInputItems(responses_pb2.ListInputItemsRequest(response_id=second.id))
        assert [i.type for i in items.data] == ["function_call_output"] and items.data[0].call_id == call.call_id

        engine.reply = TOOL_REPLY
        events = [e async for e in stub.StreamResponse(req(stream=True, tools=[TOOL], store=False))]
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds == ["created", "in_progress", "output_item_added", "function_call_arguments_delta",
                         "function_call_arguments_done", "output_item_done", "completed"]
        done = events[4].function_call_arguments_done
        assert done.name == "get_weather" and json.loads(done.arguments) == {"city": "Paris"}
        assert events[2].output_item_added.item.arguments == ""
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # store: false keeps nothing
            await stub.GetResponse(responses_pb2.GetResponseRequest(response_id=events[-1].completed.response.id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()
        await server.stop(0)


async def test_previous_response_id_continues(served):
    engine, stub = served
    first = await stub.CreateResponse(req(input="My name is Ada.", instructions="Be kind."))
    second = await stub.CreateResponse(req(input="What is my name?", previous_response_id=first.id))
    assert second.previous_response_id.string_value == first.id
    templated = engine.tokenizer.templated[-1]
    # instructions are not carried over; the history (input and output) is
    assert templated == [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": REPLY},
                         {"role": "user", "content": "What is my name?"}]
    assert second.usage.input_tokens == len("<user>My name is Ada.<assistant>" + REPLY +
                                            "<user>What is my name?<assistant>")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateResponse(req(previous_response_id="resp_unknown"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and bad_field(caught.value) == "previous_response_id"


async def test_get_delete_input_items(served):
    _, stub = served
    response = await stub.CreateResponse(req(input=[
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "three"}]}]))
    got = await stub.GetResponse(responses_pb2.GetResponseRequest(response_id=response.id))
    assert got == response
    page = await stub.ListInputItems(responses_pb2.ListInputItemsRequest(response_id=response.id, limit=2))
    assert [i.content[0].text for i in page.data] == ["three", "two"] and page.has_more
    rest = await stub.ListInputItems(responses_pb2.ListInputItemsRequest(response_id=response.id,
                                                                         after=page.last_id))
    assert [i.content[0].text for i in rest.data] == ["one"] and not rest.has_more
    asc = await stub.ListInputItems(responses_pb2.ListInputItemsRequest(response_id=response.id, order="asc"))
    assert [i.role for i in asc.data] == ["user", "assistant", "user"]
    deleted = await stub.DeleteResponse(responses_pb2.DeleteResponseRequest(response_id=response.id))
    assert deleted.deleted and deleted.id == response.id
    for call in (stub.GetResponse(responses_pb2.GetResponseRequest(response_id=response.id)),
                 stub.DeleteResponse(responses_pb2.DeleteResponseRequest(response_id=response.id))):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("fields, field", [
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"instructions": "x", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/a.png"}]}]}, "input[0].content[0]"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"stream": True}, "stream"),
])
async def test_refusals_name_the_field(served, fields, field):
    _, stub = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateResponse(req(**fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field(caught.value) == field, caught.value.details()
    assert "messages" not in caught.value.details() and "response_format" not in caught.value.details()


async def test_cancelled_stream_frees_the_slot(tmp_path):
    engine = ScriptedEngine(reply="x" * 200, context_length=4096, step_delay_s=0.02)
    server, channel = await _serve(tmp_path, engine)
    try:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        call = stub.StreamResponse(req(stream=True))
        async for event in call:
            if event.WhichOneof("event") == "output_text_delta":
                break
        call.cancel()
        deadline = asyncio.get_running_loop().time() + 5
        while engine.running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert engine.running == 0 and len(engine.closed_early) == 1
    finally:
        await channel.close()
        await server.stop(0)


async def test_tokenize_detokenize(served):
    _, stub = served
    messages = [{"role": "user", "content": "hi"}]
    tokens = await stub.Tokenize(json_format.ParseDict({"messages": messages, "return_token_strs": True},
                                                       responses_pb2.TokenizeRequest()))
    chat = await stub.CreateChatCompletion(json_format.ParseDict({"model": "scripted", "messages": messages},
                                                                 chat_pb2.ChatCompletionRequest()))
    assert tokens.count == chat.usage.prompt_tokens == len(tokens.tokens)
    assert "".join(tokens.token_strs) == "<user>hi<assistant>" and tokens.max_model_len == 4096
    text = await stub.Detokenize(responses_pb2.DetokenizeRequest(tokens=tokens.tokens))
    assert text.prompt == "<user>hi<assistant>"
    plain = await stub.Tokenize(responses_pb2.TokenizeRequest(prompt="abc"))
    assert list(plain.tokens) == [97, 98, 99]
    for bad, field in ((responses_pb2.TokenizeRequest(messages=[chat_pb2.ChatMessage(role="user")],
                                                      add_generation_prompt=False), "add_generation_prompt"),
                       (responses_pb2.TokenizeRequest(), "prompt")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Tokenize(bad)
        assert bad_field(caught.value) == field
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Detokenize(responses_pb2.DetokenizeRequest(tokens=[-1]))
    assert bad_field(caught.value) == "tokens"


class FailingEngine(ScriptedEngine):
    """Fails after its first token, once `fail` is set (after the client saw that token), like an engine that
    dies mid-stream."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fail = asyncio.Event()

    async def generate(self, request):
        async for delta in super().generate(request):
            yield delta
            await self.fail.wait()
            raise EngineInternalError("the engine fell over")


async def test_failure_after_start_is_error_then_failed_event(tmp_path):
    engine = FailingEngine(reply=REPLY, context_length=4096)
    server, channel = await _serve(tmp_path, engine)
    try:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        events = []
        async for event in stub.StreamResponse(req(stream=True)):
            events.append(event)
            if event.WhichOneof("event") == "output_text_delta":
                engine.fail.set()
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds == ["created", "in_progress", "output_item_added", "content_part_added", "output_text_delta",
                         "error", "failed"]
        assert events[-2].error.code == "ENGINE_FAILURE" and "fell over" in events[-2].error.message
        failed = events[-1].failed
        assert failed.sequence_number == 6 and failed.response.status == "failed"
        assert json_format.MessageToDict(failed.response.error)["code"] == "server_error"
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # a failed response is not stored
            await stub.GetResponse(responses_pb2.GetResponseRequest(response_id=failed.response.id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()
        await server.stop(0)


async def test_real_model_create_stream_and_counts(tmp_path):
    """The bundled SmolLM2 on the reference engine: text, a stream, and counts equal to usage."""
    from genrpc.service.engines.factory import build_engine

    engine = build_engine(Settings(engine="reference", max_batch_size=2))  # default cache_dir: the converted
    # model is reused
    server, channel = await _serve(tmp_path, engine)
    try:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        model = engine.model_info.model_id
        request = req(model=model, input="What is the capital of France?", instructions="Answer briefly.",
                      max_output_tokens=12, temperature=0)
        response = await stub.CreateResponse(request)
        assert response.status in ("completed", "incomplete") and response.output[0].content[0].text.strip()
        assert 0 < response.usage.output_tokens <= 12
        count = await stub.CountInputTokens(request)
        tokens = await stub.Tokenize(json_format.ParseDict({"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"}]}, responses_pb2.TokenizeRequest()))
        assert response.usage.input_tokens == count.input_tokens == tokens.count
        request.stream = True
        events = [e async for e in stub.StreamResponse(request)]
        final = getattr(events[-1], events[-1].WhichOneof("event")).response
        text = "".join(e.output_text_delta.delta for e in events if e.WhichOneof("event") == "output_text_delta")
        assert text == final.output[0].content[0].text == response.output[0].content[0].text  # greedy: same text
        assert final.usage == response.usage
    finally:
        await channel.close()
        await server.stop(0)


async def test_stateless_round_trip_with_function_call_items(served):
    engine, stub = served
    response = await stub.CreateResponse(req(store=False, tools=[TOOL], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]))
    assert response.store is False and response.output[0].content[0].text == REPLY
    templated = engine.tokenizer.templated[-1]
    assert [m["role"] for m in templated] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in templated[2]["content"] and "sunny" in templated[3]["content"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateResponse(req(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]))
    assert bad_field(caught.value) == "input[0].call_id"


def test_store_retention(tmp_path, monkeypatch):
    from genrpc.service import response_store

    store = response_store.ResponseStore(tmp_path / "r.sqlite3", retention_s=10)
    store.put("resp_1", response_store.StoredResponse({"id": "resp_1"}, [], []))
    assert store.get("resp_1").response == {"id": "resp_1"}
    now = response_store.time.time()
    monkeypatch.setattr(response_store.time, "time", lambda: now + 11)
    assert store.get("resp_1") is None and not store.delete("resp_1")  # expired: never returned
    store.put("resp_2", response_store.StoredResponse({"id": "resp_2"}, [], []))  # purges the expired row
    assert store._db().execute("SELECT id FROM responses").fetchall() == [("resp_2",)]
    store.close()


async def test_unwritable_store_is_a_clear_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    server, channel = await _serve(not_a_dir, ScriptedEngine(reply=REPLY, context_length=4096))
    try:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateResponse(req())
        assert caught.value.code() == grpc.StatusCode.INTERNAL and "response store" in caught.value.details()
        assert (await stub.CreateResponse(req(store=False))).status == "completed"
    finally:
        await channel.close()
        await server.stop(0)


async def test_text_then_tool_call_items_in_order(tmp_path):
    engine = ScriptedEngine(reply="Let me check." + TOOL_REPLY, context_length=4096)
    server, channel = await _serve(tmp_path, engine)
    try:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        events = [e async for e in stub.StreamResponse(req(stream=True, tools=[TOOL]))]
        kinds = [e.WhichOneof("event") for e in events]
        deltas = kinds.count("output_text_delta")
        assert kinds == ["created", "in_progress", "output_item_added", "content_part_added",
                         *["output_text_delta"] * deltas, "output_text_done", "content_part_done", "output_item_done",
                         "output_item_added", "function_call_arguments_delta", "function_call_arguments_done",
                         "output_item_done", "completed"]
        final = events[-1].completed.response
        assert [i.type for i in final.output] == ["message", "function_call"]
        assert final.output[0].content[0].text == "Let me check."
        assert [events[i].output_item_added.output_index for i, k in enumerate(kinds)
                if k == "output_item_added"] == [0, 1]
        unary = await stub.CreateResponse(req(tools=[TOOL]))
        assert [i.type for i in unary.output] == ["message", "function_call"]
    finally:
        await channel.close()
        await server.stop(0)


async def test_input_image_reaches_a_vision_engine(tmp_path):
    engine = ScriptedEngine(reply=REPLY, context_length=4096, accepts_images=True)
    server, channel = await _serve(tmp_path, engine)
    try:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        url = "https://example.com/cat.png"
        response = await stub.CreateResponse(req(input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": url}]}]))
        assert engine.requests[-1].images == (url,) and response.status == "completed"
        items = await stub.ListInputItems(responses_pb2.ListInputItemsRequest(response_id=response.id))
        assert [p.type for p in items.data[0].content] == ["input_text", "input_image"]
        assert items.data[0].content[1].image_url == url
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # the chat path's image rules, Responses names
            await stub.CreateResponse(req(input=[{"role": "user", "content": [
                {"type": "input_image", "image_url": "file:///etc/passwd"}]}]))
        assert bad_field(caught.value) == "input[0].content[0].image_url.url"
    finally:
        await channel.close()
        await server.stop(0)
