"""Faults and drain of the whole stack (`genrpc up` on its own ports, not the shared `stack` fixture, because these
tests kill its children): a crashed service (which serves the SSE bridge too, by default) or a crashed bridge
process (`--bridge-process`) is restarted and clients get clean errors meanwhile; SIGTERM drains streams through
Envoy (SSE and gRPC) before the front door closes."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from _procs import free_port
from _stack_up import pid_listening
from genrpc import processes
from genrpc.settings import PORT_SETTINGS, DEFAULT_MODEL_ID
from genrpc.v1 import chat_pb2, generation_service_pb2_grpc

LONG = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


class Up:
    def __init__(self, tmp_path: Path, grace_s: float = 20, **settings: object):
        self.ports = {name: free_port() for name in PORT_SETTINGS}
        env = {f"GENRPC_{name.upper()}": str(value) for name, value in {**self.ports, **settings}.items()}
        env["GENRPC_SHUTDOWN_GRACE_S"] = str(grace_s)
        self.log_path = tmp_path / "genrpc-up.log"
        self.child = processes.spawn("genrpc up", [sys.executable, "-m", "genrpc.cli", "up", "--envoy-base-id",
                                                   str(os.getpid() % 10000 + 300)], env=env,
                                     log_path=str(self.log_path))
        self.rest = f"http://127.0.0.1:{self.ports['envoy_port']}/v1"
        self.envoy = f"127.0.0.1:{self.ports['envoy_port']}"
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 900) -> None:
        processes.wait_until(processes.http_ok(f"http://127.0.0.1:{self.ports['envoy_admin_port']}/ready"),
                             self.child, timeout_s, "ready")
        processes.wait_until(processes.grpc_serving(f"127.0.0.1:{self.ports['grpc_port']}"), self.child, 60,
                             "SERVING")

    def child_pid(self, port_name: str) -> int:
        """The pid of the child listening on one of the stack's ports."""
        return pid_listening(self.ports[port_name])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.child.stop(timeout_s=60)


@pytest.fixture
def up(tmp_path):
    stack = Up(tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


def serving(address: str) -> bool:
    try:
        return processes.grpc_serving(address)()
    except grpc.RpcError:
        return False  # a draining server refuses new calls, health checks included


def sdk(up: Up) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.rest, api_key="unused", max_retries=0, timeout=60)


def stream_chunks(up: Up, started: threading.Event, outcome: dict, max_tokens: int = 400) -> None:
    """Reads one SSE stream to its end, recording how it ended."""
    try:
        stream = sdk(up).chat.completions.create(model=DEFAULT_MODEL_ID, messages=LONG, max_tokens=max_tokens,
                                                 stream=True, temperature=0, extra_body={"ignore_eos": True})
        chunks = 0
        for _ in stream:
            chunks += 1
            if chunks == 3:
                started.set()
        outcome["chunks"] = chunks
        outcome["end"] = "complete"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        outcome["end"] = f"{type(error).__name__}: {error}"
    finally:
        outcome["at"] = time.monotonic()
        started.set()


@pytest.fixture
def up_with_bridge_process(tmp_path):
    stack = Up(tmp_path, bridge_process=True)
    try:
        yield stack
    finally:
        stack.stop()


