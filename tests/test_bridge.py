"""The SSE bridge on its own (real uvicorn server in this loop, scripted gRPC service from test_envoy_config)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from genrpc.bridge import errors
from genrpc.bridge.openai_api import chunk_to_dict
from genrpc.v1 import chat_pb2, common_pb2
# The scripted gRPC backend and the real bridge in front of it: the same module-scoped fixtures as there.
from test_envoy_config import MODEL, SPECIAL_MSG, backend, bridge  # noqa: F401 - pytest fixtures


@pytest.fixture
async def http(bridge):
    async with httpx.AsyncClient(base_url=f"http://{bridge.host}:{bridge.bridge_port}", timeout=30) as c:
        yield c


def chat_body(model: str = MODEL, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, **kw}


def parse_sse(raw: str) -> list[Any]:
    frames = [f for f in raw.split("\n\n") if f]
    assert raw.endswith("\n\n") and all(f.startswith("data: ") for f in frames), raw
    return [f[6:] if f == "data: [DONE]" else json.loads(f[6:]) for f in frames]


# ---- the error function -----------------------------------------------------------------------------------

def packed(*msgs) -> list[any_pb2.Any]:
    out = []
    for m in msgs:
        a = any_pb2.Any()
        a.Pack(m)
        out.append(a)
    return out


def test_error_mapping_with_details():
    st = status_pb2.Status(code=3, message="temperature must be in [0, 2]", details=packed(
        error_details_pb2.ErrorInfo(reason="INVALID_PARAMETER", domain="genrpc.dev", metadata={"param": "x"}),
        error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="temperature", description="too hot")])))
    err = errors.from_grpc_status(grpc.StatusCode.INVALID_ARGUMENT, "ignored (Status wins)", st)
    assert err.status == 400
    assert err.body == {"error": {"message": "temperature must be in [0, 2]", "type": "invalid_request_error",
                                  "param": "temperature", "code": "invalid_parameter"}}
    assert err.sse_event().startswith(b'data: {"error":{') and err.sse_event().endswith(b"}}\n\n")


def test_error_mapping_model_not_found_uses_errorinfo():
    st = status_pb2.Status(code=5, message="no such model", details=packed(
        error_details_pb2.ErrorInfo(reason="MODEL_NOT_FOUND", metadata={"param": "model"})))
    err = errors.from_grpc_status(5, "no such model", st)
    assert (err.status, err.body["error"]["code"], err.body["error"]["param"]) == (404, "model_not_found", "model")


@pytest.mark.parametrize("code,status,type_", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
    (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
    (grpc.StatusCode.INTERNAL, 500, "server_error"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
    (grpc.StatusCode.CANCELLED, 499, "invalid_request_error"),
    (grpc.StatusCode.UNKNOWN, 500, "server_error"),
])
def test_error_mapping_without_details(code, status, type_):
    err = errors.from_grpc_status(code, "boom", None)
    assert err.status == status and err.body["error"]["type"] == type_
    assert err.body["error"]["message"] == "boom" and err.body["error"]["param"] is None
    assert errors.from_grpc_status(code, "", None).body["error"]["message"] == code.name


def test_chunk_json_mapping():
    c = chat_pb2.ChatCompletionChunk(id="x", object="chat.completion.chunk", created=1, model="m",
                                     choices=[chat_pb2.ChatCompletionChunkChoice(index=0)],
                                     usage=common_pb2.Usage(prompt_tokens=0, completion_tokens=1, total_tokens=1))
    assert "usage" not in chunk_to_dict(c) and chunk_to_dict(c)["choices"] == [{"index": 0}]
    u = chat_pb2.ChatCompletionChunk(id="x", created=1, usage=common_pb2.Usage(prompt_tokens=0))
    assert chunk_to_dict(u) == {"id": "x", "created": 1, "choices": [], "usage": {"prompt_tokens": 0}}


# ---- SSE order ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [MODEL, "nousagechunk"])
@pytest.mark.parametrize("include_usage", [None, False, True])
async def test_chat_sse_order(http, model, include_usage):
    body = chat_body(model) if include_usage is None else chat_body(
        model, stream_options={"include_usage": include_usage})
    resp = await http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream" and resp.headers["cache-control"] == "no-cache"
    events = parse_sse(resp.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["choices"][0]["finish_reason"] is None
    with_choices = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in with_choices) == "Hello world"
    assert [c["choices"][0]["finish_reason"] for c in with_choices][-1] == "stop"
    assert all("usage" not in c for c in with_choices)
    if include_usage and model != "nousagechunk":
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
            "prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        assert chunks[-1]["id"] == chunks[0]["id"] and chunks[-1]["model"] == model
        assert len(chunks) == len(with_choices) + 1
    else:  # the bridge forwards the service's usage chunk; it makes none up
        assert len(chunks) == len(with_choices)
    assert len({c["id"] for c in chunks}) == 1


async def test_completion_sse(http, backend):
    resp = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True,
                                                    "stream_options": {"include_usage": True}})
    events = parse_sse(resp.text)
    assert backend[0].calls[-1][0] == "Generate" and events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in events[:-2]) == "Hello world"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] == 9


async def test_unknown_fields_ignored_and_metadata_forwarded(http, backend):
    resp = await http.post("/v1/chat/completions", json=chat_body(not_a_field={"x": 1}, temperature=0.5),
                           headers={"x-request-id": "rid-1", "x-client-id": "team-a", "authorization": "Bearer k"})
    assert resp.status_code == 200
    method, request, md = backend[0].calls[-1]
    assert method == "Chat" and request.temperature == 0.5
    assert md["x-request-id"] == "rid-1" and md["x-client-id"] == "team-a" and "authorization" not in md


async def test_deadline_forwarded(http, backend):
    await http.post("/v1/chat/completions", json=chat_body(), headers={"x-envoy-expected-rq-timeout-ms": "30000"})
    # a deadline too short for the slow stream ends it with DEADLINE_EXCEEDED -> SSE error event
    resp = await http.post("/v1/chat/completions", json=chat_body("slow"),
                           headers={"x-envoy-expected-rq-timeout-ms": "300"})
    events = parse_sse(resp.text)
    assert events[-1]["error"]["type"] == "server_error" and events[-1]["error"]["code"] == "timeout"


# ---- errors -----------------------------------------------------------------------------------------------

async def test_bad_json_is_400(http):
    for raw in (b'{"model": ', b"[1, 2]", b"", b'{"model": 5, "stream": true}', b"\xff\xfe",
                b'{"model": "a", "model": "b", "messages": [], "stream": true}', b"[" * 100_000):
        resp = await http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 400, raw
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        assert resp.json()["error"]["type"] == "invalid_request_error"


async def test_unknown_path_and_method(http):
    assert (await http.post("/v1/nope", json={})).json()["error"]["type"] == "invalid_request_error"
    resp = await http.get("/v1/chat/completions")
    assert resp.status_code == 405 and "error" in resp.json()
    assert (await http.get("/health")).status_code == 200


async def test_error_before_first_byte_is_http_error(http):
    resp = await http.post("/v1/chat/completions", json=chat_body("fail:RESOURCE_EXHAUSTED"))
    assert resp.status_code == 429 and resp.headers["content-type"] == "application/json"
    assert resp.json() == {"error": {"message": SPECIAL_MSG, "type": "rate_limit_error", "param": "temperature",
                                     "code": "scripted_resource_exhausted"}}
    resp = await http.post("/v1/chat/completions", json=chat_body("missing"))
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


async def test_error_mid_stream_is_sse_event_without_done(http):
    resp = await http.post("/v1/chat/completions", json=chat_body("midfail"))
    assert resp.status_code == 200
    events = parse_sse(resp.text)
    assert "[DONE]" not in events
    assert events[-1] == {"error": {"message": "engine failed mid-stream", "type": "server_error", "param": None,
                                    "code": None}}
    assert [e["choices"][0]["delta"].get("content") for e in events[:-1]] == ["", "Hel", "lo"]


async def test_non_stream_request_uses_unary_rpc(http, backend):
    resp = await http.post("/v1/chat/completions", json=chat_body(stream=False))
    assert resp.status_code == 200 and backend[0].calls[-1][0] == "CreateChatCompletion"
    assert resp.json()["choices"][0]["message"]["content"] == "Hello world"
    resp = await http.post("/v1/completions", json={"model": "fail:NOT_FOUND", "prompt": "x"})
    assert resp.status_code == 404 and resp.json()["error"]["message"] == SPECIAL_MSG


# ---- cancellation -----------------------------------------------------------------------------------------

async def test_client_disconnect_cancels_grpc_call(bridge, backend):
    servicer = backend[0]
    servicer.cancelled.clear()
    servicer.slow_started.clear()
    async with httpx.AsyncClient(base_url=f"http://{bridge.host}:{bridge.bridge_port}", timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=chat_body("slow")) as resp:
            assert resp.status_code == 200
            got = b""
            async for part in resp.aiter_bytes():
                got += part
                if got.count(b"\n\n") >= 3:
                    break
    # the client closed the connection: the service's handler must see the cancellation
    await asyncio.wait_for(servicer.cancelled.wait(), timeout=5)


async def test_disconnect_before_first_message_cancels_grpc_call(bridge, backend):
    servicer = backend[0]
    servicer.cancelled.clear()
    servicer.slow_started.clear()
    async with httpx.AsyncClient(base_url=f"http://{bridge.host}:{bridge.bridge_port}") as http:
        request = asyncio.ensure_future(http.post("/v1/chat/completions", json=chat_body("slowstart"), timeout=30))
        await asyncio.wait_for(servicer.slow_started.wait(), timeout=5)
        request.cancel()  # the client gives up before any byte of the response
        with pytest.raises(asyncio.CancelledError):
            await request
    await asyncio.wait_for(servicer.cancelled.wait(), timeout=5)


# ---- the stream core ----------------------------------------------------------------------------------------

class _Call:
    """Stands in for a grpc.aio call in the stream core's hands: iterated, and cancelled."""

    def __init__(self, messages: Any) -> None:
        self.messages = messages
        self.cancelled = False

    def __aiter__(self) -> Any:
        return self.messages.__aiter__()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class _Renderer:
    headers = [(b"content-type", b"text/event-stream")]

    def feed(self, message: Any) -> bytes:
        return f"data: {message}\n\n".encode()

    def finish(self) -> bytes:
        return b"data: [DONE]\n\n"

    def error(self, error: Any) -> bytes:
        raise AssertionError("no error expected")


