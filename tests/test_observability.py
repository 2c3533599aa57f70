"""The service's metrics, access log and tracing switch, on a scripted engine (real gRPC server and client).

End to end (real model, Envoy, bridge, OTLP receiver, dashboard queries): tests/test_observability_stack.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys

import grpc
import pytest
from google.protobuf import json_format

from genrpc.service.server import create_server
from genrpc.settings import Settings
from genrpc.telemetry import configure_tracing
from genrpc.v1 import chat_pb2, generation_service_pb2_grpc
from tests.scripted_engine import ScriptedEngine

MODEL = {"model_name": "scripted"}


def chat(**fields) -> chat_pb2.ChatCompletionRequest:
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json_format.ParseDict(body, chat_pb2.ChatCompletionRequest())


@pytest.fixture
async def served():
    engine = ScriptedEngine(reply="Hello world!", context_length=4096, step_delay_s=0.002, queue_time_s=0.25)
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1), engine)
    server.metrics._max_clients = 2  # noqa: SLF001 - a small cap to see "other"
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, generation_service_pb2_grpc.GenerationServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


def sample(server, name: str, **labels) -> float:
    return server.metrics.registry.get_sample_value(name, {**MODEL, **labels}) or 0.0


async def test_one_stream_feeds_every_metric_with_model_name_and_client(served):
    server, stub = served
    chunks = [c async for c in stub.Chat(chat(), metadata=(("x-client-id", "team-a"), ("x-request-id", "r1")))]
    usage = chunks[-1].usage
    assert usage.completion_tokens == len("Hello world!")
    assert sample(server, "genrpc_requests_total", method="Chat", code="OK") == 1
    assert sample(server, "genrpc_prompt_tokens_total") == usage.prompt_tokens
    assert sample(server, "genrpc_generation_tokens_total") == usage.completion_tokens
    assert sample(server, "genrpc_client_requests_total", client_id="team-a", code="OK") == 1
    assert sample(server, "genrpc_client_tokens_total", client_id="team-a", kind="prompt") == usage.prompt_tokens
    assert sample(server, "genrpc_client_tokens_total", client_id="team-a", kind="generation") == usage.completion_tokens
    assert sample(server, "genrpc_time_to_first_token_seconds_count") == 1
    assert sample(server, "genrpc_request_queue_time_seconds_count") == 1
    assert sample(server, "genrpc_request_queue_time_seconds_sum") == pytest.approx(0.25)
    # one observation per token after the first (one token per delta here)
    assert sample(server, "genrpc_inter_token_latency_seconds_count") == usage.completion_tokens - 1
    assert sample(server, "genrpc_time_per_output_token_seconds_count") == 1
    assert sample(server, "genrpc_e2e_request_latency_seconds_count", method="Chat") == 1
    # OTel GenAI bucket boundaries
    assert server.metrics.registry.get_sample_value(
        "genrpc_time_to_first_token_seconds_bucket", {**MODEL, "le": "0.001"}) is not None
    assert server.metrics.registry.get_sample_value(
        "genrpc_e2e_request_latency_seconds_bucket", {**MODEL, "method": "Chat", "le": "81.92"}) is not None
    assert sample(server, "genrpc_running_requests") == 0


async def test_client_label_is_bounded(served):
    server, stub = served
    for client in (None, "bad id with spaces", "c1", "c2", "c3"):
        metadata = () if client is None else (("x-client-id", client),)
        await stub.CreateChatCompletion(chat(max_tokens=2), metadata=metadata)
    assert sample(server, "genrpc_client_requests_total", client_id="anonymous", code="OK") == 2
    assert sample(server, "genrpc_client_requests_total", client_id="c1", code="OK") == 1
    assert sample(server, "genrpc_client_requests_total", client_id="c2", code="OK") == 1
    assert sample(server, "genrpc_client_requests_total", client_id="other", code="OK") == 1
    assert sample(server, "genrpc_client_requests_total", client_id="c3", code="OK") == 0


async def test_one_json_access_line_per_request_and_cancel_counts_as_cancelled(served, caplog):
    server, stub = served
    caplog.set_level(logging.INFO, logger="genrpc.access")
    await stub.CreateChatCompletion(chat(max_tokens=5), metadata=(("x-client-id", "team-a"), ("x-request-id", "abc")))
    call = stub.Chat(chat(), metadata=(("x-request-id", "gone"),))
    await call.read()
    await call.read()
    call.cancel()
    deadline = asyncio.get_running_loop().time() + 5
    while sample(server, "genrpc_requests_total", method="Chat", code="CANCELLED") < 1:
        assert asyncio.get_running_loop().time() < deadline, "the cancelled stream was never counted"
        await asyncio.sleep(0.01)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "genrpc.access"]
    assert len(lines) == 2
    unary, cancelled = sorted(lines, key=lambda line: line["request_id"])
    assert unary["request_id"] == "abc" and unary["client_id"] == "team-a" and unary["model"] == "scripted"
    assert unary["endpoint"] == "CreateChatCompletion" and unary["status"] == "OK"
    assert unary["completion_tokens"] == 5 and unary["prompt_tokens"] > 0
    assert 0 < unary["ttft_s"] <= unary["duration_s"]
    assert unary["finish_reasons"] == ["length"]
    assert cancelled["request_id"] == "gone" and cancelled["status"] == "CANCELLED"
    assert cancelled["client_id"] == "anonymous"
    assert sample(server, "genrpc_client_requests_total", client_id="anonymous", code="CANCELLED") == 1


def test_tracing_is_off_without_otel_variables_and_imports_no_sdk():
    assert not configure_tracing("x", environ={}).enabled
    assert not configure_tracing("x", environ={"OTEL_TRACES_EXPORTER": "none"}).enabled
    assert not configure_tracing("x", environ={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}).enabled
    # A fresh interpreter building the server and the bridge app with tracing off never imports the SDK.
    code = ("import os, sys; os.environ.pop('OTEL_TRACES_EXPORTER', None)\n"
            "from genrpc.service.server import create_server\n"
            "from genrpc.bridge.app import create_app\n"
            "from genrpc.settings import Settings\n"
            "from tests.scripted_engine import ScriptedEngine\n"
            "create_server(Settings(grpc_port=0, metrics_port=-1), ScriptedEngine())\n"
            "create_app(Settings())\n"
            "assert not [m for m in sys.modules if m.startswith('opentelemetry')], "
            "[m for m in sys.modules if m.startswith('opentelemetry')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unknown_exporter_is_a_clear_error():
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        configure_tracing("x", environ={"OTEL_TRACES_EXPORTER": "zipkin"})


async def test_the_engine_gets_the_services_span_as_trace_context(monkeypatch):
    """With tracing on, the RPC's span is current while the request runs and the servicer hands it to the engine
    (GenerationRequest.trace_context, W3C headers): in the client's trace, child of the service's span. An engine with
    tracing of its own (SGLang) passes it on; tests/test_sglang_adapter.py checks SGLang's side."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from genrpc.service import server as server_module
    from genrpc.telemetry import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(server_module, "configure_tracing", lambda name: Tracing(provider.get_tracer("t"), provider))
    engine = ScriptedEngine(reply="Hi!", context_length=4096)
    server, port = create_server(Settings(grpc_port=0, metrics_port=-1), engine)
    await server.start()
    trace_id, client_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            await stub.CreateChatCompletion(chat(n=2), metadata=(
                ("traceparent", f"00-{trace_id}-{client_span}-01"), ("tracestate", "client=1")))
    finally:
        await server.stop(0)
    service_span = next(s for s in exporter.get_finished_spans() if s.name == "chat scripted")
    assert format(service_span.context.trace_id, "032x") == trace_id
    assert format(service_span.parent.span_id, "016x") == client_span
    assert len(engine.requests) == 2  # one per choice, each with the same context
    for request in engine.requests:
        version, tid, parent, flags = request.trace_context["traceparent"].split("-")
        assert (tid, parent, flags) == (trace_id, format(service_span.context.span_id, "016x"), "01")
        assert request.trace_context["tracestate"] == "client=1"


async def test_no_trace_context_reaches_the_engine_when_tracing_is_off(served):
    server, stub = served
    await stub.CreateChatCompletion(chat(max_tokens=2), metadata=(
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),))
    assert not server.tracing.enabled
    assert server.engine.requests[-1].trace_context == {}
