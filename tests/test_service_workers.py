"""`genrpc serve --service-workers N`: N real service processes (synthetic engine) listening on one port with
SO_REUSEPORT, serving requests on separate connections, all stopped by one SIGTERM to the supervisor."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import httpx
from google.protobuf import json_format

from _procs import HOST, free_port, spawn, wait_until
from genrpc import processes
from genrpc.service.engines.synthetic import TOKEN_TEXT_WIDTH, parse_emission_times
from genrpc.v1 import chat_pb2, generation_service_pb2_grpc


def listeners(port: int) -> int:
    """LISTEN sockets on `port` (one per worker with SO_REUSEPORT), from /proc/net/tcp and tcp6."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                count += 1
    return count


def test_two_workers_share_the_port_and_stop_together(tmp_path):
    """With --serve-bridge (genrpc up's default) each worker serves the bridge too, on one shared port."""
    port, bridge_port = free_port(), free_port()
    env = {"GENRPC_ENGINE": "synthetic", "GENRPC_SYNTHETIC_TOKENS_PER_S": "0", "GENRPC_GRPC_PORT": str(port),
           "GENRPC_METRICS_PORT": "-1", "GENRPC_SHUTDOWN_GRACE_S": "1", "GENRPC_SERVE_BRIDGE": "true",
           "GENRPC_BRIDGE_PORT": str(bridge_port), "GENRPC_BRIDGE_METRICS_PORT": "-1"}
    supervisor = spawn("service", [sys.executable, "-m", "genrpc.cli", "serve", "--service-workers", "2"], env=env,
                       log_path=tmp_path / "service.log")
    try:
        wait_until(lambda: listeners(port) == 2 and listeners(bridge_port) == 2, supervisor, 60,
                   "listening twice on both ports")
        wait_until(processes.grpc_serving(f"{HOST}:{port}"), supervisor, 60, "SERVING")
        request = json_format.ParseDict({"model": "smollm2-135m-instruct", "max_tokens": 5,
                                         "messages": [{"role": "user", "content": "hi"}]},
                                        chat_pb2.ChatCompletionRequest())
        for _ in range(4):  # separate connections, so the kernel may pick either worker
            with grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
                text = "".join(c.choices[0].delta.content for c in stub.Chat(request, timeout=30) if c.choices)
                assert len(text) == 5 * TOKEN_TEXT_WIDTH and len(parse_emission_times(text)) == 5
        for _ in range(4):  # the bridge: a new connection each, so either worker may serve it
            with httpx.Client(base_url=f"http://{HOST}:{bridge_port}", timeout=30) as http:
                response = http.post("/v1/chat/completions", json={
                    "model": "smollm2-135m-instruct", "max_tokens": 5, "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n"), response.text
    finally:
        assert supervisor.stop(timeout_s=20) == 0
    assert listeners(port) == 0 and listeners(bridge_port) == 0  # the workers went with the supervisor


def test_workers_need_a_fixed_port(tmp_path):
    env = {"GENRPC_ENGINE": "synthetic", "GENRPC_GRPC_PORT": "0", "GENRPC_METRICS_PORT": "-1"}
    child = spawn("service", [sys.executable, "-m", "genrpc.cli", "serve", "--service-workers", "2"], env=env,
                  log_path=tmp_path / "service.log")
    assert child.process.wait(timeout=60) == 2
    child.stop()
    assert "fixed --grpc-port" in child.output_tail()


def test_two_bridge_workers_share_the_port_and_stop_together(tmp_path):
    port = free_port()
    env = {"GENRPC_BRIDGE_PORT": str(port), "GENRPC_GRPC_TARGET": f"{HOST}:{free_port()}",
           "GENRPC_SHUTDOWN_GRACE_S": "1"}
    supervisor = spawn("bridge", [sys.executable, "-m", "genrpc.cli", "bridge", "--bridge-workers", "2"], env=env,
                       log_path=tmp_path / "bridge.log")
    try:
        wait_until(lambda: listeners(port) == 2, supervisor, 60, "listening twice")
        wait_until(processes.http_ok(f"http://{HOST}:{port}/health"), supervisor, 60, "answering /health")
    finally:
        assert supervisor.stop(timeout_s=20) == 0
    assert listeners(port) == 0
