"""Prometheus metrics of the service, on a registry of their own (tests run several servers per process).

The meanings follow vLLM's and SGLang's (README "Metrics" maps each genrpc_ name to its vllm:/sglang: twin);
every series carries `model_name`. Latency histograms use the OpenTelemetry GenAI semantic conventions'
advisory bucket boundaries (gen_ai.server.time_to_first_token, gen_ai.server.time_per_output_token,
gen_ai.server.request.duration), so dashboards built for either ecosystem read the same quantiles.

Per-request facts are gathered in a `RequestRecord` (the interceptor opens one per RPC in a context variable;
the servicer fills it in) and observed once, when the RPC ends.
"""

from __future__ import annotations

import contextvars
import re
import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from genrpc.service.engines.base import Engine, ReportsCapacity

# OpenTelemetry GenAI semantic conventions (gen-ai-metrics.md), ExplicitBucketBoundaries advisories.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_DURATION_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)

ANONYMOUS_CLIENT = "anonymous"
OTHER_CLIENTS = "other"  # client ids beyond max_clients share one series
_CLIENT_ID = re.compile(r"[A-Za-z0-9._@:-]{1,64}")


@dataclass
class RequestRecord:
    """What one RPC did, filled in as it runs; the interceptor logs and observes it when the RPC ends."""

    method: str
    request_id: str
    client_id: str
    started: float  # time.perf_counter()
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    max_tokens: int | None = None
    generation_started: float | None = None  # perf_counter() when the engine was handed the request
    ttft_s: float | None = None  # from `started`
    queue_time_s: float | None = None
    finish_reasons: list[str] = field(default_factory=list)


# The record of the RPC being served (set by the interceptor; grpc.aio runs a handler in one task).
current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("genrpc_request", default=None)


class _EngineLoad(Collector):
    """Running/waiting requests and slot utilisation, read from the engine at scrape time."""

    def __init__(self, engine: Engine, metrics: ServiceMetrics):
        self._engine, self._metrics = engine, metrics

    def collect(self):
        model = self._metrics.model_name
        running = GaugeMetricFamily("genrpc_running_requests", "Requests holding a batch slot in the engine.",
                                    labels=["model_name"])
        running.add_metric([model], self._engine.running_requests)
        waiting = GaugeMetricFamily("genrpc_waiting_requests", "Requests queued for a batch slot.",
                                    labels=["model_name"])
        waiting.add_metric([model], self._engine.waiting_requests)
        yield from (running, waiting)
        if isinstance(self._engine, ReportsCapacity):
            slots = self._engine.max_running_requests
            capacity = GaugeMetricFamily("genrpc_max_running_requests", "Batch slots of the engine.",
                                         labels=["model_name"])
            capacity.add_metric([model], slots)
            usage = GaugeMetricFamily("genrpc_slot_usage_ratio", "Running requests / batch slots (0..1).",
                                      labels=["model_name"])
            usage.add_metric([model], self._engine.running_requests / slots if slots else 0.0)
            yield from (capacity, usage)


class ServiceMetrics:
    def __init__(self, engine: Engine, registry: CollectorRegistry | None = None, *, model_name: str = "",
                 max_clients: int = 100):
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        self._max_clients = max_clients
        self._clients: set[str] = set()
        self._clients_lock = threading.Lock()
        r = self.registry
        m = ["model_name"]
        self.requests = Counter("genrpc_requests", "Finished RPCs by method and gRPC status code.",
                                m + ["method", "code"], registry=r)
        self.prompt_tokens = Counter("genrpc_prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("genrpc_generation_tokens", "Tokens generated.", m, registry=r)
        self.cached_prompt_tokens = Counter("genrpc_cached_prompt_tokens",
                                            "Prompt tokens served from the engine's prefix cache (engines that "
                                            "report it).", m, registry=r)
        self.time_to_first_token = Histogram("genrpc_time_to_first_token_seconds",
                                             "Time from the RPC's arrival to its first generated text.", m,
                                             buckets=TTFT_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram("genrpc_inter_token_latency_seconds",
                                             "Time between consecutive streamed outputs, per token.", m,
                                             buckets=TPOT_BUCKETS_S, registry=r)
        self.time_per_output_token = Histogram("genrpc_time_per_output_token_seconds",
                                               "Per request: (end - first token) / (generated tokens - 1).", m,
                                               buckets=TPOT_BUCKETS_S, registry=r)
        self.queue_time = Histogram("genrpc_request_queue_time_seconds",
                                    "Time a request waited for an engine batch slot (engines that report it).",
                                    m, buckets=REQUEST_DURATION_BUCKETS_S, registry=r)
        self.e2e_latency = Histogram("genrpc_e2e_request_latency_seconds", "Whole RPC time, by method.",
                                     m + ["method"], buckets=REQUEST_DURATION_BUCKETS_S, registry=r)
        self.client_requests = Counter("genrpc_client_requests", "Finished generation RPCs per client (x-client-id).",
                                       m + ["client_id", "code"], registry=r)
        self.client_tokens = Counter("genrpc_client_tokens", "Tokens per client (x-client-id), by kind.",
                                     m + ["client_id", "kind"], registry=r)
        self.heap_trims = Counter("genrpc_heap_trims", "Times the service returned a burst's freed heap memory to "
                                  "the OS once the burst ended (service/memory.py).", m, registry=r)
        r.register(_EngineLoad(engine, self))
        self.bind_model(model_name)

    def bind_model(self, model_name: str) -> None:
        """Sets the `model_name` label (the served model id) and creates its series, so they exist at zero."""
        self.model_name = model_name
        for metric in (self.prompt_tokens, self.generation_tokens, self.cached_prompt_tokens,
                       self.time_to_first_token, self.inter_token_latency, self.time_per_output_token,
                       self.queue_time, self.heap_trims):
            metric.labels(model_name)

    def count_heap_trim(self) -> None:
        self.heap_trims.labels(self.model_name).inc()

    def client_label(self, raw: str | None) -> str:
        """A bounded label for an x-client-id: absent or malformed -> anonymous, beyond max_clients -> other.
        (Envoy overwrites x-client-id from the API key file when keys are on, which bounds it already.)"""
        if not raw or not _CLIENT_ID.fullmatch(raw):
            return ANONYMOUS_CLIENT
        with self._clients_lock:
            if raw in self._clients:
                return raw
            if len(self._clients) >= self._max_clients:
                return OTHER_CLIENTS
            self._clients.add(raw)
            return raw

    def observe(self, record: RequestRecord, code: str, duration_s: float) -> None:
        """Counts a finished RPC (`code`: gRPC status name)."""
        model = self.model_name
        self.requests.labels(model, record.method, code).inc()
        self.e2e_latency.labels(model, record.method).observe(duration_s)
        if not record.model:  # ListModels/GetModel, or refused before generating
            return
        self.client_requests.labels(model, record.client_id, code).inc()
        self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        self.generation_tokens.labels(model).inc(record.completion_tokens)
        self.cached_prompt_tokens.labels(model).inc(record.cached_prompt_tokens)
        self.client_tokens.labels(model, record.client_id, "prompt").inc(record.prompt_tokens)
        self.client_tokens.labels(model, record.client_id, "generation").inc(record.completion_tokens)
        if record.ttft_s is not None:
            self.time_to_first_token.labels(model).observe(record.ttft_s)
            if record.completion_tokens > 1 and code == "OK":
                self.time_per_output_token.labels(model).observe(
                    (duration_s - record.ttft_s) / (record.completion_tokens - 1))
        if record.queue_time_s is not None:
            self.queue_time.labels(model).observe(record.queue_time_s)
