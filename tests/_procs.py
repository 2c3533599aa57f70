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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from genrpc.envoy import config as envoy_config
from genrpc.processes import Child as Proc
from genrpc.processes import free_port, http_ok, spawn, wait_until  # noqa: F401 - re-exported for the tests

HOST = "127.0.0.1"
_base_ids = itertools.count(1)


def next_base_id() -> int:
    """A base id distinct from every other Envoy started by this process (and, by pid, by other runs)."""
    return (os.getpid() % 5000) * 20 + next(_base_ids) % 20 + 100


async def async_wait_until(predicate: Callable[[], bool], proc: Proc | None, timeout_s: float, what: str,
                           interval_s: float = 0.02) -> None:
    """`wait_until` for async tests: yields to the event loop between polls (so in-process servers run)."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None:
            proc.ensure_alive()
        if await asyncio.to_thread(predicate):
            return
        if time.monotonic() > deadline:
            out = f"; output:\n{proc.output_tail()}" if proc is not None else ""
            raise TimeoutError(f"{proc.name if proc else 'condition'} not {what} after {timeout_s}s{out}")
        await asyncio.sleep(interval_s)


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
        descriptor_path=envoy_config.descriptor_path(), **options))
    proc = spawn(name, envoy_config.envoy_command(config_path, base_id=next_base_id(), log_level=log_level),
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
