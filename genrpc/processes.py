"""Child processes for `genrpc up` (and the test fixtures): start, wait until ready, stop cleanly."""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ChildDied(RuntimeError):
    pass


class Interrupted(Exception):
    """A wait was abandoned because the caller is stopping (SIGTERM during start-up)."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: str | None = None
    _log_file: object | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output_tail(self, lines: int = 60) -> str:
        if not self.log_path:
            return "(output went to the terminal)"
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def ensure_alive(self) -> None:
        if not self.alive():
            raise ChildDied(f"{self.name} exited with code {self.process.returncode} before it was ready:\n"
                            f"{self.output_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout_s`. Returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
        return self.process.returncode


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, for stacks started on chosen ports by tests and benchmarks. Picked below the
    kernel's ephemeral range: a port from that range (the OS's own pick for port 0) can be taken as the local port
    of some outgoing connection before the child binds it (seen: Envoy's listener, "Address already in use").
    Never the same port twice in one process."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10000, low) if low > 10000 else 0
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found")


def spawn(name: str, argv: list[str], *, env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
          cwd: str | os.PathLike | None = None) -> Child:
    """Starts a child in its own process group (Ctrl-C in a terminal reaches only the parent, which then
    stops the children in order) that gets SIGTERM if its parent dies (see `_terminated_with_parent`)."""
    log_file = open(log_path, "wb") if log_path else None  # noqa: SIM115 - closed by Child.stop
    process = subprocess.Popen(_terminated_with_parent(argv), env={**os.environ, **(env or {})}, cwd=cwd,
                               stdin=subprocess.DEVNULL, stdout=log_file,
                               stderr=subprocess.STDOUT if log_file else None, start_new_session=True)
    return Child(name, process, log_path, log_file)


def _terminated_with_parent(argv: list[str]) -> list[str]:
    """`argv` under util-linux's `setpriv --pdeathsig TERM`, which arms Linux's parent-death signal and execs it (same
    pid): a `genrpc up` killed with SIGKILL, or a test runner killed mid-run, then does not leave its service, bridge
    and Envoy running on their ports; they get SIGTERM and drain as usual. Not a pre-exec hook: Python code between
    fork and exec in a process with gRPC's threads can crash the child. The kernel sends the signal when the
    spawning *thread* exits, so only children of the main thread (the supervisor's, the fixtures') get it; off Linux,
    or without setpriv, there is none."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return argv
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]


def wait_until(ready: Callable[[], bool], child: Child | None, timeout_s: float, what: str,
               interval_s: float = 0.02, stop: threading.Event | None = None) -> None:
    """Polls `ready` until it returns True; fails at once (with the child's output) if the child dies, and
    raises Interrupted once `stop` is set."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise Interrupted(f"stopped while waiting for {child.name if child else 'a condition'}")
        if child is not None:
            child.ensure_alive()
        try:
            if ready():
                return
        except (OSError, grpc.RpcError, urllib.error.URLError):
            pass
        time.sleep(interval_s)
    name, output = (child.name, child.output_tail()) if child is not None else ("condition", "")
    raise TimeoutError(f"{name} was not {what} within {timeout_s:.0f} s:\n{output}")


def grpc_serving(address: str) -> Callable[[], bool]:
    def check() -> bool:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    return check


def http_ok(url: str, timeout_s: float = 1.0) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - loopback URLs
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False
    return check
