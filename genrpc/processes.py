"""Child processes for `genrpc up` (and the test fixtures): start, wait until ready, stop cleanly."""

from __future__ import annotations

import os
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


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick), for stacks started on chosen ports by tests and benchmarks."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn(name: str, argv: list[str], *, env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
          cwd: str | os.PathLike | None = None) -> Child:
    """Starts a child in its own process group (Ctrl-C in a terminal reaches only the parent, which then
    stops the children in order) that gets SIGTERM if its parent dies (see `_term_when_parent_dies`)."""
    log_file = open(log_path, "wb") if log_path else None  # noqa: SIM115 - closed by Child.stop
    process = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                               start_new_session=True, preexec_fn=_term_when_parent_dies())
    return Child(name, process, log_path, log_file)


_PR_SET_PDEATHSIG = 1


def _term_when_parent_dies() -> Callable[[], None] | None:
    """A pre-exec hook arming Linux's parent-death signal, so that a `genrpc up` killed with SIGKILL (or a test
    runner killed mid-run) does not leave its service, bridge and Envoy running on their ports: they get SIGTERM
    and drain as usual. The kernel sends it when the spawning *thread* exits, so it is armed only for children
    spawned by the main thread (the supervisor's and the fixtures'); elsewhere, and off Linux, there is none."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def arm() -> None:  # runs in the child between fork and exec: a system call, nothing that allocates
        prctl(_PR_SET_PDEATHSIG, sigterm)
        if os.getppid() != parent:  # the parent died before the signal was armed: do not start at all
            os._exit(1)
    return arm


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
