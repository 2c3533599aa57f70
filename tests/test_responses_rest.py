"""The Responses API and token counting over REST: the official `openai` SDK in strict response-validation mode
and httpx, through the real Envoy (transcoder for unary, the real bridge for `"stream": true`), in front of the
real gRPC server (scripted engine, in process)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from _procs import HOST, run_envoy
from test_envoy_config import start_bridge
from genrpc.settings import Settings
from genrpc.service.server import create_server
from tests.scripted_engine import ScriptedEngine

REPLY = "Hello world! Bye."
TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}}
TOOL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
async def service(tmp_path_factory):
    engine = ScriptedEngine(reply=REPLY, context_length=4096)
    server, port = create_server(Settings(host=HOST, grpc_port=0, metrics_port=-1,
                                          cache_dir=tmp_path_factory.mktemp("cache")), engine)
    await server.start()
    yield engine, port
    await server.stop(0)


@pytest.fixture(scope="module")
async def bridge_url(service):
    settings, bridge, task = await start_bridge(service[1])
    try:
        yield f"http://{HOST}:{settings.bridge_port}"
    finally:
        bridge.should_exit = True
        await task


@pytest.fixture(scope="module")
async def envoy(tmp_path_factory, service, bridge_url):
    with run_envoy(tmp_path_factory.mktemp("envoy"), grpc_port=service[1],
                   bridge_port=int(bridge_url.rsplit(":", 1)[1])) as handle:
        yield handle


@pytest.fixture
async def client(envoy, service):
    service[0].reply = REPLY
    async with openai.AsyncOpenAI(base_url=f"{envoy.base_url}/v1", api_key="x", max_retries=0, timeout=30,
                                  _strict_response_validation=True) as c:
        yield c


async def test_create_retrieve_input_items_delete(client):
    response = await client.responses.create(model="scripted", input="hi", instructions="Be brief.",
                                             metadata={"k": "v"})
    assert response.object == "response" and response.status == "completed" and response.output_text == REPLY
    assert response.usage.input_tokens == len("<system>Be brief.<user>hi<assistant>")
    assert response.usage.output_tokens == len(REPLY) and response.usage.input_tokens_details.cached_tokens == 0
    assert response.tools == [] and response.metadata == {"k": "v"} and response.error is None
    count = await client.responses.input_tokens.count(model="scripted", input="hi", instructions="Be brief.")
    assert count.input_tokens == response.usage.input_tokens

    got = await client.responses.retrieve(response.id)
    assert got.model_dump() == response.model_dump()
    items = await client.responses.input_items.list(response.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "hi"
    deleted = await client.responses.delete(response.id)
    assert deleted is None  # the SDK returns nothing for a 200
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_incomplete_and_json_schema(client, service):
    cut = await client.responses.create(model="scripted", input="hi", max_output_tokens=5)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output_text == "Hello"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    await client.responses.create(model="scripted", input="hi", text={"format": {
        "type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    assert json.loads(service[0].requests[-1].sampling.json_schema) == schema


async def test_tool_call_round_trip(client, service):
    service[0].reply = TOOL_REPLY
    first = await client.responses.create(model="scripted", input="Weather in Paris?", tools=[TOOL])
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    service[0].reply = "It is sunny."
    second = await client.responses.create(
        model="scripted", previous_response_id=first.id, tools=[TOOL],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}])
    assert second.output_text == "It is sunny." and second.previous_response_id == first.id
    assert '{"sky": "sunny"}' in service[0].tokenizer.templated[-1][-1]["content"]


async def test_stream_every_event_parsed_in_order(client):
    async with client.responses.stream(model="scripted", input="hi", extra_body={"stream_interval": 1}) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    types = [e.type for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(REPLY),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == REPLY and final.status == "completed"
    assert (await client.responses.retrieve(final.id)).output_text == REPLY


async def test_stream_tool_call_events(client, service):
    service[0].reply = TOOL_REPLY
    async with client.responses.stream(model="scripted", input="Weather?", tools=[TOOL]) as stream:
        events = [event async for event in stream]
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert json.loads(events[4].arguments) == {"city": "Paris"}
    assert events[-1].response.output[0].type == "function_call"


@pytest.fixture
def slow_engine(service):
    engine = service[0]
    engine.reply, engine.step_delay_s = "x" * 400, 0.02
    yield engine
    engine.reply, engine.step_delay_s = REPLY, 0.0


async def _wait_idle(engine, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while engine.running and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


async def test_client_disconnect_frees_the_slot(envoy, slow_engine):
    """A streamed response whose client leaves (through Envoy's stream route and the bridge's stream core)."""
    closed_before = len(slow_engine.closed_early)
    async with httpx.AsyncClient(base_url=envoy.base_url, timeout=30) as http:
        async with http.stream("POST", "/v1/responses", json={"model": "scripted", "input": "hi",
                                                              "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line == "event: response.output_text.delta":
                    break
    await _wait_idle(slow_engine)
    assert slow_engine.running == 0 and len(slow_engine.closed_early) == closed_before + 1


async def test_deadline_after_start_is_an_error_event(bridge_url, slow_engine):
    """The core's deadline (Envoy's expected-timeout header) cuts the stream: one `error` event, numbered next."""
    async with httpx.AsyncClient(base_url=bridge_url, timeout=30) as http:
        response = await http.post("/v1/responses", json={"model": "scripted", "input": "hi", "stream": True},
                                   headers={"x-envoy-expected-rq-timeout-ms": "300"})
    frames = [frame.split("\n") for frame in response.text.split("\n\n") if frame]
    events = [(kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))) for kind, data in frames]
    assert [kind for kind, _ in events[:2]] == ["response.created", "response.in_progress"]
    kind, error = events[-1]
    assert kind == "error" and error["code"] == "timeout" and "response.completed" not in [k for k, _ in events]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    await _wait_idle(slow_engine)
    assert slow_engine.running == 0


async def test_refusals_are_openai_400s(client):
    for kwargs, param in (({"background": True}, "background"),
                          ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
                          ({"reasoning": {"effort": "high"}}, "reasoning")):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model="scripted", input="hi", **kwargs)
        assert caught.value.body["param"] == param
        with pytest.raises(openai.BadRequestError) as caught:  # the same through the bridge
            await client.responses.create(model="scripted", input="hi", stream=True, **kwargs)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="scripted", input="hi", previous_response_id="resp_nope")


async def test_tokenize_detokenize(envoy):
    async with httpx.AsyncClient(base_url=envoy.base_url, timeout=30) as http:
        tokens = (await http.post("/tokenize", json={"model": "scripted", "messages": [
            {"role": "user", "content": "hi"}]})).json()
        assert tokens["count"] == len("<user>hi<assistant>") == len(tokens["tokens"])
        assert tokens["max_model_len"] == 4096
        text = (await http.post("/detokenize", json={"tokens": tokens["tokens"]})).json()
        assert text == {"prompt": "<user>hi<assistant>"}
        bad = await http.post("/detokenize", json={"tokens": [-5]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


async def test_input_items_paging_over_rest(client):
    response = await client.responses.create(model="scripted", input=[
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"}])
    page = await client.responses.input_items.list(response.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["one", "two"] and page.has_more
    rest = await client.responses.input_items.list(response.id, limit=2, order="asc", after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["three"] and not rest.has_more


async def test_new_routes_need_the_api_key_and_allow_cors(tmp_path, service):
    origin = "https://app.example.com"
    with run_envoy(tmp_path, grpc_port=service[1], bridge_port=1, api_keys={"sk-test-123456": "team-a"},
                   cors_allowed_origins=[origin]) as envoy:
        async with httpx.AsyncClient(base_url=envoy.base_url, timeout=30) as http:
            preflight = await http.options("/v1/responses/resp_x", headers={
                "origin": origin, "access-control-request-method": "DELETE"})
            assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
            assert "DELETE" in {m.strip() for m in preflight.headers["access-control-allow-methods"].split(",")}
            for method, path, body in (("POST", "/v1/responses", {"model": "scripted", "input": "hi"}),
                                       ("POST", "/v1/responses", {"model": "scripted", "input": "hi",
                                                                  "stream": True}),
                                       ("GET", "/v1/responses/resp_x", None),
                                       ("DELETE", "/v1/responses/resp_x", None),
                                       ("GET", "/v1/responses/resp_x/input_items", None),
                                       ("POST", "/v1/responses/input_tokens", {"input": "hi"}),
                                       ("POST", "/tokenize", {"prompt": "hi"})):
                refused = await http.request(method, path, json=body)
                assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            ok = await http.post("/v1/responses/input_tokens", json={"input": "hi"},
                                 headers={"authorization": "Bearer sk-test-123456"})
            assert ok.status_code == 200 and ok.json() == {"object": "response.input_tokens",
                                                           "input_tokens": len("<user>hi<assistant>")}


def test_real_model_through_the_whole_stack(stack):
    """`genrpc up` (the real model, Envoy, bridge): create, stream, retrieve, count, with the strict SDK."""
    client = openai.OpenAI(base_url=stack.openai_base_url, api_key="unused", max_retries=0, timeout=120,
                           _strict_response_validation=True)
    kwargs = dict(model=stack.model, input="Name a colour.", max_output_tokens=8, temperature=0)
    response = client.responses.create(**kwargs)
    assert response.status in ("completed", "incomplete") and response.output_text.strip()
    count = client.responses.input_tokens.count(model=stack.model, input=kwargs["input"])
    assert count.input_tokens == response.usage.input_tokens
    assert client.responses.retrieve(response.id).output_text == response.output_text
    with client.responses.stream(**kwargs) as stream:
        events = [event for event in stream]
    final = events[-1].response  # get_final_response() needs response.completed; max_output_tokens may cut it
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == f"response.{final.status}"
    # Not compared token for token with the unary text: llama.cpp (the default engine) reuses the first request's
    # KV cache, which is not bit-identical to a full prefill, so greedy paths can part.
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text.strip() and deltas == final.output_text
    assert final.usage.input_tokens == response.usage.input_tokens


def test_error_frame_is_an_sdk_error_event():
    from openai.types.responses import ResponseErrorEvent

    from genrpc.bridge.errors import http_error
    from genrpc.bridge.responses_sse import error_frame

    frame = error_frame(http_error(503, "The service is shutting down."), 7).decode()
    event_line, data_line, *_ = frame.split("\n")
    assert event_line == "event: error" and frame.endswith("\n\n")
    event = ResponseErrorEvent.model_validate(json.loads(data_line.removeprefix("data: ")))
    assert event.sequence_number == 7 and event.message == "The service is shutting down."