async def _run_sse(messages: Any, gate: asyncio.Event | None = None) -> list[dict[str, Any]]:
    from genrpc.bridge.stream import SSEResponse, first_message

    sent: list[dict[str, Any]] = []
    disconnect = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if gate is not None and len(sent) == 2:
            gate.set()  # the first frame went out before the next message existed

    call = _Call(messages)
    reader, first = await first_message(call, receive)
    await SSEResponse(reader, first, _Renderer())({"type": "http"}, receive, send)
    return sent


async def test_frames_ready_together_go_out_in_one_send():
    async def ready():  # every message already there (a busy loop, or a burst from the service)
        for i in range(5):
            yield i

    sent = await _run_sse(ready())
    assert sent[0]["type"] == "http.response.start"
    bodies = [m["body"] for m in sent[1:]]
    assert b"".join(bodies) == b"".join(f"data: {i}\n\n".encode() for i in range(5)) + b"data: [DONE]\n\n"
    # merged: the reader stops once two wait (so a real service merges what comes next), the response sends
    # whatever waits in one send
    assert len(bodies) <= 3 and all(body.count(b"data: ") >= 2 for body in bodies), bodies
    assert sent[-1]["more_body"] is False and all(m["more_body"] for m in sent[1:-1])


async def test_the_reader_stops_while_the_response_is_behind():
    """Like grpc.aio's handler waiting for its write: with two messages not yet taken the reader asks for no
    more, so a service merges the tokens of a slow stream into its next message instead of queueing them here."""
    from genrpc.bridge.stream import CallReader

    produced = []

    async def ready():
        for i in range(5):
            produced.append(i)
            yield i

    reader = CallReader(_Call(ready()))
    for _ in range(20):  # let the reading task run as far as it will
        await asyncio.sleep(0)
    assert reader.pending == [0, 1] and produced == [0, 1] and not reader.done
    assert reader.take() == [0, 1]
    for _ in range(20):
        await asyncio.sleep(0)
    assert reader.pending == [2, 3] and produced == [0, 1, 2, 3]
    reader.cancel()


