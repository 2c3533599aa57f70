"""The real Envoy binary with the product config (genrpc.envoy.config.render) in front of a scripted
GenerationService (defined here) and the real bridge, driven by the official OpenAI SDK, httpx and grpcio."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import grpc
import httpx
import openai
import pytest
import yaml
from google.protobuf import any_pb2, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from _procs import HOST, free_port, listening_addresses, run_envoy, start_envoy
from genrpc.bridge.server import make_server
from genrpc.envoy import config as envoy_config
from genrpc.settings import Settings
from genrpc.v1 import chat_pb2, common_pb2, completion_pb2, generation_service_pb2_grpc, model_pb2

MODEL = "scripted-model"
# spaces, quotes, a % sign, a backslash, non-ASCII: grpc-message percent-encodes some of these on the wire
SPECIAL_MSG = 'bad "value": 100% sure \\ naïve café ✓ 日本'
PIECES = ["Hel", "lo", " wor", "ld"]
USAGE = common_pb2.Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9)
NULL = struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)


# ---- the scripted service ---------------------------------------------------------------------------------

def rich_status(code: grpc.StatusCode, message: str, reason: str, field: str | None) -> grpc.Status:
    details: list[Any] = [error_details_pb2.ErrorInfo(reason=reason, domain="genrpc.dev",
                                                       metadata={"param": field} if field else {})]
    if field:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))


class ScriptedService(generation_service_pb2_grpc.GenerationServiceServicer):
    """Behaviour chosen by `model`:
    fail:<CODE>       abort with SPECIAL_MSG + ErrorInfo(reason SCRIPTED_<CODE>) + BadRequest(temperature)
    plainfail:<CODE>  abort with SPECIAL_MSG only (no details: the message travels in grpc-message only)
    midfail           (streams) two chunks, then INTERNAL
    slow              (streams) a chunk every 50 ms until cancelled; records the cancellation
    slowstart         (streams) waits 30 s before the first chunk; records the cancellation
    nousagechunk      (streams) never sends the usage-only chunk (so neither does the bridge)
    anything else     a normal answer ("Hello world")."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, str]]] = []
        self.cancelled = asyncio.Event()
        self.slow_started = asyncio.Event()

    def _record(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        md = {k: v for k, v in context.invocation_metadata() if not k.endswith("-bin")}
        self.calls.append((method, request, md))

    async def _maybe_fail(self, model: str, context: grpc.aio.ServicerContext) -> None:
        if model.startswith("fail:"):
            code = grpc.StatusCode[model.split(":", 1)[1]]
            await context.abort_with_status(rich_status(code, SPECIAL_MSG, f"SCRIPTED_{code.name}", "temperature"))
        if model.startswith("plainfail:"):
            await context.abort(grpc.StatusCode[model.split(":", 1)[1]], SPECIAL_MSG)
        if model == "missing":
            await context.abort_with_status(rich_status(grpc.StatusCode.NOT_FOUND,
                                                        "The model 'missing' does not exist.",
                                                        "MODEL_NOT_FOUND", None))

    # unary
    async def CreateChatCompletion(self, request, context):
        self._record("CreateChatCompletion", request, context)
        await self._maybe_fail(request.model, context)
        msg = chat_pb2.ChatCompletionMessage(role="assistant", content=struct_pb2.Value(string_value="".join(PIECES)),
                                             refusal=NULL)
        return chat_pb2.ChatCompletion(
            id="chatcmpl-scripted", object="chat.completion", created=1700000000, model=request.model,
            choices=[chat_pb2.ChatCompletionChoice(index=0, message=msg, finish_reason="stop", logprobs=NULL)],
            usage=USAGE)

    async def CreateCompletion(self, request, context):
        self._record("CreateCompletion", request, context)
        await self._maybe_fail(request.model, context)
        return completion_pb2.Completion(
            id="cmpl-scripted", object="text_completion", created=1700000000, model=request.model,
            choices=[completion_pb2.CompletionChoice(index=0, text="".join(PIECES), logprobs=NULL,
                                                     finish_reason=struct_pb2.Value(string_value="stop"))],
            usage=USAGE)

    async def ListModels(self, request, context):
        self._record("ListModels", request, context)
        return model_pb2.ListModelsResponse(object="list", data=[self._model()])

    async def GetModel(self, request, context):
        self._record("GetModel", request, context)
        if request.model != MODEL:
            await self._maybe_fail("missing", context)
        return self._model()

    @staticmethod
    def _model() -> model_pb2.Model:
        return model_pb2.Model(id=MODEL, object="model", created=1700000000, owned_by="genrpc",
                               context_length_tokens=2048)

    # streams
    async def Chat(self, request, context):
        self._record("Chat", request, context)
        await self._maybe_fail(request.model, context)
        base = dict(id="chatcmpl-scripted", object="chat.completion.chunk", created=1700000000, model=request.model)

        def chunk(delta: chat_pb2.ChatCompletionDelta, finish: struct_pb2.Value = NULL, **kw):
            return chat_pb2.ChatCompletionChunk(**base, choices=[chat_pb2.ChatCompletionChunkChoice(
                index=0, delta=delta, finish_reason=finish, logprobs=NULL)], **kw)

        if request.model == "slowstart":  # a long wait before the first message (queue, long prompt)
            try:
                self.slow_started.set()
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        yield chunk(chat_pb2.ChatCompletionDelta(role="assistant", content=""))
        if request.model == "slow":
            try:
                self.slow_started.set()
                while True:
                    await asyncio.sleep(0.05)
                    yield chunk(chat_pb2.ChatCompletionDelta(content="."))
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        for i, piece in enumerate(PIECES):
            if request.model == "midfail" and i == 2:
                await context.abort(grpc.StatusCode.INTERNAL, "engine failed mid-stream")
            yield chunk(chat_pb2.ChatCompletionDelta(content=piece))
        yield chunk(chat_pb2.ChatCompletionDelta(), struct_pb2.Value(string_value="stop"), usage=USAGE)
        if request.stream_options.include_usage and request.model != "nousagechunk":
            yield chat_pb2.ChatCompletionChunk(**base, usage=USAGE)

    async def Generate(self, request, context):
        self._record("Generate", request, context)
        await self._maybe_fail(request.model, context)
        base = dict(id="cmpl-scripted", object="text_completion", created=1700000000, model=request.model)
        for piece in PIECES:
            yield completion_pb2.Completion(**base, choices=[completion_pb2.CompletionChoice(
                index=0, text=piece, logprobs=NULL, finish_reason=NULL)])
        yield completion_pb2.Completion(**base, choices=[completion_pb2.CompletionChoice(
            index=0, text="", logprobs=NULL, finish_reason=struct_pb2.Value(string_value="stop"))], usage=USAGE)
        if request.stream_options.include_usage:
            yield completion_pb2.Completion(**base, usage=USAGE)


# ---- fixtures ---------------------------------------------------------------------------------------------

async def start_scripted_grpc() -> tuple[ScriptedService, grpc.aio.Server, int]:
    servicer = ScriptedService()
    server = grpc.aio.server()
    generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    return servicer, server, port


async def start_bridge(grpc_port: int) -> tuple[Settings, Any, asyncio.Task]:
    settings = Settings(host=HOST, grpc_port=grpc_port, bridge_port=free_port(), log_level="warning")
    server = make_server(settings)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    assert server.started, "bridge did not start"
    return settings, server, task


@pytest.fixture(scope="module")
async def backend():
    servicer, server, port = await start_scripted_grpc()
    yield servicer, port
    await server.stop(0)


@pytest.fixture(scope="module")
async def bridge(backend):
    settings, server, task = await start_bridge(backend[1])
    yield settings
    server.should_exit = True
    await task


@pytest.fixture(scope="module")
def envoy(tmp_path_factory, backend, bridge):
    with run_envoy(tmp_path_factory.mktemp("envoy"), grpc_port=backend[1], bridge_port=bridge.bridge_port) as h:
        yield h


@pytest.fixture(scope="module")
def envoy_down(tmp_path_factory):
    """An Envoy whose upstreams are closed ports (and a small body limit)."""
    with run_envoy(tmp_path_factory.mktemp("envoy-down"), grpc_port=free_port(), bridge_port=free_port(),
                   name="envoy-down", max_request_bytes=64 * 1024) as h:
        yield h


@pytest.fixture
async def client(envoy):
    async with openai.AsyncOpenAI(base_url=f"{envoy.base_url}/v1", api_key="x", max_retries=0, timeout=30,
                                  _strict_response_validation=True) as c:
        yield c


@pytest.fixture
async def http(envoy):
    async with httpx.AsyncClient(base_url=envoy.base_url, timeout=30) as c:
        yield c


def chat_body(model: str = MODEL, **kw) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def assert_openai_error(resp: httpx.Response, status: int, *, type_: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    assert not [h for h in resp.headers if h.startswith("grpc-")], resp.headers
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if type_:
        assert body["error"]["type"] == type_, body
    return body["error"]


# ---- config unit checks -----------------------------------------------------------------------------------

def test_render_is_parametric_and_admin_is_loopback():
    text = envoy_config.render(listen_host="0.0.0.0", listen_port=8080, admin_port=9901,
                               grpc_host="genrpc-service.ns.svc", grpc_port=50051, bridge_host="genrpc-bridge",
                               bridge_port=8001, descriptor_path="/etc/genrpc/genrpc.pb")
    cfg = yaml.safe_load(text)
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    listener = cfg["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert clusters[envoy_config.GRPC_CLUSTER]["type"] == "STRICT_DNS"  # DNS names resolve
    assert "genrpc-service.ns.svc" in text and "/etc/genrpc/genrpc.pb" in text
    cmd = envoy_config.envoy_command("/x.yaml", base_id=7)
    assert cmd[cmd.index("--base-id") + 1] == "7" and cmd[cmd.index("-l") + 1] == "warn"


# ---- unary REST (transcoded) ------------------------------------------------------------------------------

async def test_chat_unary(client, backend):
    reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello world" and reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens == 9 and reply.object == "chat.completion"
    assert backend[0].calls[-1][0] == "CreateChatCompletion"


async def test_completion_unary(client):
    reply = await client.completions.create(model=MODEL, prompt="hi")
    assert reply.choices[0].text == "Hello world" and reply.usage.prompt_tokens == 5


async def test_models(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    model = await client.models.retrieve(MODEL)
    assert model.owned_by == "genrpc"
    with pytest.raises(openai.NotFoundError) as exc:
        await client.models.retrieve("missing")
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["type"] == "invalid_request_error"


async def test_request_id_forwarded(http, backend):
    resp = await http.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": "req-unary-1"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "req-unary-1"
    assert not [h for h in resp.headers if h.startswith("grpc-")], resp.headers
    assert backend[0].calls[-1][2]["x-request-id"] == "req-unary-1"
    resp = await http.post("/v1/chat/completions", json=chat_body(stream=True), headers={"x-request-id": "req-s-1"})
    assert resp.status_code == 200 and backend[0].calls[-1][0] == "Chat"
    assert backend[0].calls[-1][2]["x-request-id"] == "req-s-1"


# ---- streams (routed to the bridge) -----------------------------------------------------------------------

async def test_stream_through_sdk(client, backend):
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert backend[0].calls[-1][0] == "Chat"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 9


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
async def test_stream_raw_frames_done_last(http, backend, content_type):
    body = json.dumps(chat_body(stream=True)).encode()
    async with http.stream("POST", "/v1/chat/completions", content=body,
                           headers={"content-type": content_type}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = (await resp.aread()).decode()
    frames = [f for f in raw.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]" and all(f.startswith("data: ") for f in frames)
    assert backend[0].calls[-1][0] == "Chat"
    assert json.loads(frames[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


async def test_completion_stream(envoy, backend):
    # Non-strict: the SDK types legacy Completion.choices[].finish_reason as non-nullable, but streamed
    # completion chunks carry finish_reason null until the last one (as OpenAI's own API does).
    async with openai.AsyncOpenAI(base_url=f"{envoy.base_url}/v1", api_key="x", max_retries=0) as client:
        stream = await client.completions.create(model=MODEL, prompt="hi", stream=True)
        chunks = [c async for c in stream]
    assert backend[0].calls[-1][0] == "Generate"
    assert "".join(c.choices[0].text for c in chunks) == "Hello world"


async def test_stream_error_before_first_byte(client):
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(model="fail:INVALID_ARGUMENT", messages=[{"role": "user",
                                                                                     "content": "hi"}], stream=True)
    assert exc.value.body == {"message": SPECIAL_MSG, "type": "invalid_request_error", "param": "temperature",
                              "code": "scripted_invalid_argument"}


async def test_stream_error_mid_stream(client):
    stream = await client.chat.completions.create(model="midfail", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    got = []
    with pytest.raises(openai.APIError) as exc:
        async for c in stream:
            got.append(c)
    assert len(got) == 3 and "mid-stream" in exc.value.message


# ---- errors ---------------------------------------------------------------------------------------------

ERROR_CASES = [
    ("INVALID_ARGUMENT", 400, "invalid_request_error", openai.BadRequestError),
    ("NOT_FOUND", 404, "invalid_request_error", openai.NotFoundError),
    ("PERMISSION_DENIED", 403, "permission_error", openai.PermissionDeniedError),
    ("RESOURCE_EXHAUSTED", 429, "rate_limit_error", openai.RateLimitError),
    ("UNAUTHENTICATED", 401, "invalid_request_error", openai.AuthenticationError),
    ("UNAVAILABLE", 503, "server_error", openai.InternalServerError),
    ("INTERNAL", 500, "server_error", openai.InternalServerError),
    ("DEADLINE_EXCEEDED", 504, "server_error", openai.InternalServerError),
    ("CANCELLED", 499, "invalid_request_error", openai.APIStatusError),
    ("FAILED_PRECONDITION", 400, "invalid_request_error", openai.BadRequestError),
]


@pytest.mark.parametrize("code,status,type_,exc_type", ERROR_CASES)
async def test_grpc_errors_become_openai_errors(http, client, code, status, type_, exc_type):
    err = assert_openai_error(await http.post("/v1/chat/completions", json=chat_body(f"fail:{code}")), status,
                              type_=type_)
    assert err == {"message": SPECIAL_MSG, "type": type_, "param": "temperature", "code": f"scripted_{code.lower()}"}
    # without details: the message only travels percent-encoded in grpc-message, and still arrives intact
    err = assert_openai_error(await http.post("/v1/completions", json={"model": f"plainfail:{code}", "prompt": "x"}),
                              status, type_=type_)
    assert err["message"] == SPECIAL_MSG and err["param"] is None
    with pytest.raises(exc_type) as exc:
        await client.chat.completions.create(model=f"fail:{code}", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == status and exc.value.body["message"] == SPECIAL_MSG


async def test_malformed_json_is_400(http):
    for path in ("/v1/chat/completions", "/v1/completions"):
        resp = await http.post(path, content=b'{"model": ', headers={"content-type": "application/json"})
        assert_openai_error(resp, 400, type_="invalid_request_error")
    resp = await http.post("/v1/chat/completions", content=b'{"model": 5}', headers={"content-type": "application/json"})
    assert_openai_error(resp, 400, type_="invalid_request_error")


async def test_unknown_path_is_404(http):
    assert_openai_error(await http.post("/v1/nope", json={}), 404, type_="invalid_request_error")
    assert_openai_error(await http.get("/v2/models"), 404, type_="invalid_request_error")


async def test_upstream_down_is_503(envoy_down):
    async with httpx.AsyncClient(base_url=envoy_down.base_url, timeout=30) as http:
        assert_openai_error(await http.post("/v1/chat/completions", json=chat_body()), 503, type_="server_error")
        assert_openai_error(await http.get("/v1/models"), 503, type_="server_error")
        assert_openai_error(await http.post("/v1/chat/completions", json=chat_body(stream=True)), 503,
                            type_="server_error")
        big = chat_body(messages=[{"role": "user", "content": "x" * 200_000}])
        assert_openai_error(await http.post("/v1/chat/completions", json=big), 413, type_="invalid_request_error")
    async with grpc.aio.insecure_channel(f"{HOST}:{envoy_down.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await generation_service_pb2_grpc.GenerationServiceStub(ch).ListModels(model_pb2.ListModelsRequest())
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_admin_bound_to_loopback_only(envoy):
    assert listening_addresses(envoy.admin_port) == {"127.0.0.1"}


# ---- native gRPC through Envoy ----------------------------------------------------------------------------

async def test_native_grpc_through_envoy(envoy, backend):
    async with grpc.aio.insecure_channel(f"{HOST}:{envoy.port}") as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        model = await stub.GetModel(model_pb2.GetModelRequest(model=MODEL), metadata=[("x-request-id", "g-1")])
        assert model.id == MODEL and backend[0].calls[-1][2]["x-request-id"] == "g-1"
        chunks = [c async for c in stub.Chat(chat_pb2.ChatCompletionRequest(model=MODEL))]
        assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "Hello world"
        assert chunks[-1].usage.total_tokens == 9  # gRPC clients get usage on the final chunk

        call = stub.CreateChatCompletion(chat_pb2.ChatCompletionRequest(model="fail:INVALID_ARGUMENT"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.value.details() == SPECIAL_MSG
        status = rpc_status.from_call(exc.value)
        assert status is not None and len(status.details) == 2
        info = error_details_pb2.ErrorInfo()
        status.details[0].Unpack(info)
        assert info.reason == "SCRIPTED_INVALID_ARGUMENT"

        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.CreateCompletion(completion_pb2.CompletionRequest(model="plainfail:RESOURCE_EXHAUSTED"))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and exc.value.details() == SPECIAL_MSG

        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in stub.Chat(chat_pb2.ChatCompletionRequest(model="midfail")):
                pass
        assert exc.value.code() == grpc.StatusCode.INTERNAL


async def test_envoys_side_by_side(tmp_path, backend, bridge):
    """A second Envoy (distinct base id, own ports) runs next to the module's one."""
    handle = start_envoy(tmp_path, grpc_port=backend[1], bridge_port=bridge.bridge_port, name="envoy-2")
    try:
        async with httpx.AsyncClient(base_url=handle.base_url) as http:
            assert (await http.get("/v1/models")).json()["data"][0]["id"] == MODEL
    finally:
        handle.proc.stop()


async def test_stream_is_incremental_and_disconnect_cancels(envoy, backend):
    """An endless stream delivers frames as they come (nothing buffers it), and a client disconnect travels
    Envoy -> bridge -> gRPC cancellation seen by the service."""
    servicer = backend[0]
    servicer.cancelled.clear()
    async with httpx.AsyncClient(base_url=envoy.base_url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=chat_body("slow", stream=True)) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"] == "text/event-stream"
            got = b""
            async for part in resp.aiter_bytes():
                got += part
                if got.count(b"\n\n") >= 3:
                    break
    await asyncio.wait_for(servicer.cancelled.wait(), timeout=5)


# ---- the same config in front of the real servicer (scripted engine) -------------------------------------

@pytest.fixture(scope="module")
async def real_stack(tmp_path_factory):
    """The lead's real GenerationServicer (service.server.create_server) with the scripted engine, the real
    bridge and Envoy: checks that the service's real errors come out OpenAI-shaped."""
    try:
        from scripted_engine import ScriptedEngine
        from genrpc.service.server import create_server
    except ImportError as e:  # the service is written concurrently; skip until it lands
        pytest.skip(f"service not available yet: {e}")
    settings = Settings(host=HOST, grpc_port=0, metrics_port=-1, shutdown_grace_s=1, log_level="warning")
    server, port = create_server(settings, ScriptedEngine())
    await server.start()
    bsettings, bserver, btask = await start_bridge(port)
    try:
        with run_envoy(tmp_path_factory.mktemp("envoy-real"), grpc_port=port, bridge_port=bsettings.bridge_port,
                       name="envoy-real") as handle:
            yield handle
    finally:
        bserver.should_exit = True
        await btask
        await server.stop(0)


async def test_real_service_through_envoy(real_stack):
    async with openai.AsyncOpenAI(base_url=f"{real_stack.base_url}/v1", api_key="x", max_retries=0, timeout=30,
                                  _strict_response_validation=True) as client:
        model = (await client.models.list()).data[0].id
        msgs = [{"role": "user", "content": "hi"}]
        reply = await client.chat.completions.create(model=model, messages=msgs, max_tokens=50)
        assert reply.choices[0].message.content
        stream = await client.chat.completions.create(model=model, messages=msgs, max_tokens=50, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            reply.choices[0].message.content
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
        with pytest.raises(openai.NotFoundError) as exc:
            await client.chat.completions.create(model="nope", messages=msgs)
        assert exc.value.body["code"] == "model_not_found"
        with pytest.raises(openai.NotFoundError) as exc:
            await client.chat.completions.create(model="nope", messages=msgs, stream=True)
        assert exc.value.body["code"] == "model_not_found"
        for stream_flag in (False, True):
            with pytest.raises(openai.BadRequestError) as exc:
                await client.chat.completions.create(model=model, messages=msgs, temperature=5, stream=stream_flag)
            assert exc.value.body["param"] == "temperature" and exc.value.body["type"] == "invalid_request_error"


async def test_api_key_auth(tmp_path, backend, bridge):
    with run_envoy(tmp_path, grpc_port=backend[1], bridge_port=bridge.bridge_port, name="envoy-auth",
                   api_keys={"sk-test-1": "team-a"}) as handle:
        async with openai.AsyncOpenAI(base_url=f"{handle.base_url}/v1", api_key="wrong", max_retries=0,
                                      _strict_response_validation=True) as bad:
            with pytest.raises(openai.AuthenticationError) as exc:
                await bad.models.list()
            assert exc.value.body["type"] == "invalid_request_error" and exc.value.body["code"] == "invalid_api_key"
        async with openai.AsyncOpenAI(base_url=f"{handle.base_url}/v1", api_key="sk-test-1", max_retries=0,
                                      default_headers={"x-client-id": "spoofed"},
                                      _strict_response_validation=True) as good:
            await good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            md = backend[0].calls[-1][2]
            assert md["x-client-id"] == "team-a" and "authorization" not in md
            stream = await good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                        stream=True)
            assert [c async for c in stream]
            assert backend[0].calls[-1][0] == "Chat" and backend[0].calls[-1][2]["x-client-id"] == "team-a"


# ---- API keys from a keys file, through `genrpc envoy-config` (what the Kubernetes init container runs) -------

KEYS_FILE = """# genrpc API keys: KEY CLIENT_ID
sk-file-1   team-a
sk-file-2   team-b   # a second key, another client
# sk-commented team-x
"""


def test_api_keys_file_parsing(tmp_path):
    assert envoy_config.parse_api_keys(KEYS_FILE) == {"sk-file-1": "team-a", "sk-file-2": "team-b"}
    for bad, why in [("", "no API keys"), ("# only comments\n\n", "no API keys"), ("sk-1\n", "KEY CLIENT_ID"),
                     ("sk-1 a b\n", "rps=N"), ("sk-1 a rps=0\n", "rps=N"), ("sk-1 a rps=1 rps=2\n", "rps=N"),
                     ("sk-1 a rps=1\nsk-2 a rps=2\n", "different limits"), ("sk-1 a\nsk-1 b\n", "duplicate key"),
                     ("sk-1 bad,client\n", "client id")]:
        with pytest.raises(ValueError, match=why) as info:
            envoy_config.parse_api_keys(bad, "keys")
        assert "sk-1 " not in str(info.value)  # errors name the line, never echo the key
    path = tmp_path / "keys"
    path.write_text(KEYS_FILE)
    assert envoy_config.read_api_keys(path) == {"sk-file-1": "team-a", "sk-file-2": "team-b"}
    limited = envoy_config.parse_keys_file("k1 a rps=3 tpm=1000  # both\nk2 a\nk3 b tpm=5\nk4 c\n")
    assert limited.keys == {"k1": "a", "k2": "a", "k3": "b", "k4": "c"}
    assert limited.limits == {"a": envoy_config.ClientLimits(rps=3, tpm=1000), "b": envoy_config.ClientLimits(tpm=5)}


def test_genrpc_up_renders_with_the_keys_file(tmp_path):
    """`genrpc up` renders through cli.envoy_yaml: no auth by default, the file's keys with --api-keys-file."""
    from genrpc import cli

    def auth(settings: Settings) -> list[dict[str, Any]]:
        hcm = yaml.safe_load(cli.envoy_yaml(settings))["static_resources"]["listeners"][0]["filter_chains"][0][
            "filters"][0]["typed_config"]
        return [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.api_key_auth"]

    assert auth(Settings()) == []
    path = tmp_path / "keys"
    path.write_text(KEYS_FILE)
    [flt] = auth(Settings(api_keys_file=str(path)))
    assert flt["typed_config"]["credentials"] == [{"key": "sk-file-1", "client": "team-a"},
                                                  {"key": "sk-file-2", "client": "team-b"}]
    path.write_text("# no keys yet\n")
    with pytest.raises(ValueError, match="no API keys"):
        cli.envoy_yaml(Settings(api_keys_file=str(path)))


async def test_api_keys_file_enforced_by_envoy(tmp_path, backend, bridge):
    """keys file -> `genrpc envoy-config` (the CLI, in a subprocess) -> the real Envoy: a missing or wrong Bearer
    key is a 401 in OpenAI's error shape; a listed key passes and its client id is forwarded (spoofing ignored)."""
    import subprocess
    import sys
    from pathlib import Path

    from _procs import http_ok, next_base_id, spawn, wait_until

    keys = tmp_path / "keys"
    keys.write_text(KEYS_FILE)
    port, admin_port = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    out = subprocess.run(
        [str(Path(sys.executable).parent / "genrpc"), "envoy-config", f"--api-keys-file={keys}",
         f"--listen-host={HOST}", f"--envoy-port={port}", f"--envoy-admin-port={admin_port}", f"--grpc-host={HOST}",
         f"--grpc-port={backend[1]}", f"--bridge-host={HOST}", f"--bridge-port={bridge.bridge_port}",
         f"--descriptor={envoy_config.descriptor_path()}", f"--output={config}"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    proc = spawn("envoy-keys-file", envoy_config.envoy_command(config, base_id=next_base_id()),
                 log_path=tmp_path / "envoy.log")
    try:
        await asyncio.to_thread(wait_until, http_ok(f"http://{HOST}:{admin_port}/ready"), proc, 30, "ready")
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=30) as http:
            for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Bearer sk-commented"},
                            {"authorization": "Bearer team-a"}, {"authorization": "Bearer sk-file-1x"},
                            {"x-api-key": "sk-file-1"}):
                for path, body in (("/v1/chat/completions", chat_body()),
                                   ("/v1/chat/completions", chat_body(stream=True))):
                    resp = await http.post(path, json=body, headers=headers)
                    error = assert_openai_error(resp, 401, type_="invalid_request_error")
                    assert error["code"] == "invalid_api_key", error
                resp = await http.get("/v1/models", headers=headers)
                assert_openai_error(resp, 401)
            calls_before = len(backend[0].calls)
            for key, client in (("sk-file-1", "team-a"), ("sk-file-2", "team-b")):
                resp = await http.post("/v1/chat/completions", json=chat_body(),
                                       headers={"authorization": f"Bearer {key}", "x-client-id": "spoofed"})
                assert resp.status_code == 200, resp.text
                method, _, md = backend[0].calls[-1]
                assert method == "CreateChatCompletion" and md["x-client-id"] == client and "authorization" not in md
            assert len(backend[0].calls) == calls_before + 2  # the rejected requests never reached the service
            # api_key_auth alone would accept the bare key; genrpc requires the Bearer scheme (OpenAI's)
            for bare in ("sk-file-1", "Basic sk-file-1", "Bearersk-file-1", "bearer sk-file-1"):
                for body in (chat_body(), chat_body(stream=True)):
                    resp = await http.post("/v1/chat/completions", json=body, headers={"authorization": bare})
                    error = assert_openai_error(resp, 401, type_="invalid_request_error")
                    assert error["code"] == "invalid_api_key" and "Bearer" in error["message"], error
            assert len(backend[0].calls) == calls_before + 2
        async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListModels(model_pb2.ListModelsRequest(), metadata=[("authorization", "sk-file-1")])
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await stub.ListModels(model_pb2.ListModelsRequest(), metadata=[("authorization", "Bearer sk-file-1")])
        async with openai.AsyncOpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="sk-file-2", max_retries=0,
                                      _strict_response_validation=True) as good:
            stream = await good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                        stream=True)
            assert [c async for c in stream]
            assert backend[0].calls[-1][0] == "Chat" and backend[0].calls[-1][2]["x-client-id"] == "team-b"
    finally:
        proc.stop()


# ---- CORS and rate limiting (both off by default) ---------------------------------------------------------

APP_ORIGIN = "https://app.example.com"
SDK_HEADERS = "authorization, content-type, openai-organization, openai-project, x-stainless-arch, x-stainless-lang, " \
              "x-stainless-os, x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, " \
              "x-stainless-runtime-version, x-stainless-timeout"


def _hcm(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_cors_and_rate_limit_are_off_by_default_and_follow_the_settings(monkeypatch):
    """`genrpc up`/`genrpc envoy-config` render through cli.envoy_yaml: neither filter by default; both from the
    settings (flags or GENRPC_* env vars); a malformed origin is refused."""
    from genrpc import cli

    def filters(hcm: dict[str, Any]) -> list[str]:
        return [f["name"] for f in hcm["http_filters"]]

    hcm = _hcm(cli.envoy_yaml(Settings()))
    assert "envoy.filters.http.cors" not in filters(hcm) and "envoy.filters.http.local_ratelimit" not in filters(hcm)
    assert "typed_per_filter_config" not in hcm["route_config"]["virtual_hosts"][0]
    assert "local_rate_limited" not in str(hcm) and "Rate limit reached" not in str(hcm)

    monkeypatch.setenv("GENRPC_CORS_ALLOWED_ORIGINS", f"{APP_ORIGIN}, http://localhost:3000")
    monkeypatch.setenv("GENRPC_RATE_LIMIT_RPS", "7")
    hcm = _hcm(cli.envoy_yaml(Settings()))
    assert filters(hcm)[0] == "envoy.filters.http.cors"  # before auth and rate limit: preflights carry no key
    policy = hcm["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert policy["allow_origin_string_match"] == [{"exact": APP_ORIGIN}, {"exact": "http://localhost:3000"}]
    [rl] = [f["typed_config"] for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.local_ratelimit"]
    assert rl["token_bucket"] == {"max_tokens": 7, "tokens_per_fill": 7, "fill_interval": "1s"}
    with pytest.raises(ValueError, match="CORS origin"):
        cli.envoy_yaml(Settings(cors_allowed_origins="https://app.example.com/path"))
    with pytest.raises(ValueError, match="rate_limit_rps"):
        cli.envoy_yaml(Settings(rate_limit_rps=-1))


async def test_cors_preflight_answered_by_envoy(tmp_path, backend, bridge):
    """With API keys on: a preflight (no Authorization, as browsers send it) from an allowed origin is answered
    by Envoy with the allow headers; a disallowed origin gets none; actual responses carry allow-origin + expose."""
    with run_envoy(tmp_path, grpc_port=backend[1], bridge_port=bridge.bridge_port, name="envoy-cors",
                   api_keys={"sk-cors": "web"}, cors_allowed_origins=[APP_ORIGIN]) as handle:
        calls_before = len(backend[0].calls)
        async with httpx.AsyncClient(base_url=handle.base_url, timeout=30) as http:
            preflight = {"access-control-request-method": "POST", "access-control-request-headers": SDK_HEADERS}
            for path in ("/v1/chat/completions", "/v1/models"):
                resp = await http.options(path, headers={"origin": APP_ORIGIN, **preflight})
                assert resp.status_code == 200, resp.text
                assert resp.headers["access-control-allow-origin"] == APP_ORIGIN
                assert {"GET", "POST", "OPTIONS"} <= {m.strip() for m in
                                                      resp.headers["access-control-allow-methods"].split(",")}
                allowed = {h.strip() for h in resp.headers["access-control-allow-headers"].split(",")}
                assert {h.strip() for h in SDK_HEADERS.split(",")} <= allowed
                assert resp.headers["access-control-max-age"] == "600"

                # answered by Envoy too (forward_not_matching_preflights: false), but without allow-origin, which
                # is what a browser checks: the page's request is blocked (Envoy still lists methods/headers)
                resp = await http.options(path, headers={"origin": "https://evil.example.com", **preflight})
                assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers, resp.headers
                assert "access-control-allow-credentials" not in resp.headers
            assert len(backend[0].calls) == calls_before  # preflights never reach the service

            auth = {"authorization": "Bearer sk-cors"}
            resp = await http.post("/v1/chat/completions", json=chat_body(), headers={"origin": APP_ORIGIN, **auth})
            assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == APP_ORIGIN
            assert "x-request-id" in resp.headers["access-control-expose-headers"]
            resp = await http.post("/v1/chat/completions", json=chat_body(), headers={"origin": APP_ORIGIN})
            assert_openai_error(resp, 401)  # errors are readable by the page too
            assert resp.headers["access-control-allow-origin"] == APP_ORIGIN
            resp = await http.post("/v1/chat/completions", json=chat_body(),
                                   headers={"origin": "https://evil.example.com", **auth})
            assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers


async def test_rate_limit(tmp_path, backend, bridge):
    """rate_limit_rps=2 (bucket of 2, refilled with 2 every second): a burst of 8 gets at most 4 through (one
    refill can fall inside the burst), the rest are 429 in OpenAI's error shape (the SDK raises RateLimitError),
    DashScope's shape on its route, and RESOURCE_EXHAUSTED for native gRPC."""
    with run_envoy(tmp_path, grpc_port=backend[1], bridge_port=bridge.bridge_port, name="envoy-rl",
                   rate_limit_rps=2, cors_allowed_origins=[APP_ORIGIN]) as handle:
        async with httpx.AsyncClient(base_url=handle.base_url, timeout=30) as http:
            resps = await asyncio.gather(*[http.post("/v1/chat/completions", json=chat_body(),
                                                     headers={"origin": APP_ORIGIN}) for _ in range(8)])
            codes = sorted(r.status_code for r in resps)
            assert codes.count(429) >= 4 and set(codes) <= {200, 429}, codes
            for resp in resps:
                if resp.status_code == 429:
                    error = assert_openai_error(resp, 429, type_="rate_limit_error")
                    assert error["code"] == "rate_limit_exceeded" and error["param"] is None
                    assert "2 requests per second" in error["message"]
                    assert resp.headers["retry-after"] == "1"
                    assert resp.headers["access-control-allow-origin"] == APP_ORIGIN
                    assert not any(h.startswith("grpc-") for h in resp.headers)

            resps = await asyncio.gather(*[
                http.post("/api/v1/services/aigc/text-generation/generation",
                          json={"model": MODEL, "input": {"prompt": "hi"}}) for _ in range(8)])
            limited = [r for r in resps if r.status_code == 429]
            assert len(limited) >= 4, [r.status_code for r in resps]
            assert limited[0].json()["code"] == "Throttling"

        async with openai.AsyncOpenAI(base_url=f"{handle.base_url}/v1", api_key="x", max_retries=0, timeout=30,
                                      _strict_response_validation=True) as client:
            results = await asyncio.gather(*[client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=stream)
                for stream in (False, True) * 4], return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) >= 4 and all(isinstance(e, openai.RateLimitError) for e in errors), results
            assert errors[0].status_code == 429 and errors[0].body["type"] == "rate_limit_error"
            assert errors[0].body["code"] == "rate_limit_exceeded"

        async with grpc.aio.insecure_channel(f"{HOST}:{handle.port}") as ch:
            stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
            results = await asyncio.gather(*[stub.ListModels(model_pb2.ListModelsRequest()) for _ in range(8)],
                                           return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) >= 4, results
            assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                       for e in errors), errors

        # the bucket refills (2 tokens per second): poll with a deadline rather than sleep
        async with httpx.AsyncClient(base_url=handle.base_url, timeout=30) as http:
            deadline = asyncio.get_running_loop().time() + 3
            while (await http.get("/v1/models")).status_code == 429:
                assert asyncio.get_running_loop().time() < deadline, "bucket never refilled"
                await asyncio.sleep(0.1)


def test_gateway_admission_limit_follows_the_settings_and_the_generating_rpcs():
    """Every generating route (exactly the servicer's @within_capacity methods, SSE streams and DashScope) goes
    through one admission cluster whose max_requests is envoy_max_requests (by default the local service's
    capacity; off, Envoy's ceiling, when Envoy fronts other replicas whose capacity it cannot know), to the internal
    listener that sends it on; nothing else passes there, and the real clusters never refuse."""
    from genrpc import cli
    from genrpc.service.servicer import GenerationServicer

    holds = {name for name in dir(GenerationServicer) if getattr(getattr(GenerationServicer, name), "holds_capacity", False)}
    assert holds == set(envoy_config.GENERATING_METHODS)

    def limits(settings: Settings) -> dict[str, set[int]]:
        clusters = yaml.safe_load(cli.envoy_yaml(settings))["static_resources"]["clusters"]
        return {c["name"]: {t["max_requests"] for t in c["circuit_breakers"]["thresholds"]}
                for c in clusters if "circuit_breakers" in c}

    def admission_limit(settings: Settings) -> int:
        found = limits(settings)
        [limit] = found.pop(envoy_config.ADMISSION_CLUSTER)
        assert all(values == {envoy_config.REQUEST_CEILING} for values in found.values()), found
        return limit

    assert admission_limit(Settings()) == 16 + 256
    assert admission_limit(Settings(max_batch_size=4, max_queue=10, service_workers=2)) == 2 * 14
    assert admission_limit(Settings(envoy_max_requests=7)) == 7
    assert admission_limit(Settings(envoy_max_requests=0)) == envoy_config.REQUEST_CEILING
    assert admission_limit(Settings(grpc_upstreams="genrpc-service:50051")) == envoy_config.REQUEST_CEILING
    # a retry that overflows max_retries is flagged UO too, and would get the admission 429 with nothing full
    # (a draining replica's refusals are retried several at once)
    for settings in (Settings(), Settings(envoy_max_requests=7), Settings(grpc_upstreams="genrpc-service:50051")):
        clusters = yaml.safe_load(cli.envoy_yaml(settings))["static_resources"]["clusters"]
        thresholds = [t for c in clusters for t in c.get("circuit_breakers", {}).get("thresholds", [])]
        assert thresholds and all(t["max_retries"] >= t["max_requests"] for t in thresholds), thresholds
    config = yaml.safe_load(cli.envoy_yaml(Settings()))
    public = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = public["route_config"]["virtual_hosts"][0]["routes"]
    admitted = {r["name"] for r in routes if r.get("route", {}).get("cluster") == envoy_config.ADMISSION_CLUSTER}
    assert admitted == {"generate", "stream", "dashscope"}
    [generate] = [r for r in routes if r["name"] == "generate"]
    generating = [h for h in generate["match"]["headers"] if h["name"] == ":path"][0]["string_match"]["safe_regex"]
    assert all(re.fullmatch(generating["regex"], f"/{envoy_config.SERVICE_NAME}/{m}") for m in holds)
    # the internal listener sends them on as the public listener does the rest, with the same error shapes
    [internal] = [listener for listener in config["static_resources"]["listeners"]
                  if listener["name"] == envoy_config.ADMISSION_LISTENER]
    assert "internal_listener" in internal and "address" not in internal
    inner = internal["filter_chains"][0]["filters"][0]["typed_config"]
    assert {r["route"]["cluster"] for r in inner["route_config"]["virtual_hosts"][0]["routes"]} == {
        envoy_config.GRPC_CLUSTER, envoy_config.AFFINITY_CLUSTER, envoy_config.BRIDGE_CLUSTER}
    assert inner["local_reply_config"] == public["local_reply_config"]
    [admission] = [c for c in config["static_resources"]["clusters"] if c["name"] == envoy_config.ADMISSION_CLUSTER]
    [endpoint] = admission["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"envoy_internal_address": {"server_listener_name": envoy_config.ADMISSION_LISTENER}}
