"""`genrpc up` with chosen settings on free loopback ports (for tests that need their own stack: API keys, TLS,
short timeouts, the synthetic engine), plus readers for the service's metrics and its RSS."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from _procs import free_port
from genrpc import processes

from genrpc.settings import PORT_SETTINGS


def scrape(url: str, client: httpx.Client | None = None) -> dict[str, float]:
    """Every sample of a Prometheus endpoint, keyed `name{label="value",...}` (labels sorted)."""
    samples = {}
    text = (client.get(url) if client is not None else httpx.get(url, timeout=10)).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def metric_sum(samples: dict[str, float], name: str) -> float:
    """The sum of `name` over all its label sets (e.g. every model_name of a gauge)."""
    return sum(value for key, value in samples.items() if key.startswith(name + "{"))


class StackUp:
    """`genrpc up` with `settings` (Settings field -> value, passed as GENRPC_* env vars); stop() stops it and
    checks nothing still listens on its ports."""

    def __init__(self, workdir: Path, base_id: int, **settings: object):
        self.ports = {name: free_port() for name in PORT_SETTINGS}
        env = {f"GENRPC_{name.upper()}": str(value) for name, value in {**self.ports, **settings}.items()}
        env.setdefault("GENRPC_SHUTDOWN_GRACE_S", "2")
        self.log_path = Path(workdir) / "genrpc-up.log"
        self.child = processes.spawn("genrpc up", [sys.executable, "-m", "genrpc.cli", "up", "--envoy-base-id",
                                                   str(base_id)], env=env, log_path=str(self.log_path))
        self.envoy = f"127.0.0.1:{self.ports['envoy_port']}"
        self.grpc = f"127.0.0.1:{self.ports['grpc_port']}"
        self.bridge = f"127.0.0.1:{self.ports['bridge_port']}"
        self.metrics_url = f"http://127.0.0.1:{self.ports['metrics_port']}/metrics"
        try:
            processes.wait_until(processes.http_ok(f"http://127.0.0.1:{self.ports['envoy_admin_port']}/ready"),
                                 self.child, 900, "ready (Envoy admin /ready)")
            processes.wait_until(processes.grpc_serving(self.grpc), self.child, 120, "SERVING")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.child.stop(timeout_s=30)
        for name, port in self.ports.items():
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"{name} {port} still open after stop"

    def metrics(self) -> dict[str, float]:
        """Every sample of the service's /metrics, keyed `name{label="value",...}` (labels sorted)."""
        return scrape(self.metrics_url)

    def requests_total(self) -> float:
        return metric_sum(self.metrics(), "genrpc_requests_total")

    def running_and_waiting(self) -> tuple[float, float]:
        m = self.metrics()
        return metric_sum(m, "genrpc_running_requests"), metric_sum(m, "genrpc_waiting_requests")

    def service_rss_bytes(self) -> int:
        pid = pid_listening(self.ports["grpc_port"])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise LookupError("VmRSS")


def pid_listening(port: int) -> int:
    """The pid of the process with a LISTEN socket on `port` (from /proc; Linux only)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    raise LookupError(f"nothing listens on port {port}")


class QueueWatch:
    """Polls the service's /metrics while a load runs: the highest genrpc_waiting_requests and
    genrpc_running_requests seen (summed over their labels). A context manager."""

    def __init__(self, url: str):
        self.url, self.max_waiting, self.max_running, self._stop = url, 0.0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # uncompressed and 20 times a second: a scrape runs on the service's metrics thread, under its GIL, so a
        # gzipped scrape every 10 ms took a measurable share of the service's CPU from the load it watched
        with httpx.Client(timeout=5, headers={"accept-encoding": "identity"}) as client:
            while not self._stop.is_set():
                samples = scrape(self.url, client)
                self.max_waiting = max(self.max_waiting, metric_sum(samples, "genrpc_waiting_requests"))
                self.max_running = max(self.max_running, metric_sum(samples, "genrpc_running_requests"))
                self._stop.wait(0.05)

    def __enter__(self) -> QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
