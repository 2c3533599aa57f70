"""Shared fixtures. `stack` starts the real thing (`genrpc up`: service + bridge + Envoy on CPU with the
bundled model) once per session on free loopback ports, waits for readiness, and stops it at the end."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import sys

import pytest

from genrpc import processes
from _procs import free_port
from _stack_up import metric_sum, scrape
from genrpc.settings import PORT_SETTINGS, DEFAULT_MODEL_ID


class Stack:
    def __init__(self, ports: dict[str, int]):
        self.ports = ports
        self.model = DEFAULT_MODEL_ID
        self.openai_base_url = f"http://127.0.0.1:{ports['envoy_port']}/v1"
        self.envoy_address = f"127.0.0.1:{ports['envoy_port']}"
        self.grpc_address = f"127.0.0.1:{ports['grpc_port']}"
        self.metrics_url = f"http://127.0.0.1:{ports['metrics_port']}/metrics"
        self.bridge_url = f"http://127.0.0.1:{ports['bridge_port']}"
        self.bridge_metrics_url = f"http://127.0.0.1:{ports['bridge_metrics_port']}/metrics"
        self.envoy_stats_url = f"http://127.0.0.1:{ports['envoy_stats_port']}/stats/prometheus"

    def running_requests(self) -> float:
        """The service's genrpc_running_requests gauge."""
        return metric_sum(scrape(self.metrics_url), "genrpc_running_requests")


@contextlib.contextmanager
def running_stack(directory, settings_env: dict[str, str] | None = None):
    """`genrpc up` on free loopback ports with extra GENRPC_* settings; yields a Stack once it is ready."""
    ports = {name: free_port() for name in PORT_SETTINGS}
    env = {f"GENRPC_{name.upper()}": str(port) for name, port in ports.items()}
    env["GENRPC_SHUTDOWN_GRACE_S"] = "2"
    env.update(settings_env or {})
    log_path = directory / "genrpc-up.log"
    child = processes.spawn("genrpc up", [sys.executable, "-m", "genrpc.cli", "up", "--envoy-base-id",
                                          str((os.getpid() + next(_stacks) * 7) % 10000 + 100)], env=env,
                            log_path=str(log_path))
    try:
        processes.wait_until(processes.http_ok(f"http://127.0.0.1:{ports['envoy_admin_port']}/ready"), child,
                             900, "ready (Envoy admin /ready)")
        processes.wait_until(processes.grpc_serving(f"127.0.0.1:{ports['grpc_port']}"), child, 60, "SERVING")
        yield Stack(ports)
    finally:
        child.stop(timeout_s=30)
        # `genrpc up` must stop every child it started: nothing may still listen on the stack's ports.
        for name, port in ports.items():
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"{name} {port} still open after stop"


_stacks = itertools.count()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running
