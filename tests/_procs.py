"""Subprocess helpers for tests: free ports, readiness polling that shows the child's stderr if it dies,
always-terminated children, and a ready-to-use Envoy runner (`run_envoy`).

Readiness is always an observable condition (an HTTP 200, a TCP accept) polled with a deadline, never a
fixed sleep.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from genrpc import envoy_config

HOST = "127.0.0.1"
_base_ids = itertools.count(1)


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def next_base_id() -> int:
    """A base id distinct from every other Envoy started by this process (and, by pid, by other runs)."""
    return (os.getpid() % 5000) * 20 + next(_base_ids) % 20 + 100


class Proc:
    """A child process whose stdout+stderr go to a log file (no pipe can fill up and block it)."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, log_path: str | Path | None = None):
        self.name = name
        self.argv = list(argv)
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                      cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail_chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail_chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; output:\n{self.output()}")

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after timeout_s. Returns the exit code."""
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout_s)
        self._log.close()
        return self.popen.returncode


def wait_until(predicate: Callable[[], bool], proc: Proc | None, timeout_s: float, what: str,
               interval_s: float = 0.02) -> None:
    """Polls `predicate` until true; fails at once (with the child's output) if `proc` dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None:
            proc.check_alive()
        if predicate():
            return
        if time.monotonic() > deadline:
            out = f"; output:\n{proc.output()}" if proc is not None else ""
            raise TimeoutError(f"{proc.name if proc else 'condition'} not {what} after {timeout_s}s{out}")
        time.sleep(interval_s)


async def async_wait_until(predicate: Callable[[], bool], proc: Proc | None, timeout_s: float, what: str,
                           interval_s: float = 0.02) -> None:
    """`wait_until` for async tests: yields to the event loop between polls (so in-process servers run)."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None:
            proc.check_alive()
        if await asyncio.to_thread(predicate):
            return
        if time.monotonic() > deadline:
            out = f"; output:\n{proc.output()}" if proc is not None else ""
            raise TimeoutError(f"{proc.name if proc else 'condition'} not {what} after {timeout_s}s{out}")
        await asyncio.sleep(interval_s)


def http_ok(url: str, timeout_s: float = 1.0) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - loopback test URL
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    return check


def tcp_open(host: str, port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((host, port)) == 0

    return check


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket LISTENing on `port` (from /proc/net/tcp; Linux only)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        addr_hex, port_hex = fields[1].split(":")
        if int(port_hex, 16) == port and fields[3] == "0A":
            raw = bytes.fromhex(addr_hex)[::-1]
            found.add(".".join(str(b) for b in raw))
    return found


@dataclass
class EnvoyHandle:
    proc: Proc
    port: int
    admin_port: int
    config_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"


def start_envoy(workdir: Path, *, grpc_port: int, bridge_port: int, grpc_host: str = HOST,
                bridge_host: str = HOST, name: str = "envoy", timeout_s: float = 30.0,
                log_level: str = "warn", **options) -> EnvoyHandle:
    """Renders the product config into `workdir`, starts Envoy on free ports and waits for admin /ready."""
    port, admin_port = free_port(), free_port()
    config_path = Path(workdir) / f"{name}.yaml"
    config_path.write_text(envoy_config.render(
        listen_host=HOST, listen_port=port, admin_port=admin_port, grpc_host=grpc_host, grpc_port=grpc_port,
        bridge_host=bridge_host, bridge_port=bridge_port,
        descriptor_path=envoy_config.default_descriptor_path(), **options))
    proc = Proc(name, envoy_config.envoy_command(config_path, base_id=next_base_id(), log_level=log_level),
                log_path=Path(workdir) / f"{name}.log")
    handle = EnvoyHandle(proc, port, admin_port, config_path)
    try:
        wait_until(http_ok(f"{handle.admin_url}/ready"), proc, timeout_s, "ready (admin /ready)")
    except BaseException:
        proc.stop()
        raise
    return handle


@contextlib.contextmanager
def run_envoy(workdir: Path, **kwargs) -> Iterator[EnvoyHandle]:
    """`start_envoy` as a context manager: Envoy is always stopped."""
    handle = start_envoy(workdir, **kwargs)
    try:
        yield handle
    finally:
        handle.proc.stop()