async def test_a_frame_is_sent_as_soon_as_it_is_ready():
    gate = asyncio.Event()

    async def paced():
        yield 0
        await asyncio.wait_for(gate.wait(), 5)  # the next message only after the first frame was sent
        yield 1

    sent = await _run_sse(paced(), gate)
    bodies = [m["body"] for m in sent[1:]]
    assert bodies[0] == b"data: 0\n\n" and sent[1]["more_body"] is True
    assert b"".join(bodies[1:]) == b"data: 1\n\ndata: [DONE]\n\n"


async def test_zero_shutdown_grace_cuts_running_streams_at_once(backend):
    """--shutdown-grace-s 0: running streams are cut at once (it used to mean "wait forever")."""
    from genrpc.bridge.server import make_server
    from genrpc.settings import Settings
    from _procs import HOST, free_port

    servicer = backend[0]
    servicer.cancelled.clear()
    server = make_server(Settings(host=HOST, grpc_port=backend[1], bridge_port=free_port(), log_level="warning",
                                  shutdown_grace_s=0))
    task = asyncio.create_task(server.serve())
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{server.config.port}", timeout=30) as http:
        deadline = asyncio.get_running_loop().time() + 10
        while not server.started:
            assert asyncio.get_running_loop().time() < deadline and not task.done()
            await asyncio.sleep(0.01)
        async with http.stream("POST", "/v1/chat/completions", json=chat_body("slow")) as resp:
            parts = resp.aiter_raw().__aiter__()  # kept open: the client stays connected throughout
            got = b""
            while got.count(b"\n\n") < 2:  # the stream runs (a chunk every 50 ms, endless)
                got += await parts.__anext__()
            server.should_exit = True
            await asyncio.wait_for(task, 5)  # would wait for the endless stream with an unbounded grace
            # the bridge cut the stream and cancelled its gRPC call while the client was still connected
            await asyncio.wait_for(servicer.cancelled.wait(), timeout=5)
