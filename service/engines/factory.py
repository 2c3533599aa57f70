"""The one place that turns the application's Settings into an engine and its own config object.

Engines never see Settings: each takes a small config dataclass of its own. Heavy imports (torch, sglang)
happen only for the engine chosen.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

from genrpc.settings import Settings
from genrpc.telemetry import otlp_traces_endpoint
from genrpc.service.engines.base import Engine
from genrpc.service.engines.gguf_files import bundled_gguf_path
from genrpc.service.engines.llamacpp.engine import LlamaCppEngineConfig
from genrpc.service.engines.reference.config import ReferenceEngineConfig
from genrpc.service.engines.sglang_mapping import SGLangEngineConfig


def reference_config(settings: Settings) -> ReferenceEngineConfig:
    return ReferenceEngineConfig(
        model_id=settings.model_id, cache_dir=settings.cache_dir, model=settings.model,
        context_length=settings.context_length, max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue, torch_threads=settings.torch_threads,
        batch_invariant=settings.reference_batch_invariant)


def sglang_trace_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """SGLang's own tracing, from the same OTEL_* variables as genrpc's: on when genrpc exports over OTLP, to the same
    OTLP/HTTP URL. Its spans carry service.name `<OTEL_SERVICE_NAME>-sglang` (SGLang's default, `sglang`, without
    one), so they never pass for genrpc's own."""
    env = os.environ if environ is None else environ
    endpoint = otlp_traces_endpoint(env)
    if endpoint is None:
        return {}
    name = env.get("OTEL_SERVICE_NAME")
    return {"enable_trace": True, "otlp_traces_endpoint": endpoint,
            "otlp_service_name": f"{name}-sglang" if name else "sglang"}


def sglang_config(settings: Settings, environ: Mapping[str, str] | None = None) -> SGLangEngineConfig:
    """`environ` (default: the process environment) holds the OTEL_* variables (sglang_trace_config)."""
    return SGLangEngineConfig(
        model=settings.model, model_id=settings.model_id, tp_size=settings.tp_size, dp_size=settings.dp_size,
        mem_fraction_static=settings.mem_fraction_static, context_length=settings.context_length,
        chat_template=settings.chat_template, rope_scaling=settings.rope_scaling,
        tool_call_parser=settings.tool_call_parser, log_level=settings.log_level,
        enable_metrics=settings.metrics_port != -1,
        max_running_requests=settings.sglang_max_running_requests, max_queued_requests=settings.max_queue,
        extra_args=settings.sglang_extra_args, tokenizer_worker_num=settings.service_workers,
        attach_to_pid=settings.sglang_attach_pid, **sglang_trace_config(environ))


def llamacpp_config(settings: Settings) -> LlamaCppEngineConfig:
    return LlamaCppEngineConfig(
        gguf_path=pathlib.Path(settings.model).expanduser() if settings.model else bundled_gguf_path(),
        cache_dir=pathlib.Path(settings.cache_dir).expanduser(), model_id=settings.model_id,
        context_length=settings.context_length, slots=settings.max_batch_size, max_queue=settings.max_queue,
        threads=settings.llamacpp_threads, nice=settings.llamacpp_nice)


def build_engine(settings: Settings) -> Engine:
    """The engine named by settings.engine."""
    if settings.engine == "reference":
        from genrpc.service.engines.reference.engine import ReferenceEngine

        return ReferenceEngine(reference_config(settings))
    if settings.engine == "sglang":
        from genrpc.service.engines.sglang_engine import SGLangEngine

        return SGLangEngine(sglang_config(settings))
    if settings.engine == "synthetic":  # measuring the front path only (benchmarks/bench_front.py)
        from genrpc.service.engines.synthetic import SyntheticEngine, SyntheticEngineConfig

        return SyntheticEngine(SyntheticEngineConfig(
            model_id=settings.model_id, tokens_per_s=settings.synthetic_tokens_per_s, max_queue=settings.max_queue,
            context_length=settings.context_length))
    if settings.engine == "llamacpp":
        from genrpc.service.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(llamacpp_config(settings))
    raise ValueError(f"unknown engine {settings.engine!r}")
