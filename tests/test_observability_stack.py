"""Observability end to end on a real `genrpc up` (CPU model, bridge, Envoy) exporting traces to a real OTLP/HTTP
receiver on loopback: one client request's spans from the bridge and the service in the client's trace, the
shipped dashboard's queries against what the stack really exports, Envoy's stats listener, and the access logs.
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _otlp_receiver import OTLPReceiver
from _procs import free_port
from genrpc import processes
from genrpc.settings import PORT_SETTINGS, DEFAULT_MODEL_ID

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "k8s" / "base" / "monitoring" / "genrpc-dashboard.json"
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory):
    receiver = OTLPReceiver()
    ports = {name: free_port() for name in PORT_SETTINGS}
    env = {f"GENRPC_{name.upper()}": str(port) for name, port in ports.items()}
    env |= {"GENRPC_SHUTDOWN_GRACE_S": "2", "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    log_path = tmp_path_factory.mktemp("traced") / "genrpc-up.log"
    child = processes.spawn("genrpc up", [sys.executable, "-m", "genrpc.cli", "up", "--envoy-base-id",
                                          str(os.getpid() % 10000 + 500)], env=env, log_path=str(log_path))
    try:
        processes.wait_until(processes.http_ok(f"http://{HOST}:{ports['envoy_admin_port']}/ready"), child, 900,
                             "ready (Envoy admin /ready)")
        processes.wait_until(processes.grpc_serving(f"{HOST}:{ports['grpc_port']}"), child, 60, "SERVING")
        yield ports, receiver, log_path
    finally:
        child.stop(timeout_s=30)
        receiver.stop()


def _stream_one(ports, headers: dict[str, str]) -> str:
    client = openai.OpenAI(base_url=f"http://{HOST}:{ports['envoy_port']}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_headers=headers)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_one_request_yields_bridge_and_service_spans_in_the_clients_trace(traced_stack):
    ports, receiver, _ = traced_stack
    trace_id, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    _stream_one(ports, {"traceparent": f"00-{trace_id}-{client_span}-01", "tracestate": "client=1"})

    def complete() -> bool:
        names = {s["name"] for s in receiver.in_trace(trace_id)}
        return {"POST /v1/chat/completions", f"chat {DEFAULT_MODEL_ID}", "prefill", "stream"} <= names
    processes.wait_until(complete, None, 30, "bridge and service spans at the receiver")
    spans = {s["name"]: s for s in receiver.in_trace(trace_id)}
    bridge, service = spans["POST /v1/chat/completions"], spans[f"chat {DEFAULT_MODEL_ID}"]
    assert bridge["service"] == "genrpc-bridge" and service["service"] == "genrpc-service"
    assert bridge["parent_id"] == client_span  # the client's span, through Envoy
    assert service["parent_id"] == bridge["span_id"]
    for phase in ("prefill", "stream"):
        assert spans[phase]["parent_id"] == service["span_id"]
    if "queue" in spans:  # engines that measure the slot wait
        assert spans["queue"]["parent_id"] == service["span_id"]
        assert spans["queue"]["end"] <= spans["prefill"]["start"] + 1_000_000
    assert spans["prefill"]["end"] <= spans["stream"]["start"] + 1_000_000
    a = service["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == DEFAULT_MODEL_ID
    assert a["gen_ai.request.max_tokens"] == 8
    assert a["gen_ai.usage.input_tokens"] > 0 and 0 < a["gen_ai.usage.output_tokens"] <= 8
    assert a["gen_ai.response.finish_reasons"] in (("stop",), ("length",))
    assert a["rpc.grpc.status_code"] == 0
    assert bridge["attributes"]["gen_ai.request.model"] == DEFAULT_MODEL_ID
    assert bridge["attributes"]["http.response.status_code"] == 200
    # no prompt or completion text anywhere
    assert not any("Say hello" in str(v) for s in spans.values() for v in s["attributes"].values())


def test_service_and_envoy_access_logs_share_the_request_id(traced_stack):
    ports, _, log_path = traced_stack
    request_id = f"req-{uuid.uuid4().hex}"
    _stream_one(ports, {"x-request-id": request_id})

    def lines() -> list[dict]:
        found = []
        for line in log_path.read_text(errors="replace").splitlines():
            if request_id in line and line.startswith("{"):
                found.append(json.loads(line))
        return found
    processes.wait_until(lambda: len(lines()) >= 2, None, 15, "both access log lines")
    envoy = next(entry for entry in lines() if "bytes_sent" in entry)
    service = next(entry for entry in lines() if entry.get("event") == "request")
    assert envoy["request_id"] == service["request_id"] == request_id
    assert envoy["path"] == "/v1/chat/completions" and envoy["status"] == 200 and envoy["route"] == "stream"
    assert service["endpoint"] == "Chat" and service["status"] == "OK" and service["model"] == DEFAULT_MODEL_ID
    assert service["client_id"] == "anonymous" and service["completion_tokens"] > 0
    assert 0 < service["ttft_s"] <= service["duration_s"]


# ---- metrics and the dashboard --------------------------------------------------------------------------

PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "clamp_min",
    "clamp_max", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "topk",
    "bottomk", "abs", "delta", "deriv", "label_values", "offset", "bool",
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label matchers, grouping clauses and functions removed)."""
    text = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r'"[^"]*"', "", text)
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"e\d*|\d.*", n)}


