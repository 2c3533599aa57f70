"""The DashScope-style route (bridge/dashscope.py) through the real Envoy (product config) and the real bridge, in
front of the real GenerationServicer (service.server.create_server) with the scripted engine (it replies
"Hello world!", one character per token), driven with httpx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from _procs import HOST, free_port, run_envoy
from genrpc.bridge.dashscope import BadRequest, TEXT_GENERATION_PATH, plan_request
from genrpc import error_table
from genrpc.service.server import create_server
from genrpc.settings import Settings
from scripted_engine import ScriptedEngine
from test_envoy_config import start_bridge

REPLY = "Hello world!"
SSE = {"X-DashScope-SSE": "enable"}


# ---- the request mapping (no processes) ---------------------------------------------------------------------

def test_parameters_map_onto_the_protobuf_request():
    plan = plan_request({"model": "m", "input": {"messages": [{"role": "user", "content": "hi"}]}, "parameters": {
        "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 7, "max_tokens": 9, "stop": ["a", "b"],
        "repetition_penalty": 1.1, "presence_penalty": 0.2, "frequency_penalty": 0.3, "n": 2,
        "logprobs": True, "top_logprobs": 3, "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto", "parallel_tool_calls": False, "result_format": "message",
        "incremental_output": True, "enable_search": False}}, sse_header=False)
    r = plan.request
    assert plan.chat and not plan.stream and plan.incremental and plan.result_format == "message" and plan.n == 2
    assert (r.temperature, r.top_p, r.top_k, r.seed, r.max_tokens) == (0.5, 0.9, 5, 7, 9)
    assert [v.string_value for v in r.stop.list_value.values] == ["a", "b"]
    assert (r.repetition_penalty, r.presence_penalty, r.frequency_penalty, r.n) == (1.1, 0.2, 0.3, 2)
    assert r.logprobs and r.top_logprobs == 3 and r.response_format.type == "json_object"
    assert r.tools[0].function.name == "f" and r.tool_choice.string_value == "auto" and not r.parallel_tool_calls
    assert not r.HasField("stream_options")

    plan = plan_request({"model": "m", "input": {"prompt": "once"},
                         "parameters": {"top_k": 0, "logprobs": True, "top_logprobs": 2, "stop": "x"}},
                        sse_header=True)
    r = plan.request
    assert not plan.chat and plan.stream and plan.result_format == "text" and not plan.incremental
    assert r.prompt.string_value == "once" and not r.HasField("top_k")  # DashScope top_k 0 = off
    assert r.logprobs == 2 and r.stop.string_value == "x" and r.stream_options.include_usage


@pytest.mark.parametrize("params,named", [
    ({"enable_search": True}, "enable_search"),
    ({"search_options": {"forced_search": True}}, "search_options"),
    ({"foo": 1}, "foo"),
    ({"temperature": "hot"}, "temperature"),
    ({"stop": [[1, 2]]}, "stop"),
    ({"result_format": "xml"}, "result_format"),
    ({"n": 2}, "n"),  # n > 1 needs result_format message
])
def test_unsupported_parameters_are_refused_by_name(params, named):
    with pytest.raises(BadRequest) as exc:
        plan_request({"model": "m", "input": {"messages": [{"role": "user", "content": "hi"}]},
                      "parameters": params}, sse_header=False)
    assert f"parameters.{named}" in exc.value.message and exc.value.code == "InvalidParameter"


def test_chat_only_parameters_are_refused_with_a_prompt():
    with pytest.raises(BadRequest) as exc:
        plan_request({"model": "m", "input": {"prompt": "x"}, "parameters": {"tools": []}}, sse_header=False)
    assert "parameters.tools" in exc.value.message


# ---- through Envoy, in front of the real service -----------------------------------------------------------

@pytest.fixture(scope="module")
async def stack(tmp_path_factory):
    engine = ScriptedEngine(reply=REPLY)
    # one message per token: these tests check DashScope's per-token events (adaptive coalescing would merge them)
    settings = Settings(host=HOST, grpc_port=0, metrics_port=-1, shutdown_grace_s=1, log_level="warning",
                        stream_interval=1)
    server, port = create_server(settings, engine)
    await server.start()
    bsettings, bserver, btask = await start_bridge(port)
    try:
        with run_envoy(tmp_path_factory.mktemp("envoy-dashscope"), grpc_port=port,
                       bridge_port=bsettings.bridge_port, name="envoy-dashscope") as handle:
            yield handle, engine
    finally:
        bserver.should_exit = True
        await btask
        await server.stop(0)


@pytest.fixture
async def http(stack):
    async with httpx.AsyncClient(base_url=stack[0].base_url, timeout=30) as c:
        yield c


@pytest.fixture
async def model(http):
    return (await http.get("/v1/models")).json()["data"][0]["id"]


def messages_body(model: str, **parameters: Any) -> dict[str, Any]:
    return {"model": model, "input": {"messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "hi"}]}, "parameters": parameters}


def prompt_body(model: str, **parameters: Any) -> dict[str, Any]:
    return {"model": model, "input": {"prompt": "Once upon"}, "parameters": parameters}


def parse_events(raw: str) -> list[dict[str, Any]]:
    """DashScope SSE: `id:N`, `event:result|error`, `:HTTP_STATUS/NNN`, `data:{json}`, blank line."""
    assert raw.endswith("\n\n"), raw
    events = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert len(lines) == 4 and lines[0].startswith("id:") and lines[1].startswith("event:"), block
        assert lines[2].startswith(":HTTP_STATUS/") and lines[3].startswith("data:"), block
        events.append({"id": int(lines[0][3:]), "event": lines[1][6:], "status": int(lines[2][13:]),
                       "data": json.loads(lines[3][5:])})
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    return events


def assert_usage(usage: dict[str, Any], output_tokens: int) -> None:
    assert set(usage) == {"input_tokens", "output_tokens", "total_tokens"}, usage
    assert usage["output_tokens"] == output_tokens and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def assert_dashscope_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert not [h for h in resp.headers if h.startswith("grpc-")], resp.headers
    body = resp.json()
    assert set(body) == {"code", "message", "request_id"} and body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"] and body["request_id"]
    return body


async def test_messages_result_format_message(http, model):
    resp = await http.post(TEXT_GENERATION_PATH, json=messages_body(model, result_format="message"),
                           headers={"x-request-id": "ds-req-1"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json"), resp.text
    body = resp.json()
    assert set(body) == {"output", "usage", "request_id"} and body["request_id"] == "ds-req-1"
    assert body["output"] == {"choices": [{"finish_reason": "stop",
                                           "message": {"role": "assistant", "content": REPLY}}]}
    assert_usage(body["usage"], len(REPLY))


async def test_messages_default_text_format(http, model):
    body = (await http.post(TEXT_GENERATION_PATH, json=messages_body(model))).json()
    assert body["output"] == {"text": REPLY, "finish_reason": "stop"}
    assert_usage(body["usage"], len(REPLY))
    assert body["request_id"]  # Envoy's x-request-id when the client sends none


async def test_prompt_uses_generate(http, model, stack):
    body = (await http.post(TEXT_GENERATION_PATH, json=prompt_body(model, max_tokens=5))).json()
    assert body["output"] == {"text": REPLY[:5], "finish_reason": "length"}, body
    assert_usage(body["usage"], 5)
    assert list(stack[1].requests[-1].prompt_token_ids) == [ord(c) for c in "Once upon"]  # no chat template
    body = (await http.post(TEXT_GENERATION_PATH, json=prompt_body(model, max_tokens=20,
                                                                   result_format="message"))).json()
    assert body["output"]["choices"][0]["message"]["content"] == REPLY


async def test_parameters_reach_the_engine(http, model, stack):
    body = (await http.post(TEXT_GENERATION_PATH, json=messages_body(
        model, temperature=0.3, top_p=0.8, seed=11, max_tokens=30, stop=["wor"], enable_search=False))).json()
    assert body["output"] == {"text": "Hello ", "finish_reason": "stop"}, body  # the stop string is trimmed
    sampling = stack[1].requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (0.3, 0.8, 11)


async def test_sse_cumulative(http, model):
    async with http.stream("POST", TEXT_GENERATION_PATH, json=messages_body(model, result_format="message"),
                           headers=SSE) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = parse_events((await resp.aread()).decode())
    assert all(e["event"] == "result" and e["status"] == 200 for e in events)
    texts = [e["data"]["output"]["choices"][0]["message"]["content"] for e in events]
    reasons = [e["data"]["output"]["choices"][0]["finish_reason"] for e in events]
    assert texts == [REPLY[:i] for i in range(1, len(REPLY) + 1)] + [REPLY]  # cumulative, then the final event
    assert reasons[:-1] == ["null"] * (len(events) - 1) and reasons[-1] == "stop"
    assert_usage(events[-1]["data"]["usage"], len(REPLY))
    assert len({e["data"]["request_id"] for e in events}) == 1


async def test_sse_incremental_text_format(http, model):
    async with http.stream("POST", TEXT_GENERATION_PATH, json=messages_body(model, incremental_output=True),
                           headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status_code == 200
        events = parse_events((await resp.aread()).decode())
    outputs = [e["data"]["output"] for e in events]
    assert all(set(o) == {"text", "finish_reason"} for o in outputs)
    assert [o["text"] for o in outputs[:-1]] == list(REPLY) and "".join(o["text"] for o in outputs) == REPLY
    assert [o["finish_reason"] for o in outputs] == ["null"] * (len(outputs) - 1) + ["stop"]
    assert_usage(events[-1]["data"]["usage"], len(REPLY))


async def test_sse_prompt_incremental(http, model):
    async with http.stream("POST", TEXT_GENERATION_PATH, headers=SSE,
                           json=prompt_body(model, max_tokens=4, incremental_output=True)) as resp:
        events = parse_events((await resp.aread()).decode())
    assert "".join(e["data"]["output"]["text"] for e in events) == REPLY[:4]
    assert events[-1]["data"]["output"]["finish_reason"] == "length"
    assert_usage(events[-1]["data"]["usage"], 4)


@pytest.mark.parametrize("headers", [{}, SSE])
async def test_service_validation_error_in_dashscope_shape(http, model, headers):
    err = assert_dashscope_error(await http.post(TEXT_GENERATION_PATH, json=messages_body(model, temperature=5),
                                                 headers={**headers, "x-request-id": "ds-bad-1"}),
                                 400, "InvalidParameter")
    assert "temperature" in err["message"] and err["request_id"] == "ds-bad-1"


@pytest.mark.parametrize("headers", [{}, SSE])
async def test_unknown_model(http, headers):
    err = assert_dashscope_error(await http.post(TEXT_GENERATION_PATH, json=messages_body("no-such-model"),
                                                 headers=headers), 404, "ModelNotFound")
    assert "no-such-model" in err["message"]


@pytest.mark.parametrize("headers", [{}, SSE])
async def test_unknown_dashscope_parameter_is_400(http, model, headers):
    err = assert_dashscope_error(await http.post(TEXT_GENERATION_PATH, json=messages_body(model, enable_search=True),
                                                 headers=headers), 400, "InvalidParameter")
    assert "enable_search" in err["message"]
    err = assert_dashscope_error(await http.post(TEXT_GENERATION_PATH, json=messages_body(model, mystery=1)),
                                 400, "InvalidParameter")
    assert "parameters.mystery" in err["message"]


async def test_bad_bodies(http, model):
    assert_dashscope_error(await http.post(TEXT_GENERATION_PATH, content=b'{"model": ',
                                           headers={"content-type": "application/json"}), 400, "InvalidParameter")
    assert_dashscope_error(await http.post(TEXT_GENERATION_PATH, json={"model": model, "input": {}}),
                           400, "BadRequest.EmptyInput")
    assert_dashscope_error(await http.post(TEXT_GENERATION_PATH, json={"input": {"prompt": "x"}}),
                           400, "BadRequest.EmptyModel")
    assert_dashscope_error(await http.post("/api/v1/services/aigc/image-synthesis", json={}), 404, "InvalidURL")


async def test_raw_sse_framing(http, model):
    async with http.stream("POST", TEXT_GENERATION_PATH, headers=SSE,
                           json=prompt_body(model, max_tokens=2, incremental_output=True)) as resp:
        raw = (await resp.aread()).decode()
    first = raw.split("\n\n")[0]
    assert first.startswith('id:1\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"text":"H","finish_reason":"null"}')
    print(raw)


async def test_openai_routes_unchanged(http, model):
    resp = await http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user",
                                                                                       "content": "hi"}]})
    assert resp.json()["choices"][0]["message"]["content"] == REPLY


async def test_envoy_replies_are_dashscope_shaped(tmp_path):
    """Envoy's own replies on the DashScope prefix (bridge down: 503) use DashScope's shape too."""
    with run_envoy(tmp_path, grpc_port=free_port(), bridge_port=free_port(), name="envoy-ds-down") as handle:
        async with httpx.AsyncClient(base_url=handle.base_url, timeout=30) as http:
            resp = await http.post(TEXT_GENERATION_PATH, json=prompt_body("m"), headers={"x-request-id": "ds-503"})
            err = assert_dashscope_error(resp, 503, "ServiceUnavailable")
            assert err["request_id"] == "ds-503"
            # the OpenAI routes keep OpenAI's shape
            resp = await http.post("/v1/chat/completions", json={"model": "m", "messages": []})
            assert resp.status_code == 503 and set(resp.json()) == {"error"}


# ---- rendering units ----------------------------------------------------------------------------------------

def test_error_rendering_uses_the_shared_table():
    import grpc
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    from genrpc.bridge import errors

    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="MODEL_NOT_FOUND"))
    oe = errors.from_grpc_status(grpc.StatusCode.NOT_FOUND, "gone", status_pb2.Status(code=5, message="gone",
                                                                                       details=[info]))
    de = errors.to_dashscope(oe, "r1")
    assert (de.status, de.body) == (oe.status, {"code": "ModelNotFound", "message": "gone", "request_id": "r1"})
    for code, (status, _, _) in error_table.GRPC_ERROR_MAP.items():
        de = errors.to_dashscope(errors.from_grpc_status(code, "m"), "r")
        assert de.status == status and de.body["code"] == errors.DASHSCOPE_GRPC_CODES[code]
    assert errors.to_dashscope(errors.http_error(413, "big"), "r").body["code"] == "BadRequest.TooLarge"
    event = errors.to_dashscope(errors.from_grpc_status(13, "boom"), "r").sse_event(7)
    assert event == b'id:7\nevent:error\n:HTTP_STATUS/500\ndata:{"code":"InternalError","message":"boom",' \
                    b'"request_id":"r"}\n\n'


def test_stream_renderer_merges_tool_calls_cumulatively():
    from google.protobuf import struct_pb2

    from genrpc.bridge.dashscope import StreamRenderer
    from genrpc.v1 import chat_pb2, common_pb2

    plan = plan_request({"model": "m", "input": {"messages": [{"role": "user", "content": "hi"}]},
                         "parameters": {"result_format": "message"}}, sse_header=True)
    r = StreamRenderer(plan, "rid")

    def chunk(delta, finish=None, usage=None):
        fr = struct_pb2.Value(string_value=finish) if finish else struct_pb2.Value(null_value=0)
        return chat_pb2.ChatCompletionChunk(choices=[chat_pb2.ChatCompletionChunkChoice(
            index=0, delta=delta, finish_reason=fr)], usage=usage)

    tc = chat_pb2.ToolCallDelta
    fn = chat_pb2.FunctionCallDelta
    assert r.feed(chunk(chat_pb2.ChatCompletionDelta(role="assistant", content=""))) == b""
    r.feed(chunk(chat_pb2.ChatCompletionDelta(tool_calls=[tc(index=0, id="call_1", type="function",
                                                             function=fn(name="get", arguments=""))])))
    r.feed(chunk(chat_pb2.ChatCompletionDelta(tool_calls=[tc(index=0, function=fn(arguments='{"a":'))])))
    assert r.feed(chunk(chat_pb2.ChatCompletionDelta(tool_calls=[tc(index=0, function=fn(arguments="1}"))]),
                        finish="tool_calls", usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=4,
                                                                    total_tokens=7))) == b""  # held
    last = json.loads(r.finish().decode().split("data:", 1)[1])
    choice = last["output"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == ""
    assert choice["message"]["tool_calls"] == [{"id": "call_1", "type": "function",
                                                "function": {"name": "get", "arguments": '{"a":1}'}}]
    assert last["usage"] == {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
