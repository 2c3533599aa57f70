"""Prometheus metrics of the service, on a registry of their own (tests run several servers per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from genrpc.service.engines.base import Engine

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServiceMetrics:
    def __init__(self, engine: Engine, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("genrpc_requests", "Finished RPCs by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.prompt_tokens = Counter("genrpc_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("genrpc_completion_tokens", "Tokens generated.", registry=r)
        self.time_to_first_token = Histogram("genrpc_time_to_first_token_seconds",
                                             "Time from request to the first generated text.",
                                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.request_duration = Histogram("genrpc_request_duration_seconds", "Whole request time.",
                                          ["method"], buckets=_LATENCY_BUCKETS_S, registry=r)
        running = Gauge("genrpc_running_requests", "Requests holding a batch slot in the engine.", registry=r)
        running.set_function(lambda: engine.running_requests)
        waiting = Gauge("genrpc_waiting_requests", "Requests queued for a batch slot.", registry=r)
        waiting.set_function(lambda: engine.waiting_requests)