def exported(text: str) -> set[str]:
    """Every series name of a Prometheus text exposition, as Prometheus stores it (the sample lines' names:
    histogram _bucket/_sum/_count; prometheus_client's parser would add _total to Envoy's counters)."""
    return set(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", text, re.M))


def test_metric_name_parser():
    assert metric_names('histogram_quantile(0.5, sum by (le) (rate(genrpc_x_bucket{model_name=~"$m"}[5m])))') \
        == {"genrpc_x_bucket"}
    assert metric_names('sum(rate(a_total[1m])) / clamp_min(sum(rate(b_total{k="v"}[1m])), 1e-9)') \
        == {"a_total", "b_total"}


def test_every_dashboard_query_names_an_exported_metric(traced_stack):
    ports, _, _ = traced_stack
    _stream_one(ports, {"x-client-id": "dash"})
    service = httpx.get(f"http://{HOST}:{ports['metrics_port']}/metrics").text
    bridge = httpx.get(f"http://{HOST}:{ports['bridge_metrics_port']}/metrics").text
    envoy = httpx.get(f"http://{HOST}:{ports['envoy_stats_port']}/stats/prometheus").text
    names = exported(service) | exported(bridge) | exported(envoy)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(queries) >= 16
    missing = {(name, q) for q in queries for name in metric_names(q.replace("$__rate_interval", "5m"))
               if name not in names}
    assert not missing, f"dashboard queries name metrics nothing exports: {sorted(missing)}"
    # the panels the issue asks for are there
    titles = " | ".join(panel["title"] for panel in dashboard["panels"])
    for needle in ("throughput", "first token", "Inter-token", "Queue depth", "Errors", "client", "utilisation"):
        assert needle.lower() in titles.lower(), needle
    # every genrpc service series carries model_name
    for family in text_string_to_metric_families(service):
        if family.name.startswith("genrpc_"):
            assert all(s.labels.get("model_name") == DEFAULT_MODEL_ID for s in family.samples), family.name
    # the stream went through the bridge: its counters moved
    bridge_samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                      for f in text_string_to_metric_families(bridge) for s in f.samples}
    assert bridge_samples[("genrpc_bridge_requests_total",
                           (("route", "/v1/chat/completions"), ("status", "200")))] >= 1
    assert sum(v for (n, labels), v in bridge_samples.items() if n == "genrpc_bridge_response_bytes_total") > 0


def test_envoy_stats_listener_serves_only_prometheus_stats(traced_stack):
    ports, _, _ = traced_stack
    base = f"http://{HOST}:{ports['envoy_stats_port']}"
    assert "envoy_http_downstream_rq_xx" in httpx.get(f"{base}/stats/prometheus").text
    for method, path in (("GET", "/config_dump"), ("POST", "/quitquitquit"), ("GET", "/stats"),
                         ("POST", "/stats/prometheus"), ("GET", "/clusters")):
        assert httpx.request(method, base + path).status_code == 404, (method, path)
    assert httpx.get(f"http://{HOST}:{ports['envoy_admin_port']}/ready").status_code == 200  # the stack still runs
