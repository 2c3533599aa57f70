"""Pure mapping between genrpc's engine domain types and SGLang 0.5.23's in-process API (no sglang import).

Everything here was written against SGLang 0.5.23's source:

- ``python/sglang/srt/sampling/sampling_params.py``: ``SamplingParams`` (field names, defaults, ``verify()``).
  ``max_new_tokens`` defaults to 128, so it is always set; ``sampling_seed`` is the per-request seed;
  ``logit_bias`` keys are token-id *strings*; ``json_schema`` is a JSON *string*; ``top_k`` must be >= 1
  (or -1 for "whole vocabulary"); a temperature below 1e-6 means greedy (SGLang turns it into top_k=1).
- ``python/sglang/srt/managers/tokenizer_manager.py`` (``_handle_batch_output``, ``_stream_one_response``,
  ``_handle_abort_req``): stream items are ``{"text", "output_ids", "meta_info"}``; with the default
  ``incremental_streaming_output=False`` both ``text`` and ``output_ids`` are *cumulative*; ``meta_info``
  carries ``id``, ``finish_reason`` (None until the last item), ``prompt_tokens``, ``completion_tokens``,
  ``cached_tokens``; an abort item built by ``_handle_abort_req`` has no ``prompt_tokens``/``cached_tokens``.
- ``meta_info["queue_time"]`` (tokenizer_manager.py ``_handle_batch_output``: with ``enable_metrics`` every item's
  meta_info is updated with observability/req_time_stats.py ``SchedulerReqTimeStats.convert_to_output_meta_info``):
  seconds the request spent in the scheduler's waiting queue before its first forward (``queue_duration_s``, added
  up in ``set_forward_entry_time``); absent without SGLang's metrics.
- Tracing (``external_trace_header``, ``enable_trace`` ...): see "Tracing" below.
- ``python/sglang/srt/managers/schedule_batch.py`` (``FINISH_*.to_json``): finish reasons are
  ``{"type": "stop", "matched": int|str}``, ``{"type": "length", "length": N}`` or
  ``{"type": "abort", "message", "status_code", "err_type"}`` (status_code may be None or missing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from genrpc.service.engines.base import (EngineBadRequest, EngineError, EngineInternalError, EngineOverloaded,
                                         EngineUnavailable, EngineUnsupported, FinishReason, GenerationDelta,
                                         SamplingParams, TokenLogprob)

# --------------------------------------------------------------------------------------------------------------
# Errors: SGLang's abort status codes (HTTP) -> genrpc's typed engine errors (engines/base.py), here and only here.
# --------------------------------------------------------------------------------------------------------------

# scheduler.py `_abort_on_queued_limit` (SGLang 0.5.23) reports a full queue as 503 with this message.
QUEUE_FULL_MESSAGE = "The request queue is full."
# The OpenAI field blamed when SGLang refuses a request without saying which part (e.g. a too-long input).
REQUEST_FIELD = "messages"


def abort_error(finish_reason: Mapping[str, Any]) -> EngineError:
    """The engine error for an ``{"type": "abort", ...}`` finish reason (read with .get(): keys may be missing)."""
    message = str(finish_reason.get("message") or "Aborted")
    status = finish_reason.get("status_code")
    if status is None:
        # A plain FINISH_ABORT(): abort_request/abort_all (e.g. the engine is shutting down), or aborted while
        # waiting. The client did not cause it and may retry elsewhere.
        return EngineUnavailable(message)
    status = int(status)
    if status == HTTPStatus.TOO_MANY_REQUESTS or (
            status == HTTPStatus.SERVICE_UNAVAILABLE and message == QUEUE_FULL_MESSAGE):
        return EngineOverloaded(message)
    if status in (HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.GATEWAY_TIMEOUT):
        return EngineUnavailable(message)
    if 400 <= status < 500:
        return EngineBadRequest(message, field=REQUEST_FIELD)
    return EngineInternalError(message)


def map_finish_reason(finish_reason: Mapping[str, Any] | None) -> FinishReason | None:
    """SGLang's finish_reason dict -> FinishReason; None while running; raises for aborts."""
    if finish_reason is None:
        return None
    kind = finish_reason.get("type")
    if kind == "stop":
        return FinishReason.STOP
    if kind == "length":
        return FinishReason.LENGTH
    if kind == "abort":
        raise abort_error(finish_reason)
    raise EngineInternalError(f"unknown SGLang finish_reason {dict(finish_reason)!r}")