def test_bridge_crash_is_restarted_and_clients_get_clean_errors(up_with_bridge_process):
    up = up_with_bridge_process
    assert up.child_pid("bridge_port") != up.child_pid("grpc_port")
    started, outcome = threading.Event(), {}
    reader = threading.Thread(target=stream_chunks, args=(up, started, outcome))
    reader.start()
    assert started.wait(120)
    killed_at = time.monotonic()
    os.kill(up.child_pid("bridge_port"), signal.SIGKILL)
    reader.join(30)
    assert not reader.is_alive(), "the SSE client hung after the bridge died"
    assert outcome["end"] != "complete" and outcome["at"] - killed_at < 10, outcome

    # Until the bridge is back, a new stream gets an OpenAI-shaped 503 (or already succeeds).
    response = httpx.post(f"{up.rest}/chat/completions", timeout=30, json={
        "model": DEFAULT_MODEL_ID, "messages": LONG, "max_tokens": 4, "stream": True})
    assert response.status_code in (200, 503), response.text
    if response.status_code == 503:
        assert response.json()["error"]["type"] == "server_error"

    processes.wait_until(lambda: "bridge is back" in up.log(), up.child, 60, "restarted (log says bridge is back)")
    chunks = list(sdk(up).chat.completions.create(model=DEFAULT_MODEL_ID, messages=LONG, max_tokens=4,
                                                  stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "restarting it in" in up.log()


def test_service_crash_unavailable_then_recovers(up):
    channel = grpc.insecure_channel(up.envoy)
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    request = chat_pb2.ChatCompletionRequest(
        model=DEFAULT_MODEL_ID, messages=[chat_pb2.ChatMessage(role="user", content={"string_value": "Hi"})],
        max_completion_tokens=400, ignore_eos=True)
    call = stub.Chat(request, timeout=60)
    next(call)
    started, outcome = threading.Event(), {}  # an SSE stream through Envoy, served by the same process
    reader = threading.Thread(target=stream_chunks, args=(up, started, outcome))
    reader.start()
    assert started.wait(120)
    assert up.child_pid("bridge_port") == up.child_pid("grpc_port")
    killed_at = time.monotonic()
    os.kill(up.child_pid("grpc_port"), signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as caught:
        for _ in call:
            pass
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), caught.value
    reader.join(30)
    assert not reader.is_alive(), "the SSE client hung after the service died"
    assert outcome["end"] != "complete" and outcome["at"] - killed_at < 10, outcome

    with pytest.raises(openai.APIStatusError) as rest_error:
        sdk(up).chat.completions.create(model=DEFAULT_MODEL_ID, messages=LONG, max_tokens=4)
    assert rest_error.value.status_code == 503
    # a new stream too, until the service is back (an OpenAI-shaped 503 from Envoy), or it already succeeds
    response = httpx.post(f"{up.rest}/chat/completions", timeout=30, json={
        "model": DEFAULT_MODEL_ID, "messages": LONG, "max_tokens": 4, "stream": True})
    assert response.status_code in (200, 503), response.text
    if response.status_code == 503:
        assert response.json()["error"]["type"] == "server_error"

    processes.wait_until(lambda: "service is back" in up.log(), up.child, 300, "restarted (log says service is back)")
    reply = sdk(up).chat.completions.create(model=DEFAULT_MODEL_ID, messages=LONG, max_tokens=4)
    assert reply.usage.completion_tokens == 4
    metrics = httpx.get(f"http://127.0.0.1:{up.ports['metrics_port']}/metrics").text
    assert re.search(r"^genrpc_running_requests\{[^}]*\} 0\.0$", metrics, re.M)
    channel.close()


def test_sigterm_drains_streams_through_envoy(tmp_path):
    stack = Up(tmp_path, grace_s=30)
    try:
        started, outcome = threading.Event(), {}
        reader = threading.Thread(target=stream_chunks, args=(stack, started, outcome, 48))
        reader.start()
        channel = grpc.insecure_channel(stack.envoy)
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        call = stub.Chat(chat_pb2.ChatCompletionRequest(
            model=DEFAULT_MODEL_ID, messages=[chat_pb2.ChatMessage(role="user", content={"string_value": "Hi"})],
            max_completion_tokens=48, ignore_eos=True), timeout=120)
        first = next(call)
        assert started.wait(120)
        stack.child.process.send_signal(signal.SIGTERM)
        # The front door stays open while the service drains: a new request is refused cleanly, not cut.
        processes.wait_until(lambda: not serving(f"127.0.0.1:{stack.ports['grpc_port']}"), None, 10, "NOT_SERVING")
        for stream in (False, True):
            refused = httpx.post(f"{stack.rest}/chat/completions", timeout=30, json={
                "model": DEFAULT_MODEL_ID, "messages": LONG, "max_tokens": 4, "stream": stream})
            assert refused.status_code == 503 and refused.json()["error"]["message"], (stream, refused.text)
        rest = list(call)
        finishes = [c.choices[0].finish_reason.string_value for c in [first, *rest] if c.choices]
        assert "length" in finishes
        reader.join(60)
        assert outcome["end"] == "complete", outcome
        assert stack.child.process.wait(timeout=60) == 0
        channel.close()
    finally:
        stack.stop()


def _exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (an orphan's new parent may not reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_genrpc_up_takes_its_children_with_it(tmp_path):
    """SIGKILL leaves the supervisor no chance to stop its children: the kernel's parent-death signal does
    (SIGTERM, so they drain as usual), and nothing is left running on the stack's ports."""
    stack = Up(tmp_path, grace_s=5)
    children: dict[str, int] = {}
    try:
        children.update((name, stack.child_pid(name)) for name in ("grpc_port", "bridge_port", "envoy_port"))
        # two children: the service (gRPC and the SSE bridge) and Envoy
        assert children["grpc_port"] == children["bridge_port"], children
        assert len(set(children.values())) == 2 and stack.child.pid not in children.values(), children
        os.kill(stack.child.pid, signal.SIGKILL)
        stack.child.process.wait(10)
        processes.wait_until(lambda: all(_exited(pid) for pid in children.values()), None, 30,
                             f"gone (children {children} of the killed genrpc up)")
        for name in children:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", stack.ports[name]), timeout=5).close()
    finally:
        for pid in children.values():
            if not _exited(pid):  # the test failed: leave nothing behind
                os.kill(pid, signal.SIGKILL)
        stack.stop()
