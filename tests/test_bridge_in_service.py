"""The bridge served inside the service process (genrpc.bridge.in_service): the real GenrpcServer and the real
bridge app on uvicorn in this loop, driven over HTTP with httpx and the OpenAI SDK. The calls cross no gRPC
channel, so these check that what grpc.aio does for the bridge is still done: statuses with their details,
cancellation reaching the engine, deadlines, draining, the service's own metrics per call. (The whole stack,
`genrpc up`, serves it this way by default: every stack test drives it with the llama.cpp engine too.)"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from genrpc.bridge.in_service import BridgeInService
from genrpc.service.server import create_server
from genrpc.settings import Settings
from tests.scripted_engine import ScriptedEngine
from _procs import free_port


async def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
async def front():
    engine = ScriptedEngine(reply="Hello world! " * 40, context_length=4096, step_delay_s=0.01)
    settings = Settings(grpc_port=0, metrics_port=-1, bridge_port=free_port(), bridge_metrics_port=free_port(),
                        max_batch_size=2, max_queue=1, log_level="warning")
    server, _ = create_server(settings, engine)
    bridge = BridgeInService(settings, server)
    server.fronts.append(bridge)
    await server.start()
    try:
        yield server, engine, f"http://127.0.0.1:{bridge.port}", f"http://127.0.0.1:{settings.bridge_metrics_port}/metrics"
    finally:
        await server.stop(0)


def _requests_total(server) -> dict[str, float]:
    """genrpc_requests_total by (method, code), from the service's registry."""
    out = {}
    for family in server.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "genrpc_requests_total":
                out[(sample.labels["method"], sample.labels["code"])] = sample.value
    return out


def body(**kw):
    return {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stream": True, **kw}


async def test_stream_with_the_sdk_counted_by_service_and_bridge(front):
    server, engine, url, bridge_metrics = front
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = await client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True, max_tokens=5,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    assert chunks[-1].usage.completion_tokens == 5
    assert _requests_total(server)[("Chat", "OK")] == 1
    async with httpx.AsyncClient() as http:
        exposed = (await http.get(bridge_metrics)).text
    assert 'genrpc_bridge_requests_total{route="/v1/chat/completions",status="200"} 1.0' in exposed


async def test_errors_keep_their_details(front):
    _, _, url, _ = front
    async with httpx.AsyncClient(base_url=url) as http:
        wrong_model = await http.post("/v1/chat/completions", json=body(model="nope"))
        too_hot = await http.post("/v1/chat/completions", json=body(temperature=5))
    assert wrong_model.status_code == 404
    assert wrong_model.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                                             "param": "model", "code": "model_not_found"}
    assert too_hot.status_code == 400 and too_hot.json()["error"]["param"] == "temperature"


async def test_a_client_that_leaves_frees_the_slot_and_counts_as_cancelled(front):
    server, engine, url, _ = front
    async with httpx.AsyncClient(base_url=url) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body(max_tokens=400)) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    break
            assert engine.running == 1
    await _wait_for(lambda: engine.running == 0 and server.servicer.admitted == 0)
    await _wait_for(lambda: _requests_total(server).get(("Chat", "CANCELLED")) == 1)


async def test_over_capacity_is_a_429_with_retry_after(front):
    server, engine, url, _ = front
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        holders = [asyncio.create_task(http.post("/v1/chat/completions", json=body(max_tokens=60)))
                   for _ in range(3)]  # max_batch_size 2 + max_queue 1
        await _wait_for(lambda: server.servicer.admitted == 3)
        refused = await http.post("/v1/chat/completions", json=body(max_tokens=60))
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        finished = await asyncio.gather(*holders)
    assert all(r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") for r in finished)


async def test_deadline_from_envoy_ends_the_stream(front):
    server, engine, url, _ = front
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chat/completions", json=body(max_tokens=400),
                                    headers={"x-envoy-expected-rq-timeout-ms": "150"})
    assert response.status_code == 200
    last = response.text.strip().rsplit("\n\n", 1)[-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] is not None, last
    assert "[DONE]" not in response.text
    await _wait_for(lambda: engine.running == 0)


async def test_draining_service_refuses_new_work_and_finishes_running_streams(front):
    server, engine, url, _ = front
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        running = asyncio.create_task(http.post("/v1/chat/completions", json=body(max_tokens=30)))
        await _wait_for(lambda: engine.running == 1)
        server.state = "draining"  # as GenrpcServer.stop() sets it, before it stops anything
        refused = await http.post("/v1/chat/completions", json=body(max_tokens=5))
        ready = await http.get("/health/ready")
        finished = await running
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert finished.status_code == 200 and finished.text.endswith("data: [DONE]\n\n")