# --------------------------------------------------------------------------------------------------------------
# Sampling parameters
# --------------------------------------------------------------------------------------------------------------

def _logit_bias(value: Mapping[Any, float]) -> dict[str, float] | None:
    return {str(int(token_id)): float(bias) for token_id, bias in value.items()} or None


def _grammar(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _positive_int(value: int) -> int | None:
    return int(value) if int(value) >= 1 else None  # genrpc: 0 = off; SGLang rejects top_k=0


def _unless(default: Any, convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Leaves a parameter out when it has genrpc's "off" value (SGLang's default is the same)."""
    return lambda value: None if value == default else convert(value)


@dataclass(frozen=True)
class OptionalParam:
    """A genrpc SamplingParams attribute that maps onto one SGLang key; `convert` returns None to omit it."""

    genrpc_name: str
    sglang_name: str
    convert: Callable[[Any], Any]


# SGLang 0.5.23 names and defaults: sampling/sampling_params.py `SamplingParams`.
OPTIONAL_PARAMS: tuple[OptionalParam, ...] = (
    OptionalParam("top_k", "top_k", _positive_int),
    OptionalParam("min_p", "min_p", _unless(0.0, float)),
    OptionalParam("frequency_penalty", "frequency_penalty", _unless(0.0, float)),
    OptionalParam("presence_penalty", "presence_penalty", _unless(0.0, float)),
    OptionalParam("repetition_penalty", "repetition_penalty", _unless(1.0, float)),
    OptionalParam("min_tokens", "min_new_tokens", _unless(0, int)),
    OptionalParam("ignore_eos", "ignore_eos", _unless(False, bool)),
    OptionalParam("logit_bias", "logit_bias", _logit_bias),  # keys: token-id strings
    OptionalParam("json_schema", "json_schema", _grammar),  # a JSON string
    OptionalParam("ebnf", "ebnf", _grammar),
)

# genrpc parameters SGLang 0.5.23 has no equivalent for: refused when set to anything but their "off" value.
UNSUPPORTED_PARAMS: dict[str, Any] = {"top_a": 0.0}


def to_sglang_sampling_params(params: SamplingParams) -> dict[str, Any]:
    """The ``sampling_params`` dict for ``sglang.Engine.async_generate``.

    ``max_new_tokens`` is always set (SGLang's default is 128); ``seed`` -> ``sampling_seed``. Stop *strings*
    are not passed: the service applies them itself (same behaviour on every engine); the engine only sees
    stop token ids. Parameters at their "off" value are left out. Raises EngineUnsupported.
    """
    for name, off in UNSUPPORTED_PARAMS.items():
        if getattr(params, name) != off:
            raise EngineUnsupported(f"'{name}' is not supported by the SGLang engine.", field=name)
    out: dict[str, Any] = {
        "max_new_tokens": int(params.max_tokens),
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
    }
    if params.seed is not None:
        out["sampling_seed"] = int(params.seed)
    if params.stop_token_ids:
        out["stop_token_ids"] = sorted({int(t) for t in params.stop_token_ids})
    for opt in OPTIONAL_PARAMS:
        value = getattr(params, opt.genrpc_name)
        if value is None:
            continue
        converted = opt.convert(value)
        if converted is not None:
            out[opt.sglang_name] = converted
    return out


def generate_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Extra ``async_generate`` arguments (besides sampling_params): logprobs.

    SGLang 0.5.23 (managers/io_struct.py GenerateReqInput): ``return_logprob`` and ``top_logprobs_num``;
    ``logprob_start_len`` defaults to -1 (no prompt logprobs).
    """
    k = params.logprobs
    if k is None:
        return {}
    return {"return_logprob": True, "top_logprobs_num": int(k)}


# --------------------------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------------------------
#
# SGLang 0.5.23 traces requests itself with OpenTelemetry (python/sglang/srt/observability/trace.py):
#
# - ServerArgs (arg_groups/fields/observability.py): ``enable_trace`` (off by default), ``otlp_traces_endpoint``
#   (default "localhost:4317"), ``otlp_service_name`` (None: OTEL_SERVICE_NAME, else "sglang"), ``trace_modules``
#   (default "request"). With ``enable_trace`` every SGLang process (entrypoints/engine.py for the TokenizerManager
#   in this process, scheduler.py, data_parallel_controller.py, multi_tokenizer_mixin.py for attached tokenizer
#   workers) calls ``process_tracing_init(otlp_traces_endpoint, otlp_service_name)``, which builds a BatchSpanProcessor
#   over ``get_otlp_span_exporter(endpoint)``: the OTLP/gRPC exporter unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL is
#   "http/protobuf", then the OTLP/HTTP exporter with ``endpoint`` as the full URL. trace.py imports both exporters
#   in one ``try``: without ``opentelemetry-exporter-otlp-proto-grpc`` (sglang's ``tracing`` extra) it reports
#   opentelemetry as missing and ``process_tracing_init`` raises, so genrpc's ``sglang`` extra installs it.
# - Per request: ``Engine.async_generate(external_trace_header=...)`` -> ``GenerateReqInput.external_trace_header``;
#   tokenizer_manager.py ``_init_req_state`` hands it (only when ``enable_trace``) to
#   req_time_stats.py ``init_trace_ctx`` -> ``TraceReqContext(rid, external_trace_header=...)``, whose
#   ``trace_req_start`` extracts it with the W3C TraceContextTextMapPropagator (the keys of ``TRACE_HEADERS``:
#   traceparent, tracestate) as the parent of the request's root span "Req <rid[:8]>" (tokenize, dispatch,
#   scheduler queue/prefill/decode slices below it).

# The headers SGLang's TraceReqContext extracts (trace.py TRACE_HEADERS).
TRACE_HEADERS = ("traceparent", "tracestate")


def trace_kwargs(trace_context: Mapping[str, str]) -> dict[str, Any]:
    """Extra ``async_generate`` arguments for a request's W3C trace context: ``external_trace_header`` when there is
    a traceparent (SGLang ignores it unless started with ``enable_trace``); nothing otherwise."""
    header = {k: str(trace_context[k]) for k in TRACE_HEADERS if trace_context.get(k)}
    return {"external_trace_header": header} if "traceparent" in header else {}


def engine_environ(config: SGLangEngineConfig) -> dict[str, str]:
    """Environment SGLang's processes must see before ``sglang.Engine`` starts them (they inherit it): with tracing,
    OTLP/HTTP, the protocol of genrpc's own exporter, so ``otlp_traces_endpoint`` is the same URL."""
    return {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"} if config.enable_trace else {}


# --------------------------------------------------------------------------------------------------------------
# Images (vision models)
# --------------------------------------------------------------------------------------------------------------
#
# What SGLang 0.5.23 does with ``async_generate(input_ids=[...], image_data=[...])`` (python/sglang/srt/...):
#
# - managers/io_struct.py ``GenerateReqInput``: ``image_data`` is an image, a list of images (for a *single*
#   request -- a flat ``input_ids`` list makes ``is_single`` -- a list is that request's images, left as is by
#   ``_normalize_single_inputs``), or a list of lists for a batch. An image may be a URL, a data URI or base64
#   (``ImageDataInputItem = Union[str, bytes, dict, ImageData, Image]``).
# - managers/tokenizer_manager.py ``_tokenize_one_request``: with ``input_ids`` given and ``contains_mm_input()``,
#   the model's ``mm_processor`` (None unless ``model_config.is_multimodal``, see ``init_tokenizer_and_processor``)
#   gets ``input_text=input_ids`` (``prefer_tokenized_input`` processors and all others alike when no text is
#   set) and its ``input_ids`` replace the request's.
# - multimodal/processors/base_processor.py ``load_mm_data``: a ``list[int]`` prompt is decoded with the model's
#   tokenizer (special tokens kept), its image placeholders (qwen_vl.py: ``<|vision_start|><|image_pad|>
#   <|vision_end|>``, which is what the HF chat template renders for ``{"type": "image"}``) are counted against
#   ``len(image_data)`` and matched in order; with ``SGLANG_MM_AVOID_RETOKENIZE`` (default True, environ.py)
#   ``_expand_input_ids`` keeps the caller's exact ids and only expands each placeholder to the image's token
#   count. So token ids with one placeholder per image work; no text prompt is needed. (SGLang's own OpenAI
#   server, entrypoints/openai/serving_chat.py ``_engine_prompt``, sends the rendered *text* for media requests;
#   the processor turns ids into that same text first, so both arrive at the same prompt.)
# - utils/common.py ``load_image``: http(s) URLs are downloaded (``REQUEST_TIMEOUT``, default 3 s), ``data:``
#   URIs decoded; it would also read ``file://`` URLs and local paths, which is why genrpc's validation only lets
#   http(s) URLs and ``data:image/...;base64,`` URIs through.
# - A bad or unreachable image surfaces as a ValueError / abort from SGLang (mapped like any request error).

def image_kwargs(images: Sequence[str]) -> dict[str, Any]:
    """Extra ``async_generate`` arguments for a request's images: ``image_data`` as the one request's list, in
    the order of the placeholders in its ``input_ids``; nothing for a text-only request."""
    if not images:
        return {}
    return {"image_data": [str(image) for image in images]}


def config_has_vision(model_path: str) -> bool:
    """Whether ``<model_path>/config.json`` describes a vision-language model (a ``vision_config`` section, as
    Qwen2-VL/2.5-VL, LLaVA, Gemma 3 ... have). Read cheaply, without transformers; False when unreadable.
    SGLang's own verdict (``tokenizer_manager.mm_processor``) takes precedence once the engine runs."""
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


# --------------------------------------------------------------------------------------------------------------
# Stream normalisation
# --------------------------------------------------------------------------------------------------------------

class StreamNormalizer:
    """Turns SGLang's stream items into GenerationDelta objects.

    genrpc starts SGLang with ``incremental_streaming_output=True``: each item is a disjoint segment (text,
    ids and the per-token logprob lists sliced to the segment; several queued segments arrive concatenated
    as one item). Cumulative items (SGLang's default) are handled too. ``feed(item)`` returns a delta, or None
    when the item added nothing (in cumulative mode SGLang may repeat an item when several outputs were
    drained at once); it raises an engine error for an abort (in incremental mode the abort item built
    by ``_handle_abort_req`` carries the cumulative text, which is why it must never be read as a segment).
    """

    def __init__(self, *, incremental: bool = False, prompt_tokens: int = 0):
        self.incremental = incremental
        self._text_len = 0
        self._ids_len = 0
        self.completion_tokens = 0
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.finished = False
        self._logprobs_len = 0
        self._queue_time_reported = False

    def feed(self, item: Mapping[str, Any]) -> GenerationDelta | None:
        meta: Mapping[str, Any] = item.get("meta_info") or {}
        finish = map_finish_reason(meta.get("finish_reason"))  # raises on abort
        text = item.get("text") or ""
        ids = list(item.get("output_ids") or ())
        if self.incremental:
            new_text, new_ids = text, ids
            self._text_len += len(text)
            self._ids_len += len(ids)
        else:
            new_text = text[self._text_len:]
            new_ids = ids[self._ids_len:]
            self._text_len = max(self._text_len, len(text))
            self._ids_len = max(self._ids_len, len(ids))
        completion = meta.get("completion_tokens")
        self.completion_tokens = max(self.completion_tokens,
                                     int(completion) if completion is not None else self._ids_len)
        if meta.get("prompt_tokens") is not None:
            self.prompt_tokens = int(meta["prompt_tokens"])
        if meta.get("cached_tokens") is not None:
            self.cached_tokens = int(meta["cached_tokens"])
        logprobs = self._new_logprobs(meta)
        if not new_text and not new_ids and finish is None:
            return None
        self.finished = finish is not None
        queue_time_s = None
        if not self._queue_time_reported:  # on the first delta only (module docstring: meta_info["queue_time"])
            self._queue_time_reported = True
            queue_time = meta.get("queue_time")
            if isinstance(queue_time, (int, float)) and queue_time >= 0:
                queue_time_s = float(queue_time)
        return GenerationDelta(text=new_text, token_ids=tuple(int(t) for t in new_ids),
                               completion_tokens=self.completion_tokens, prompt_tokens=self.prompt_tokens,
                               finish_reason=finish, cached_prompt_tokens=self.cached_tokens, logprobs=logprobs,
                               queue_time_s=queue_time_s)

    def _new_logprobs(self, meta: Mapping[str, Any]) -> tuple[TokenLogprob, ...]:
        """meta_info["output_token_logprobs"]: [(logprob, token_id, text|None), ...] and
        meta_info["output_top_logprobs"]: [[(logprob, token_id, text|None), ...] | None, ...], one entry per
        output token, cumulative unless incremental (tokenizer_manager.py add_logprob_to_meta_info, 0.5.23)."""
        sampled = meta.get("output_token_logprobs")
        if not sampled:
            return ()
        top = meta.get("output_top_logprobs") or []
        start = 0 if self.incremental else self._logprobs_len
        out = []
        for i in range(start, len(sampled)):
            logprob, token_id = sampled[i][0], sampled[i][1]
            alternatives = top[i] if i < len(top) and top[i] else ()
            out.append(TokenLogprob(token_id=int(token_id), logprob=float(logprob),
                                    top=tuple((int(t[1]), float(t[0])) for t in alternatives)))
        self._logprobs_len = len(sampled) if not self.incremental else self._logprobs_len + len(sampled)
        return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# Engine (server) arguments
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SGLangEngineConfig:
    """What the SGLang adapter needs (built from Settings by engines.factory)."""

    model: str  # HF model directory
    model_id: str  # served model name
    tp_size: int = 1
    dp_size: int = 1
    mem_fraction_static: float = 0.85
    context_length: int = 0  # 0 = the model's own
    chat_template: str = ""
    rope_scaling: str = ""  # a JSON object, e.g. YaRN
    tool_call_parser: str = ""
    log_level: str = "info"
    enable_metrics: bool = True  # SGLang's Prometheus metrics (see SGLangEngine.prometheus_collectors)
    max_running_requests: int = 0  # 0 = SGLang sizes it from KV-cache memory
    max_queued_requests: int = 0  # 0 = unbounded
    extra_args: str = ""  # extra ServerArgs as a JSON object
    # Per-request Python work over several processes for one engine: the process that builds the engine runs it with
    # `tokenizer_worker_num` tokenizer workers; the others attach to it (`Engine.attach_tokenizer_worker`) and each
    # serves gRPC on the same port. attach_to_pid > 0: attach to that process's engine instead of building one.
    tokenizer_worker_num: int = 1
    attach_to_pid: int = 0
    # SGLang's own request tracing (see "Tracing"): on when genrpc's is (OTEL_TRACES_EXPORTER=otlp), exporting over
    # OTLP/HTTP to the same URL as genrpc's spans; requests carry their traceparent, so SGLang's spans are children
    # of the service's.
    enable_trace: bool = False
    otlp_traces_endpoint: str = ""  # a full OTLP/HTTP URL, e.g. http://collector:4318/v1/traces
    otlp_service_name: str = ""  # "" = SGLang's default (OTEL_SERVICE_NAME, else "sglang")


def engine_kwargs(config: SGLangEngineConfig) -> dict[str, Any]:
    """``sglang.Engine(**kwargs)`` (names are SGLang 0.5.23 ServerArgs fields,
    ``python/sglang/srt/arg_groups/fields/*.py``)."""
    kwargs: dict[str, Any] = {
        "model_path": config.model,
        "served_model_name": config.model_id,
        "tp_size": config.tp_size,
        "dp_size": config.dp_size,
        "mem_fraction_static": config.mem_fraction_static,
        "tool_call_parser": config.tool_call_parser or None,
        "log_level": config.log_level,
        # Token ids in, text + ids out: the service tokenizes (chat template, counting) itself.
        "skip_tokenizer_init": False,
        "enable_metrics": config.enable_metrics,
        # Streamed items are disjoint segments, not cumulative text/ids (O(n) per request, not O(n^2)); queued
        # segments are concatenated by TokenizerManager._coalesce_streaming_chunks (0.5.23). StreamNormalizer
        # reads whichever mode the engine's server_args report.
        "incremental_streaming_output": True,
    }
    if config.tokenizer_worker_num > 1:
        kwargs["tokenizer_worker_num"] = config.tokenizer_worker_num
    if config.context_length:
        kwargs["context_length"] = config.context_length
    if config.chat_template:
        kwargs["chat_template"] = config.chat_template
    if config.rope_scaling:
        rope = json.loads(config.rope_scaling)
        if not isinstance(rope, dict):
            raise ValueError("rope_scaling must be a JSON object, e.g. "
                             '{"type":"yarn","factor":4.0,"original_max_position_embeddings":32768}')
        kwargs["json_model_override_args"] = json.dumps({"rope_scaling": rope})
    if config.max_running_requests > 0:
        kwargs["max_running_requests"] = config.max_running_requests
    if config.max_queued_requests > 0:
        kwargs["max_queued_requests"] = config.max_queued_requests
    if config.enable_trace:  # with engine_environ(config) in the environment (OTLP/HTTP)
        kwargs["enable_trace"] = True
        kwargs["otlp_traces_endpoint"] = config.otlp_traces_endpoint
        if config.otlp_service_name:
            kwargs["otlp_service_name"] = config.otlp_service_name
    if config.extra_args:
        parsed = json.loads(config.extra_args)
        if not isinstance(parsed, dict):
            raise ValueError("sglang_extra_args must be a JSON object of SGLang ServerArgs")
        kwargs.update(parsed)
    return kwargs
