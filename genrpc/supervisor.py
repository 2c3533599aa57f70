"""`genrpc up`'s supervisor: starts the children in order, restarts one that crashes, drains in order.

- Start: each child once the previous one is ready (service SERVING, bridge /health, Envoy /ready).
- A child that exits while the stack is up is restarted with exponential backoff (0.5 s doubling to 30 s; the
  backoff resets once a child has stayed up for a minute), and the supervisor says so on stderr. Meanwhile the
  others keep running: Envoy answers 503 for a dead upstream, so clients get a clean error, not a hang.
- Stop (SIGTERM or Ctrl-C): the stack drains from the back. The service goes first: it turns NOT_SERVING, refuses
  new calls (UNAVAILABLE, which Envoy and the bridge turn into 503s) and lets running streams finish within the
  grace period, while the bridge and Envoy keep carrying those streams to their clients. Then the bridge, then
  Envoy, the front door, which therefore closes last.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from genrpc import processes

log = logging.getLogger("genrpc.up")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a child up this long is healthy again: its next crash restarts quickly


@dataclass
class ChildSpec:
    name: str
    argv: Callable[[], list[str]]  # called at every (re)start: Envoy needs a fresh config path/base id
    ready: Callable[[], bool]
    ready_timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    stop_timeout_s: float = 10.0
    stop_last: bool = False  # stopped after every other child (an engine host outlives the workers it serves)


@dataclass
class _Running:
    spec: ChildSpec
    child: processes.Child
    started: float
    backoff_s: float = BACKOFF_FIRST_S


class Supervisor:
    """Runs `specs` (in start order) until `stop()`; see the module docstring."""

    def __init__(self, specs: list[ChildSpec], on_ready: Callable[[], None] = lambda: None,
                 stop_together: bool = False):
        self._specs = specs
        self._on_ready = on_ready
        self._stop_together = stop_together  # workers of one kind drain at the same time, not one by one
        self._running: dict[str, _Running] = {}
        self._pids: dict[str, int] = {}
        self._stopping = threading.Event()

    def add(self, spec: ChildSpec) -> None:
        self._specs.append(spec)

    def pid(self, name: str) -> int:
        """The pid of a child, also while it starts (SGLang's serving workers attach to the engine host's)."""
        return self._pids[name]

    def _start(self, spec: ChildSpec) -> processes.Child:
        child = processes.spawn(spec.name, spec.argv(), env=spec.env)
        self._pids[spec.name] = child.process.pid
        processes.wait_until(spec.ready, child, spec.ready_timeout_s, "ready", stop=self._stopping)
        return child

    def start(self) -> None:
        """Starts every child in order; raises ChildDied/TimeoutError if one fails to become ready."""
        for spec in self._specs:
            if self._stopping.is_set():
                return
            log.info("starting %s", spec.name)
            self._running[spec.name] = _Running(spec, self._start(spec), time.monotonic())

    def watch(self) -> None:
        """Restarts crashed children until `stop()` is called."""
        while not self._stopping.wait(0.2):
            for name, running in list(self._running.items()):
                if running.child.alive():
                    if time.monotonic() - running.started > STABLE_AFTER_S:
                        running.backoff_s = BACKOFF_FIRST_S
                    continue
                self._restart(running)

    def _restart(self, running: _Running) -> None:
        spec = running.spec
        log.error("%s exited with code %s; restarting it in %.1f s", spec.name, running.child.process.returncode,
                  running.backoff_s)
        if self._stopping.wait(running.backoff_s):
            return
        delay = running.backoff_s
        running.backoff_s = min(running.backoff_s * 2, BACKOFF_MAX_S)
        try:
            running.child = self._start(spec)
        except (processes.ChildDied, TimeoutError) as error:
            log.error("%s did not come back: %s", spec.name, error)
            return  # still dead: the next watch round retries with the longer backoff
        running.started = time.monotonic()
        log.info("%s is back (restarted after %.1f s)", spec.name, delay)

    def stop(self) -> None:
        """Drains from the back: the first child started stops first, the front door last; `stop_last` children
        (an engine host) after all the others."""
        self._stopping.set()
        for group in ([spec for spec in self._specs if not spec.stop_last],
                      [spec for spec in self._specs if spec.stop_last]):
            if self._stop_together:
                for spec in group:
                    running = self._running.get(spec.name)
                    if running is not None and running.child.alive():
                        running.child.process.send_signal(signal.SIGTERM)
            for spec in group:
                running = self._running.get(spec.name)
                if running is not None:
                    log.info("stopping %s", spec.name)
                    running.child.stop(timeout_s=spec.stop_timeout_s)

    def run(self) -> int:
        """start() + watch() until SIGTERM/SIGINT, then stop(). Returns the exit code for `genrpc up`."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        try:
            self.start()
            if not self._stopping.is_set():
                self._on_ready()
            self.watch()
            return 0
        except processes.Interrupted:
            return 0
        except (processes.ChildDied, TimeoutError) as error:
            log.error("%s", error)
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.stop()
