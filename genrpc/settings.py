"""The one typed settings object: every option is a CLI flag (`--grpc-port`) and an env var (`GENRPC_GRPC_PORT`).

Precedence: CLI flag > environment > default. Nothing reads the environment at import time: a Settings
object is built by `genrpc.cli` (or by a test) and passed down.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_ID = "smollm2-135m-instruct"


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "genrpc"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENRPC_", extra="forbid")

    # --- network (loopback by default: Envoy is the only public entry point) ---
    host: str = Field("127.0.0.1", description="address every genrpc process binds")
    grpc_port: int = Field(50051, description="gRPC port of the service (0 = pick a free port)")
    bridge_port: int = Field(8001, description="HTTP port of the SSE bridge")
    envoy_port: int = Field(8080, description="Envoy listener: OpenAI REST and gRPC")
    envoy_admin_port: int = Field(9901, description="Envoy admin interface (always bound to 127.0.0.1)")
    envoy_stats_port: int = Field(9902, description="Envoy listener serving only GET /stats/prometheus (for "
                                                    "Prometheus; the admin stays on 127.0.0.1) (-1 = off)")
    metrics_port: int = Field(9464, description="Prometheus metrics of the service (0 = pick a free port, -1 = off)")
    bridge_metrics_port: int = Field(9564, description="Prometheus metrics of the SSE bridge; with --bridge-workers, "
                                                       "worker i uses this + i (0 = pick a free port, -1 = off)")
    grpc_target: str = Field("", description="gRPC address the bridge calls (default: host:grpc_port)")
    api_keys_file: str = Field("", description="API keys Envoy enforces (Bearer): a file of `KEY CLIENT_ID` lines, "
                                               "# comments; the client id is forwarded as x-client-id "
                                               "(empty = no authentication)")
    cors_allowed_origins: str = Field("", description="browser origins allowed by Envoy's CORS policy, comma-separated "
                                                      "exact origins such as https://app.example.com "
                                                      "(empty = no CORS)")
    grpc_upstreams: str = Field("", description="service replicas Envoy balances across, comma-separated host:port; "
                                                "a host may be a DNS name with one address per replica (a "
                                                "Kubernetes headless Service) (default: host:grpc_port)")
    envoy_health_check_interval_s: float = Field(2.0, description="how often Envoy checks each replica's "
                                                                  "grpc.health.v1 status (a NOT_SERVING replica gets "
                                                                  "no new requests within two intervals)")
    envoy_max_requests: int = Field(
        -1, ge=-1, description="Envoy admission: generating requests (native gRPC, REST, SSE streams and DashScope "
                               "together) Envoy lets through at once; beyond it Envoy itself answers 429 / "
                               "RESOURCE_EXHAUSTED with retry-after, before any bridge or service work (the service "
                               "still decides exactly below it). -1 = the local service's capacity, service_workers x "
                               "(max_batch_size + max_queue), when --grpc-upstreams is empty, else 0; 0 = Envoy's "
                               "ceiling of 4096")
    rate_limit_rps: int = Field(0, description="Envoy rate limit: requests per second per Envoy process, burst the "
                                               "same; beyond it REST gets 429, gRPC RESOURCE_EXHAUSTED (0 = off)")
    tls_cert_file: str = Field("", description="Envoy listener TLS: PEM certificate chain file (with --tls-key-file; "
                                               "empty = plain HTTP/gRPC)")
    tls_key_file: str = Field("", description="Envoy listener TLS: PEM private key file")
    tls_client_ca_file: str = Field("", description="Envoy listener mTLS: PEM CA bundle client certificates must chain "
                                                    "to (empty = no client certificate asked)")
    request_headers_timeout_s: int = Field(10, ge=1, description="Envoy: seconds a client has to send its request "
                                                                 "headers (slowloris: 408 and close)")
    request_timeout_s: int = Field(60, ge=0, description="Envoy: seconds a client has to send its whole request "
                                                         "(body included; not the response: streams are not cut; "
                                                         "0 = off)")
    idle_timeout_s: int = Field(300, ge=1, description="Envoy: seconds a client connection may stay open without "
                                                       "any request")
    bridge_send_timeout_s: float = Field(30.0, gt=0, description="bridge: seconds one SSE write may block on a client "
                                                                 "that stopped reading before the stream is cut and "
                                                                 "its gRPC call cancelled (frees the slot)")
    send_timeout_s: float = Field(30.0, gt=0, description="service: seconds a streaming RPC may wait for its "
                                                          "client to take the previous message (HTTP/2 flow "
                                                          "control) before it is cut with CANCELLED and its "
                                                          "generation stopped (frees the slot)")

    # --- model and engine ---
    engine: Literal["llamacpp", "reference", "sglang", "synthetic"] = Field(
        "llamacpp", description="model runtime: llamacpp (GGUF on CPU), reference (torch, bit-identical alone "
                                 "or batched), sglang (GPUs) or synthetic (no model: timestamp tokens for "
                                 "front-path benchmarks only)")
    model: str = Field("", description="HF model directory or .gguf file (default: the bundled SmolLM2-135M)")
    model_id: str = Field(DEFAULT_MODEL_ID, description="model id served to clients (`model` in requests)")
    cache_dir: pathlib.Path = Field(default_factory=default_cache_dir,
                                    description="where converted models are cached")
    context_length: int = Field(0, description="context window in tokens (0 = the model's own)")
    max_batch_size: int = Field(16, description="requests decoded together in one step; more wait in a queue")
    max_queue: int = Field(256, description="requests waiting for a batch slot before RESOURCE_EXHAUSTED")
    llamacpp_threads: int = Field(0, description="llama.cpp engine: CPU threads for decoding and prefill "
                                                 "(0 = all cores)")
    llamacpp_nice: int = Field(5, ge=0, le=19, description="llama.cpp engine: added to the nice value of llama.cpp's "
                                                          "compute threads (its decode loop and ggml's pool), so the "
                                                          "request path (the service's event loop, Envoy) runs first "
                                                          "when the CPU is short, e.g. refusing a burst (0 = same "
                                                          "priority)")
    torch_threads: int = Field(0, description="torch intra-op threads for the reference engine (0 = all cores)")
    reference_batch_invariant: bool = Field(True, description="reference engine: bit-identical results alone or batched "
                                      "(costs ~1.6x single-stream speed)")
    responses_retention_s: float = Field(30 * 24 * 3600, gt=0, description="seconds the Responses API keeps a "
                                         "stored response (SQLite file under cache_dir, one per replica)")
    default_max_tokens: int = Field(0, description="chat max tokens when a request sets none (0 = "
                                                   "max_tokens_limit, or the rest of the context if that is 0)")

    # --- request limits (README "Limits"): a request over one is refused (400/413) naming the limit ---
    max_request_bytes: int = Field(4 * 1024 * 1024, description="request body bytes (Envoy 413 beyond, before "
                                                                "any parsing; the bridge and the service too)")
    max_messages: int = Field(1024, description="chat messages per request")
    max_prompt_tokens: int = Field(0, description="prompt tokens per request (0 = the model's context window); "
                                                  "prompts over 32 characters per allowed token are refused "
                                                  "before tokenising")
    max_n: int = Field(16, description="choices per request (n, times the prompts of a completion)")
    max_stop: int = Field(4, description="stop strings per request")
    max_logit_bias: int = Field(300, description="logit_bias entries per request")
    max_tokens_limit: int = Field(2048, description="ceiling on generated tokens per choice: the default when a "
                                                    "request sets no max_tokens, and larger requests are refused "
                                                    "(0 = none: the rest of the context)")
    stream_interval: int = Field(0, ge=0, description="streaming: send deltas every N tokens (the first at once); "
                                                      "0 = adaptive: each message carries whatever tokens are "
                                                      "ready when the stream can take it, never delayed. A "
                                                      "request's own stream_interval overrides it")
    synthetic_tokens_per_s: float = Field(50.0, ge=0, description="synthetic engine (benchmarks): tokens per "
                                                                  "second per stream (0 = unpaced)")

    # --- SGLang engine (GPU) ---
    tp_size: int = Field(1, description="SGLang tensor-parallel size (GPUs per model replica)")
    dp_size: int = Field(4, description="SGLang data-parallel size (model replicas); dp*tp = GPUs used")
    mem_fraction_static: float = Field(0.85, description="SGLang: GPU memory fraction for weights + KV cache")
    rope_scaling: str = Field("", description='SGLang: JSON rope scaling, e.g. YaRN for 131k context')
    tool_call_parser: str = Field("qwen", description="SGLang tool-call parser name")
    chat_template: str = Field("", description="SGLang: chat template name or file (default: the model's)")
    sglang_max_running_requests: int = Field(0, description="SGLang: max requests decoded at once per replica "
                                                            "(0 = SGLang sizes it from KV-cache memory)")
    sglang_extra_args: str = Field("", description='SGLang: extra ServerArgs as a JSON object, '
                                                   'e.g. {"attention_backend": "fa3"}')

    service_workers: int = Field(1, ge=1, description="gRPC service processes sharing --grpc-port (SO_REUSEPORT), "
                                                      "so per-token Python work is not bound to one GIL; the kernel "
                                                      "spreads connections, not streams. Needs a fixed port. CPU "
                                                      "engines: one engine per worker; sglang: worker 0 builds the "
                                                      "engine, the others attach as its tokenizer workers")
    worker_of: int = Field(0, description="set for a worker process by the process supervising --service-workers or "
                                          "--bridge-workers (its pid): the worker serves instead of supervising")
    sglang_attach_pid: int = Field(0, description="SGLang: attach to the engine held by this process (set for the "
                                                  "serving workers of --service-workers N)")
    sglang_engine_host: bool = Field(False, description="SGLang: only build and hold the engine for the serving "
                                                        "workers of --service-workers N (set by the supervisor)")
    serve_bridge: bool = Field(False, description="genrpc serve: also serve the SSE bridge's app (OpenAI REST and "
                                                  "SSE, DashScope, the playground) on --bridge-port in this process, "
                                                  "calling the servicer directly: no gRPC hop and no second process "
                                                  "per streamed token (its metrics stay on --bridge-metrics-port)")
    bridge_process: bool = Field(False, description="genrpc up: run the SSE bridge as a process of its own (genrpc "
                                                    "bridge, --bridge-workers) calling the service over gRPC, instead "
                                                    "of inside the service (--serve-bridge, the default)")
    bridge_workers: int = Field(1, ge=1, description="SSE bridge processes sharing --bridge-port (SO_REUSEPORT); "
                                                     "the kernel spreads Envoy's connections over them")

    # --- operations ---
    log_level: str = Field("info", description="log level: debug, info, warning, error")
    shutdown_grace_s: float = Field(30.0, description="seconds running streams get to finish on SIGTERM")

    def limits(self):
        """The per-request limits the service enforces (genrpc.service.validation.Limits)."""
        from genrpc.service.validation import Limits

        return Limits(max_messages=self.max_messages, max_stop=self.max_stop, max_n=self.max_n,
                      max_logit_bias=self.max_logit_bias, max_prompt_tokens=self.max_prompt_tokens,
                      max_tokens_limit=self.max_tokens_limit)

    def grpc_address(self) -> str:
        return self.grpc_target or f"{self.host}:{self.grpc_port}"

    def gateway_admission_limit(self) -> int:
        """envoy_max_requests resolved: -1 (auto) is the local service's capacity when Envoy fronts only it, else 0
        (Envoy's ceiling). Exactly the capacity: Envoy stops counting a stream only after the service has freed its
        slot, so it never lets through a request the service would refuse for capacity, and a burst's excess is all
        refused by Envoy (a request that holds no slot while in flight, such as an invalid one being refused, still
        counts there: at full capacity Envoy may refuse for a moment what the service had room for)."""
        if self.envoy_max_requests >= 0:
            return self.envoy_max_requests
        if self.grpc_upstreams.strip():
            return 0
        return self.service_workers * (self.max_batch_size + self.max_queue)

    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.cors_allowed_origins.split(",") if o.strip()]


def add_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """Adds one `--flag` per Settings field (or per field in `names`), with the field's help text."""
    for name, info in Settings.model_fields.items():
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        env = "GENRPC_" + name.upper()
        default = info.get_default(call_default_factory=True)
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS,
                            help=f"{info.description} [env {env}, default {default!s}]")


def from_args(args: argparse.Namespace) -> Settings:
    """Builds Settings from parsed flags (only flags given on the command line override env/defaults)."""
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


# Every listening port of a `genrpc up` stack (tests and benchmarks give each a free one, so stacks never collide).
PORT_SETTINGS: tuple[str, ...] = tuple(name for name in Settings.model_fields if name.endswith("_port"))
