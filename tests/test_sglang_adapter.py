"""The SGLang adapter against SGLang 0.5.23's real data shapes (no GPU needed), plus GPU tests that skip here.

Every fixture below is a dict in the exact shape SGLang 0.5.23 produces; each cites where it comes from
(paths are inside the sglang 0.5.23 wheel / the sgl-project/sglang repo under python/).

SGLang's own checks run on what the adapter produces: `SamplingParams(...).normalize()/.verify()` on the sampling
params and `ServerArgs(**kwargs)` on the engine kwargs. sglang is not in genrpc's venv (its dependency tree is the
GPU stack), so `make test` builds a throwaway venv for them, `.venv-sglang-check` (Makefile target
`sglang-check`: `pip install --no-deps -r tests/sglang-check-requirements.txt` plus a .pth to genrpc's venv), and
these tests run tests/_sglang_check.py there in a subprocess. They fail (never skip) when that venv is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import types
import uuid
from typing import Any

import grpc
import pytest

from _otlp_receiver import OTLPReceiver
from genrpc.settings import Settings
from genrpc.service.engines.base import (Engine, EngineBadRequest, EngineInternalError, EngineOverloaded,
                                         EngineUnavailable, EngineUnsupported, FinishReason, GenerationRequest,
                                         SamplingParams)
from genrpc.service.engines.factory import sglang_config, sglang_trace_config
from genrpc.service.engines.sglang_engine import SGLangEngine, sglang_metrics_collector
from genrpc.service.engines.sglang_mapping import (
    SGLangEngineConfig,
    StreamNormalizer,
    abort_error,
    config_has_vision,
    engine_kwargs,
    engine_environ,
    generate_kwargs,
    image_kwargs,
    map_finish_reason,
    to_sglang_sampling_params,
    trace_kwargs,
)

QWEN_EOS = 151645  # <|im_end|>
QWEN_VOCAB = 151936


def _meta(rid: str, *, finish: Any, completion: int, prompt: int = 5, cached: int = 0) -> dict[str, Any]:
    # managers/tokenizer_manager.py `_handle_batch_output` (sglang 0.5.23): the meta_info of a BatchStrOutput
    # item: id, finish_reason, prompt_tokens, weight_version, num_retractions, then reasoning_tokens,
    # completion_tokens, cached_tokens (and e2e_latency once finished).
    meta = {"id": rid, "finish_reason": finish, "prompt_tokens": prompt, "weight_version": "default",
            "num_retractions": 0, "reasoning_tokens": 0, "completion_tokens": completion, "cached_tokens": cached}
    if finish is not None:
        meta["e2e_latency"] = 0.42
    return meta


def cumulative_stream(rid: str) -> list[dict[str, Any]]:
    """A streamed request, `incremental_streaming_output=False` (the default): `text` and `output_ids` are
    cumulative. managers/tokenizer_manager.py `_handle_batch_output` + `_stream_one_response` (0.5.23).
    Item 3 holds back a partial UTF-8 character (detokenizer_manager emits "" until it is complete), item 4 is a
    repeat (several outputs drained at once; `_stream_one_response` yields `out_list[-1]`), and the last item
    finishes on EOS: schedule_batch.py FINISH_MATCHED_TOKEN.to_json -> {"type": "stop", "matched": id}."""
    return [
        {"text": "Hel", "output_ids": [9707], "meta_info": _meta(rid, finish=None, completion=1, cached=3)},
        {"text": "Hello,", "output_ids": [9707, 11], "meta_info": _meta(rid, finish=None, completion=2, cached=3)},
        {"text": "Hello,", "output_ids": [9707, 11, 28740],
         "meta_info": _meta(rid, finish=None, completion=3, cached=3)},
        {"text": "Hello,", "output_ids": [9707, 11, 28740],
         "meta_info": _meta(rid, finish=None, completion=3, cached=3)},
        {"text": "Hello, 世", "output_ids": [9707, 11, 28740, 238],
         "meta_info": _meta(rid, finish=None, completion=4, cached=3)},
        {"text": "Hello, 世!", "output_ids": [9707, 11, 28740, 238, 0, QWEN_EOS],
         "meta_info": _meta(rid, finish={"type": "stop", "matched": QWEN_EOS}, completion=6, cached=3)},
    ]


def length_stream(rid: str) -> list[dict[str, Any]]:
    """max_new_tokens reached: schedule_batch.py FINISH_LENGTH.to_json -> {"type": "length", "length": N}."""
    return [
        {"text": "A", "output_ids": [32], "meta_info": _meta(rid, finish=None, completion=1)},
        {"text": "AB", "output_ids": [32, 33],
         "meta_info": _meta(rid, finish={"type": "length", "length": 2}, completion=2)},
    ]


def incremental_stream(rid: str) -> list[dict[str, Any]]:
    """`incremental_streaming_output=True`: each item is a disjoint segment (tokenizer_manager.py, 0.5.23)."""
    return [
        {"text": "Hi", "output_ids": [13048], "meta_info": _meta(rid, finish=None, completion=1)},
        {"text": " there", "output_ids": [1052],
         "meta_info": _meta(rid, finish={"type": "length", "length": 2}, completion=2)},
    ]


def logprob_stream(rid: str) -> list[dict[str, Any]]:
    """return_logprob=True, top_logprobs_num=2: tokenizer_manager.py `add_logprob_to_meta_info` (0.5.23) adds
    cumulative meta_info["output_token_logprobs"] = [(logprob, token_id, None), ...] (text only with
    return_text_in_logprobs) and meta_info["output_top_logprobs"] = [[(logprob, token_id, None), ...], ...]."""
    first = _meta(rid, finish=None, completion=1)
    first.update(input_token_logprobs=[], output_token_logprobs=[(-0.1, 9707, None)],
                 output_token_logprobs_length=1, input_top_logprobs=[],
                 output_top_logprobs=[[(-0.1, 9707, None), (-2.5, 13048, None)]])
    last = _meta(rid, finish={"type": "length", "length": 2}, completion=2)
    last.update(input_token_logprobs=[], output_token_logprobs=[(-0.1, 9707, None), (-0.7, 11, None)],
                output_token_logprobs_length=2, input_top_logprobs=[],
                output_top_logprobs=[[(-0.1, 9707, None), (-2.5, 13048, None)],
                                     [(-0.7, 11, None), (-0.9, 0, None)]])
    return [{"text": "Hello", "output_ids": [9707], "meta_info": first},
            {"text": "Hello,", "output_ids": [9707, 11], "meta_info": last}]


def queue_full_abort(rid: str) -> dict[str, Any]:
    """A request rejected because the waiting queue is full. scheduler.py `_abort_on_queued_limit` sends
    finished_reason {"type": "abort", "status_code": 503, "message": "The request queue is full."};
    tokenizer_manager.py `_handle_abort_req` builds this item: no prompt_tokens / cached_tokens (0.5.23)."""
    return {"text": "", "output_ids": [],
            "meta_info": {"id": rid, "finish_reason": {"type": "abort", "status_code": 503,
                                                       "message": "The request queue is full."},
                          "weight_version": "default", "e2e_latency": 0.01, "completion_tokens": 0}}


def bad_request_abort(rid: str) -> dict[str, Any]:
    """A request the scheduler refuses (e.g. scheduler.py `prepare_abort(..., status_code=BAD_REQUEST)`):
    schedule_batch.py FINISH_ABORT.to_json -> {"type", "message", "status_code", "err_type"} (0.5.23)."""
    return {"text": "", "output_ids": [],
            "meta_info": _meta(rid, finish={"type": "abort", "message": "Input length exceeds max_req_len",
                                            "status_code": 400, "err_type": None}, completion=0)}


def plain_abort(rid: str) -> dict[str, Any]:
    """scheduler.py `abort_request` on a running request (no abort_message): FINISH_ABORT() ->
    {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None} (0.5.23)."""
    return {"text": "Hel", "output_ids": [9707],
            "meta_info": _meta(rid, finish={"type": "abort", "message": "Aborted", "status_code": None,
                                            "err_type": None}, completion=1)}


def _scheduler_time_stats(queue_time: float) -> dict[str, Any]:
    """What `enable_metrics` adds to every item's meta_info: tokenizer_manager.py `_handle_batch_output` updates it
    with observability/req_time_stats.py `SchedulerReqTimeStats.convert_to_output_meta_info()` (0.5.23): the storage
    waits, wall-clock forward_entry_time / prefill_finished_time once set, and "queue_time" = queue_duration_s, the
    seconds spent in the waiting queue before the first forward (added up in `set_forward_entry_time`)."""
    return {"storage_prefetch_wait": 0.0, "storage_staging_wait": 0.0, "forward_entry_time": 1795000000.25,
            "prefill_finished_time": 1795000000.31, "queue_time": queue_time}


def metrics_stream(rid: str) -> list[dict[str, Any]]:
    """`incremental_streaming_output=True` with SGLang's metrics on (genrpc's default): every item carries the
    scheduler's time stats; the last also the TokenizerManager's (`APIServerReqTimeStats.convert_to_output_meta_info`:
    request_received_ts, first_token_latency, request_finished_ts, decode_throughput) and e2e_latency."""
    first = {**_meta(rid, finish=None, completion=1), **_scheduler_time_stats(0.125)}
    last = {**_meta(rid, finish={"type": "length", "length": 2}, completion=2), **_scheduler_time_stats(0.125),
            "request_received_ts": 1795000000.1, "first_token_latency": 0.21, "request_finished_ts": 1795000000.4,
            "decode_throughput": 90.0}
    return [{"text": "Hi", "output_ids": [13048], "meta_info": first},
            {"text": " there", "output_ids": [1052], "meta_info": last}]


# ------------------------------------------------------------------------------------------------------------
# sampling params
# ------------------------------------------------------------------------------------------------------------

def test_sampling_params_minimal_always_sets_max_new_tokens():
    out = to_sglang_sampling_params(SamplingParams(max_tokens=7))
    assert out == {"max_new_tokens": 7, "temperature": 1.0, "top_p": 1.0}


def test_sampling_params_seed_and_stop_token_ids():
    out = to_sglang_sampling_params(SamplingParams(max_tokens=3, temperature=0.0, top_p=0.9, seed=42,
                                                   stop_token_ids=(151643, 151645, 151643)))
    assert out == {"max_new_tokens": 3, "temperature": 0.0, "top_p": 0.9, "sampling_seed": 42,
                   "stop_token_ids": [151643, 151645]}
    assert "seed" not in out


def test_sampling_params_extension_fields():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = to_sglang_sampling_params(SamplingParams(
        max_tokens=16, top_k=20, min_p=0.05, frequency_penalty=0.5, presence_penalty=-0.5,
        repetition_penalty=1.1, min_tokens=2, ignore_eos=True, logit_bias={QWEN_EOS: -100.0, 9707: 2},
        json_schema=json.dumps(schema)))
    assert out["top_k"] == 20 and out["min_p"] == 0.05
    assert out["frequency_penalty"] == 0.5 and out["presence_penalty"] == -0.5 and out["repetition_penalty"] == 1.1
    assert out["min_new_tokens"] == 2 and out["ignore_eos"] is True
    assert out["logit_bias"] == {str(QWEN_EOS): -100.0, "9707": 2.0}  # token-id *string* keys
    assert isinstance(out["json_schema"], str) and json.loads(out["json_schema"]) == schema
    # genrpc's "off" values are left out (SGLang rejects top_k=0)
    off = to_sglang_sampling_params(SamplingParams(max_tokens=1, top_k=0, logit_bias={}))
    assert off == {"max_new_tokens": 1, "temperature": 1.0, "top_p": 1.0}
    assert to_sglang_sampling_params(SamplingParams(max_tokens=1, ebnf='root ::= "yes" | "no"'))["ebnf"] == \
        'root ::= "yes" | "no"'


def test_unsupported_parameters_are_refused():
    with pytest.raises(EngineUnsupported) as info:
        to_sglang_sampling_params(SamplingParams(max_tokens=1, top_a=0.2))
    assert info.value.field == "top_a"


def test_logprobs_request_kwargs():
    assert generate_kwargs(SamplingParams(max_tokens=1)) == {}
    assert generate_kwargs(SamplingParams(max_tokens=1, logprobs=0)) == {"return_logprob": True,
                                                                         "top_logprobs_num": 0}
    assert generate_kwargs(SamplingParams(max_tokens=1, logprobs=3))["top_logprobs_num"] == 3


ROOT = pathlib.Path(__file__).resolve().parent.parent
SGLANG_CHECK_PYTHON = ROOT / ".venv-sglang-check" / "bin" / "python"

VERIFY_CASES = {
    "minimal": SamplingParams(max_tokens=1),
    "greedy-seeded": SamplingParams(max_tokens=256, temperature=0.0, top_p=1.0, seed=0, stop_token_ids=(QWEN_EOS,)),
    "nucleus": SamplingParams(max_tokens=32, temperature=0.7, top_p=0.8, seed=2**63 - 1),
    "extended": SamplingParams(max_tokens=16, top_k=20, min_p=0.05, frequency_penalty=2.0, presence_penalty=-2.0,
                               repetition_penalty=1.05, min_tokens=2, ignore_eos=False,
                               logit_bias={QWEN_EOS: -100.0}, json_schema='{"type": "object"}'),
}
# what genrpc's validation must never let through: proves SGLang's check can fail
MUST_FAIL_CASES = {
    "top-p-zero": (SamplingParams(max_tokens=1, top_p=0.0), 10),
    "logit-bias-out-of-vocab": (SamplingParams(max_tokens=1, logit_bias={QWEN_VOCAB: 1.0}), QWEN_VOCAB),
}


def _yarn_config() -> SGLangEngineConfig:
    return sglang_config(Settings(engine="sglang", model="/models/Qwen2.5-7B-Instruct", model_id="qwen2.5-7b-instruct",
                                  context_length=131072, sglang_max_running_requests=128,
                                  rope_scaling=json.dumps({"type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 32768})))


def _workers_config(attach_to_pid: int = 0) -> SGLangEngineConfig:
    return sglang_config(Settings(engine="sglang", model="/models/Qwen2.5-7B-Instruct", service_workers=4,
                                  sglang_attach_pid=attach_to_pid))


# A client's trace context as it reaches the SGLang adapter (GenerationRequest.trace_context: the service's span).
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SERVICE_SPAN_ID = "00f067aa0ba902b7"
TRACE_CONTEXT = {"traceparent": f"00-{CLIENT_TRACE_ID}-{SERVICE_SPAN_ID}-01", "tracestate": "client=1"}
TRACED_RID = "5d41402abc4b2a76b9719d911017c592"


def _traced_config(otlp_endpoint: str) -> SGLangEngineConfig:
    """The config the factory builds with genrpc's tracing on (OTLP/HTTP to `otlp_endpoint`)."""
    return sglang_config(Settings(engine="sglang", model="/models/Qwen2.5-7B-Instruct"),
                         environ={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
                                  "OTEL_SERVICE_NAME": "genrpc-service"})


@pytest.fixture(scope="module")
def otlp_receiver():
    receiver = OTLPReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def sglang_checked(otlp_receiver) -> dict[str, Any]:
    """SGLang's own verdicts on every case above, from one run of tests/_sglang_check.py in .venv-sglang-check."""
    if not SGLANG_CHECK_PYTHON.exists():
        pytest.fail(f"{SGLANG_CHECK_PYTHON.relative_to(ROOT)} is missing: `make test` builds it "
                    "(or `make sglang-check`)")
    traced = _traced_config(otlp_receiver.endpoint)
    cases = {"sampling": {**{k: {"params": to_sglang_sampling_params(p), "vocab_size": QWEN_VOCAB}
                             for k, p in VERIFY_CASES.items()},
                          **{k: {"params": to_sglang_sampling_params(p), "vocab_size": vocab}
                             for k, (p, vocab) in MUST_FAIL_CASES.items()}},
             "server_args": {"qwen-yarn": engine_kwargs(_yarn_config()),
                             "tokenizer-workers": engine_kwargs(_workers_config()),
                             "traced": engine_kwargs(traced)},
             "engine_methods": ["attach_tokenizer_worker", "async_generate"],
             "class_fields": [("srt/managers/io_struct.py", "GenerateReqInput")],
             "function_strings": [("srt/observability/req_time_stats.py", "SchedulerReqTimeStats",
                                   "convert_to_output_meta_info")],
             "trace": {"server_args": engine_kwargs(traced), "environ": engine_environ(traced),
                       "requests": {TRACED_RID: trace_kwargs(TRACE_CONTEXT)}}}
    out = subprocess.run([str(SGLANG_CHECK_PYTHON), str(ROOT / "tests" / "_sglang_check.py")],
                         input=json.dumps(cases), capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-6000:]
    results = json.loads(out.stdout)
    assert results["sglang_version"] == "0.5.23"
    return results


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_sampling_params_pass_sglangs_own_verify(case, sglang_checked):
    result = sglang_checked[case]
    assert result["ok"], result
    assert result["fields"]["max_new_tokens"] == VERIFY_CASES[case].max_tokens
    sent = to_sglang_sampling_params(VERIFY_CASES[case])
    for key in ("temperature", "top_p", "sampling_seed", "json_schema", "logit_bias", "min_new_tokens"):
        if key in sent:
            assert key in result["fields"], key  # SGLang knows every field genrpc sends


def test_sglangs_verify_is_live(sglang_checked):
    """Proves the check above can fail: SGLang rejects what genrpc's validation must never let through."""
    for case in MUST_FAIL_CASES:
        assert not sglang_checked[case]["ok"] and sglang_checked[case]["type"] == "ValueError", sglang_checked[case]


def test_engine_kwargs_are_sglang_server_args(sglang_checked):
    kwargs = engine_kwargs(_yarn_config())
    assert kwargs["dp_size"] == 4 and kwargs["tp_size"] == 1 and kwargs["tool_call_parser"] == "qwen"
    assert kwargs["context_length"] == 131072 and kwargs["max_running_requests"] == 128
    assert json.loads(kwargs["json_model_override_args"])["rope_scaling"]["type"] == "yarn"
    assert kwargs["served_model_name"] == "qwen2.5-7b-instruct" and kwargs["model_path"].endswith("Instruct")
    result = sglang_checked["qwen-yarn"]  # ServerArgs(**kwargs) raises TypeError on an unknown field name
    assert result["ok"], result
    assert result["fields"]["dp_size"] == 4 and result["fields"]["context_length"] == 131072
    assert result["fields"]["tool_call_parser"] == "qwen"
    # Incremental segments, not cumulative text (SGLang's own ServerArgs field, serving group, in 0.5.23).
    assert kwargs["incremental_streaming_output"] is True
    assert result["fields"]["incremental_streaming_output"] is True


# ------------------------------------------------------------------------------------------------------------
# tracing: SGLang's own, in the client's trace
# ------------------------------------------------------------------------------------------------------------

def test_sglang_traces_only_with_genrpcs_otlp_tracing():
    assert sglang_trace_config({}) == {}
    assert sglang_trace_config({"OTEL_TRACES_EXPORTER": "console"}) == {}  # SGLang exports over OTLP only
    assert sglang_trace_config({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == {}
    assert sglang_trace_config({"OTEL_TRACES_EXPORTER": "otlp"}) == {
        "enable_trace": True, "otlp_traces_endpoint": "http://localhost:4318/v1/traces", "otlp_service_name": "sglang"}
    # the URL genrpc's OTLP/HTTP exporter resolves: the signal-specific variable as is, else the base + /v1/traces
    assert sglang_trace_config({"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/",
                                "OTEL_SERVICE_NAME": "genrpc-a"}) == {
        "enable_trace": True, "otlp_traces_endpoint": "http://c:4318/v1/traces", "otlp_service_name": "genrpc-a-sglang"}
    assert sglang_trace_config({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t/x"})["otlp_traces_endpoint"] == "https://t/x"
    off = engine_kwargs(sglang_config(Settings(engine="sglang", model="/m"), environ={}))
    assert "enable_trace" not in off and "otlp_traces_endpoint" not in off
    assert engine_environ(sglang_config(Settings(engine="sglang", model="/m"), environ={})) == {}
    traced = _traced_config("http://collector:4318")
    assert engine_kwargs(traced).items() >= {"enable_trace": True, "otlp_service_name": "genrpc-service-sglang",
                                             "otlp_traces_endpoint": "http://collector:4318/v1/traces"}.items()
    assert engine_environ(traced) == {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}


def test_trace_kwargs_pass_the_w3c_headers_sglang_extracts():
    assert trace_kwargs({}) == {}
    assert trace_kwargs({"tracestate": "a=1"}) == {}  # no parent without a traceparent
    assert trace_kwargs(TRACE_CONTEXT) == {"external_trace_header": TRACE_CONTEXT}
    assert trace_kwargs({**TRACE_CONTEXT, "baggage": "x=1"}) == {"external_trace_header": TRACE_CONTEXT}


def test_sglang_accepts_the_trace_fields_genrpc_sends(sglang_checked, otlp_receiver):
    """The names genrpc uses are SGLang 0.5.23's: ServerArgs takes the trace settings, Engine.async_generate and
    GenerateReqInput take external_trace_header (read from SGLang's source: io_struct does not import on CPU)."""
    result = sglang_checked["traced"]
    assert result["ok"], result
    assert result["fields"]["enable_trace"] is True
    assert result["fields"]["otlp_traces_endpoint"] == f"{otlp_receiver.endpoint}/v1/traces"
    assert result["fields"]["otlp_service_name"] == "genrpc-service-sglang"
    assert "external_trace_header" in sglang_checked["engine_api"]["async_generate"]
    assert "external_trace_header" in sglang_checked["class_fields"]["srt/managers/io_struct.py:GenerateReqInput"]


def test_sglangs_own_tracing_puts_its_spans_under_the_services_span(sglang_checked, otlp_receiver):
    """SGLang's tracing, configured by genrpc's engine kwargs and environment, extracts the request's
    external_trace_header: its root span is a child of the service's span in the client's trace, and its spans reach
    genrpc's OTLP/HTTP endpoint (the receiver accepts only protobuf POSTs to /v1/traces)."""
    trace = sglang_checked["trace"]
    assert trace["ok"], trace
    request = trace["requests"][TRACED_RID]
    assert request["tracing_enable"] is True
    assert request["trace_id"] == CLIENT_TRACE_ID and request["parent_span_id"] == SERVICE_SPAN_ID
    assert trace["flushed"] is True
    spans = otlp_receiver.in_trace(CLIENT_TRACE_ID)
    root = next(s for s in spans if s["span_id"] == request["span_id"])
    assert root["parent_id"] == SERVICE_SPAN_ID and root["name"].strip() == f"Req {TRACED_RID[:8]}"  # "{role} Req …"
    assert root["service"] == "genrpc-service-sglang" and root["attributes"]["rid"] == TRACED_RID
    assert {s["parent_id"] for s in spans if s is not root} == {root["span_id"]}  # its thread span, below it


async def test_generate_passes_the_requests_trace_context_to_sglang():
    engine, fake = await _started_engine()
    traced = GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=[1, 2],
                               sampling=SamplingParams(max_tokens=4), trace_context=TRACE_CONTEXT)
    [d async for d in engine.generate(traced)]
    assert fake.calls[-1]["external_trace_header"] == TRACE_CONTEXT
    [d async for d in engine.generate(_request())]
    assert "external_trace_header" not in fake.calls[-1]  # tracing off: nothing extra


async def test_start_sets_sglangs_otlp_protocol_when_tracing(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")  # SGLang's default; genrpc exports OTLP/HTTP
    config = _traced_config("http://collector:4318")
    engine = SGLangEngine(config, engine_factory=FakeSGLangEngine, tokenizer=WordTokenizer())
    await engine.start()
    fake = FakeSGLangEngine.instances[-1]
    assert fake.kwargs["enable_trace"] is True
    assert fake.kwargs["otlp_traces_endpoint"] == "http://collector:4318/v1/traces"
    assert os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    await engine.shutdown()


# ------------------------------------------------------------------------------------------------------------
# queue time
# ------------------------------------------------------------------------------------------------------------

def test_queue_time_is_sglangs_on_the_first_delta():
    norm = StreamNormalizer(incremental=True, prompt_tokens=5)
    deltas = [d for d in map(norm.feed, metrics_stream(uuid.uuid4().hex)) if d is not None]
    assert [d.queue_time_s for d in deltas] == [0.125, None]
    # without SGLang's metrics meta_info has no queue_time: not measured
    norm = StreamNormalizer(incremental=True)
    assert [d.queue_time_s for d in map(norm.feed, incremental_stream("r")) if d] == [None, None]
    # cumulative mode: a repeated item yields nothing, the first delta still carries it
    norm = StreamNormalizer()
    items = metrics_stream("r")
    first = dict(items[0], text="", output_ids=[])
    assert norm.feed(first) is None and norm.feed(items[0]).queue_time_s == 0.125


def test_queue_time_key_is_what_sglangs_scheduler_reports(sglang_checked):
    keys = sglang_checked["function_strings"][
        "srt/observability/req_time_stats.py:SchedulerReqTimeStats.convert_to_output_meta_info"]
    assert "queue_time" in keys and "forward_entry_time" in keys


# ------------------------------------------------------------------------------------------------------------
# finish reasons and stream normalisation
# ------------------------------------------------------------------------------------------------------------

def test_finish_reason_mapping():
    assert map_finish_reason(None) is None
    assert map_finish_reason({"type": "stop", "matched": QWEN_EOS}) is FinishReason.STOP
    assert map_finish_reason({"type": "stop", "matched": "</s>"}) is FinishReason.STOP
    assert map_finish_reason({"type": "length", "length": 16}) is FinishReason.LENGTH
    with pytest.raises(EngineInternalError):
        map_finish_reason({"type": "mystery"})


@pytest.mark.parametrize(("finish", "exc_type"), [
    ({"type": "abort", "status_code": 503, "message": "The request queue is full."}, EngineOverloaded),
    ({"type": "abort", "status_code": 429, "message": "Too many requests"}, EngineOverloaded),
    ({"type": "abort", "message": "Retracted under decode memory pressure without a KV backup. Retry later.",
      "status_code": 503, "err_type": None}, EngineUnavailable),
    ({"type": "abort", "message": "bad", "status_code": 400, "err_type": None}, EngineBadRequest),
    ({"type": "abort", "message": "Out of memory even after retracting", "status_code": 500, "err_type": None},
     EngineInternalError),
    ({"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}, EngineUnavailable),
    ({"type": "abort", "message": "Abort in waiting queue"}, EngineUnavailable),
    ({"type": "abort"}, EngineUnavailable),
])
def test_abort_status_codes(finish, exc_type):
    err = abort_error(finish)
    assert type(err) is exc_type
    with pytest.raises(exc_type):
        map_finish_reason(finish)


def test_abort_errors_map_through_the_services_table():
    from genrpc.service import errors

    assert errors.to_service_error(abort_error(
        {"type": "abort", "status_code": 503, "message": "The request queue is full."})).code == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    bad = errors.to_service_error(abort_error({"type": "abort", "status_code": 400, "message": "x"}))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and bad.message == "x"
    assert errors.to_service_error(abort_error({"type": "abort"})).code == grpc.StatusCode.UNAVAILABLE
    assert errors.to_service_error(EngineUnavailable("x")).code == grpc.StatusCode.UNAVAILABLE


def test_cumulative_stream_normalises_to_deltas():
    rid = uuid.uuid4().hex
    norm = StreamNormalizer(prompt_tokens=5)
    deltas = [d for d in map(norm.feed, cumulative_stream(rid)) if d is not None]
    assert "".join(d.text for d in deltas) == "Hello, 世!"
    assert [d.text for d in deltas] == ["Hel", "lo,", "", " 世", "!"]
    assert [d.token_ids for d in deltas] == [(9707,), (11,), (28740,), (238,), (0, QWEN_EOS)]
    assert [d.completion_tokens for d in deltas] == [1, 2, 3, 4, 6]
    assert all(d.prompt_tokens == 5 and d.cached_prompt_tokens == 3 for d in deltas)
    assert [d.finish_reason for d in deltas] == [None, None, None, None, FinishReason.STOP]
    assert norm.finished


def test_length_and_incremental_streams():
    rid = uuid.uuid4().hex
    norm = StreamNormalizer()
    deltas = [d for d in map(norm.feed, length_stream(rid)) if d is not None]
    assert [(d.text, d.token_ids, d.finish_reason) for d in deltas] == [
        ("A", (32,), None), ("B", (33,), FinishReason.LENGTH)]
    norm = StreamNormalizer(incremental=True)
    deltas = [d for d in map(norm.feed, incremental_stream(rid)) if d is not None]
    assert [(d.text, d.token_ids, d.completion_tokens) for d in deltas] == [("Hi", (13048,), 1),
                                                                            (" there", (1052,), 2)]
    assert deltas[-1].finish_reason is FinishReason.LENGTH


def coalesced_incremental_stream(rid: str) -> list[dict[str, Any]]:
    """`incremental_streaming_output=True` with logprobs, the consumer behind: TokenizerManager
    `_coalesce_streaming_chunks` (0.5.23) joins the queued segments' text and output_ids and concatenates the
    per-token lists of `_INCREMENTAL_STREAMING_META_INFO_KEYS` (each already sliced to its segment by
    `_slice_streaming_output_meta_info`); the rest of meta_info is the last segment's. Then the abort item
    `_handle_abort_req` builds after a client abort: cumulative text, [last id], no prompt_tokens."""
    first = _meta(rid, finish=None, completion=1)
    first.update(output_token_logprobs=[(-0.1, 9707, None)], output_top_logprobs=[[(-0.1, 9707, None)]])
    joined = _meta(rid, finish=None, completion=3)  # segments 2 and 3, coalesced
    joined.update(output_token_logprobs=[(-0.7, 11, None), (-0.3, 1879, None)],
                  output_top_logprobs=[[(-0.7, 11, None)], [(-0.3, 1879, None)]])
    last = _meta(rid, finish={"type": "length", "length": 4}, completion=4)
    last.update(output_token_logprobs=[(-0.2, 0, None)], output_top_logprobs=[[(-0.2, 0, None)]])
    return [{"text": "Hello", "output_ids": [9707], "meta_info": first},
            {"text": ", world", "output_ids": [11, 1879], "meta_info": joined},
            {"text": "!", "output_ids": [0], "meta_info": last}]


def test_incremental_coalesced_segments_keep_every_token():
    norm = StreamNormalizer(incremental=True, prompt_tokens=7)
    deltas = [d for d in map(norm.feed, coalesced_incremental_stream(uuid.uuid4().hex)) if d is not None]
    assert [d.text for d in deltas] == ["Hello", ", world", "!"]
    assert [d.token_ids for d in deltas] == [(9707,), (11, 1879), (0,)]
    assert [d.completion_tokens for d in deltas] == [1, 3, 4]
    # one logprob entry per token, in order, across the coalesced segment
    assert [[lp.token_id for lp in d.logprobs] for d in deltas] == [[9707], [11, 1879], [0]]
    assert [lp.logprob for d in deltas for lp in d.logprobs] == [-0.1, -0.7, -0.3, -0.2]
    assert deltas[-1].finish_reason is FinishReason.LENGTH and norm.finished


def test_incremental_abort_item_with_cumulative_text_raises():
    rid = uuid.uuid4().hex
    norm = StreamNormalizer(incremental=True)
    assert norm.feed(coalesced_incremental_stream(rid)[0]).text == "Hello"
    abort = {"text": "Hello, world", "output_ids": [1879],
             "meta_info": {"id": rid, "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
                           "completion_tokens": 3}}
    with pytest.raises(EngineUnavailable):  # an abort without a status code: retry elsewhere
        norm.feed(abort)


def test_logprobs_are_normalised_per_token():
    norm = StreamNormalizer()
    deltas = [d for d in map(norm.feed, logprob_stream(uuid.uuid4().hex)) if d is not None]
    assert [len(d.logprobs) for d in deltas] == [1, 1]
    first, second = deltas[0].logprobs[0], deltas[1].logprobs[0]
    assert (first.token_id, first.logprob, first.top) == (9707, -0.1, ((9707, -0.1), (13048, -2.5)))
    assert (second.token_id, second.logprob, second.top) == (11, -0.7, ((11, -0.7), (0, -0.9)))


def test_abort_item_without_prompt_tokens_raises():
    norm = StreamNormalizer(prompt_tokens=9)
    with pytest.raises(EngineOverloaded, match="queue is full"):
        norm.feed(queue_full_abort(uuid.uuid4().hex))
    assert norm.prompt_tokens == 9  # the abort item has no prompt_tokens: read with .get()


# ------------------------------------------------------------------------------------------------------------
# the adapter around a fake sglang.Engine
# ------------------------------------------------------------------------------------------------------------

class FakeTokenizerManager:
    """The slice of sglang's TokenizerManager the adapter uses: abort_request(rid=..., abort_all=...)
    (managers/tokenizer_manager.py, 0.5.23) and context_len."""

    def __init__(self, vision: bool = False) -> None:
        self.aborts: list[dict[str, Any]] = []
        self.context_len = 32768
        # init_tokenizer_and_processor: a multimodal processor only for a multimodal model, else None
        self.mm_processor = object() if vision else None

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborts.append({"rid": rid, "abort_all": abort_all})


class FakeSGLangEngine:
    """Mimics ``sglang.Engine`` (entrypoints/engine.py, 0.5.23): ``await async_generate(..., stream=True)``
    returns an async generator of items. `script(rid)` gives the items; `hang=True` then waits forever
    (a request still decoding). The first call installs a SIGTERM handler on the loop, as SGLang's
    ``TokenizerManager.auto_create_handle_loop`` does."""

    instances: list[FakeSGLangEngine] = []
    install_sigterm = False  # only the signal test turns this on (the test loop is shared by the session)
    vision = False  # a vision-language model (its TokenizerManager has an mm_processor)

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.server_args = types.SimpleNamespace(incremental_streaming_output=False)
        self.tokenizer_manager = FakeTokenizerManager(vision=self.vision)
        self.calls: list[dict[str, Any]] = []
        self.closed: list[str] = []
        self.script = cumulative_stream
        self.hang = False
        self.raise_on_first: Exception | None = None
        self.shut_down = False
        self._handle_loop_created = False
        FakeSGLangEngine.instances.append(self)

    async def async_generate(self, *, input_ids: list[int], sampling_params: dict[str, Any], stream: bool,
                             rid: str, **kwargs: Any) -> Any:
        assert stream is True
        self.calls.append({"input_ids": input_ids, "sampling_params": sampling_params, "rid": rid, **kwargs})
        if self.install_sigterm and not self._handle_loop_created:
            self._handle_loop_created = True
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: None)
        return self._gen(rid)

    async def _gen(self, rid: str):
        try:
            if self.raise_on_first is not None:
                raise self.raise_on_first
            for item in self.script(rid):
                yield item
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed.append(rid)

    def shutdown(self) -> None:
        self.shut_down = True


class WordTokenizer:
    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()] or [1]

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(" ".join(m["content"] for m in messages))


def _config(**overrides: Any) -> SGLangEngineConfig:
    """The adapter's config as the factory builds it from these Settings."""
    base = dict(engine="sglang", model="/models/Qwen2.5-7B-Instruct", model_id="qwen2.5-7b-instruct",
                metrics_port=-1)
    base.update(overrides)
    return sglang_config(Settings(**base))


async def _started_engine(**overrides: Any) -> tuple[SGLangEngine, FakeSGLangEngine]:
    engine = SGLangEngine(_config(**overrides), engine_factory=FakeSGLangEngine, tokenizer=WordTokenizer())
    await engine.start()
    return engine, FakeSGLangEngine.instances[-1]


def _request(max_tokens: int = 16, **kw: Any) -> GenerationRequest:
    return GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=[1, 2, 3, 4, 5],
                             sampling=SamplingParams(max_tokens=max_tokens, **kw))


async def test_start_builds_engine_warms_up_and_keeps_genrpcs_sigterm_handler():
    loop = asyncio.get_running_loop()
    marker: list[str] = []
    loop.add_signal_handler(signal.SIGTERM, marker.append, "genrpc")
    FakeSGLangEngine.install_sigterm = True
    try:
        engine, fake = await _started_engine(context_length=0)
        assert isinstance(engine, Engine)
        assert fake.kwargs["dp_size"] == 4 and fake.kwargs["enable_metrics"] is False
        assert len(fake.calls) == 1 and fake.calls[0]["sampling_params"]["max_new_tokens"] == 4  # warm-up
        assert engine.model_info.context_length_tokens == 32768  # from tokenizer_manager.context_len
        assert engine.model_info.model_id == "qwen2.5-7b-instruct"
        assert engine.running_requests == 0 and engine.waiting_requests == 0
        handle = loop._signal_handlers[signal.SIGTERM]  # the fake replaced it; start() put ours back
        handle._run()
        assert marker == ["genrpc"]
        await engine.shutdown()
        assert fake.shut_down and {"rid": "", "abort_all": True} in fake.tokenizer_manager.aborts
    finally:
        FakeSGLangEngine.install_sigterm = False
        loop.remove_signal_handler(signal.SIGTERM)


async def test_generate_streams_deltas_with_fresh_uuid_rid():
    engine, fake = await _started_engine()
    request = _request(max_tokens=8, seed=7, temperature=0.0)
    deltas = [d async for d in engine.generate(request)]
    call = fake.calls[-1]
    assert call["input_ids"] == [1, 2, 3, 4, 5]
    assert call["sampling_params"] == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "sampling_seed": 7}
    rid = call["rid"]
    assert len(rid) == 32 and uuid.UUID(hex=rid).version == 4
    assert "".join(d.text for d in deltas) == "Hello, 世!" and deltas[-1].finish_reason is FinishReason.STOP
    assert deltas[-1].completion_tokens == 6 and deltas[-1].prompt_tokens == 5
    assert fake.closed[-1] == rid
    assert fake.tokenizer_manager.aborts == []  # finished normally: nothing to abort
    assert engine.running_requests == 0 and engine.waiting_requests == 0


async def test_close_mid_stream_aborts_with_the_rid():
    engine, fake = await _started_engine()
    fake.script, fake.hang = (lambda rid: cumulative_stream(rid)[:2]), True
    async with contextlib.aclosing(engine.generate(_request())) as deltas:
        first = await deltas.__anext__()
        assert first.text == "Hel"
        assert engine.running_requests == 1
    rid = fake.calls[-1]["rid"]
    assert fake.tokenizer_manager.aborts == [{"rid": rid, "abort_all": False}]
    assert fake.closed[-1] == rid  # the SGLang generator was closed (aclosing)
    assert engine.running_requests == 0


async def test_task_cancel_aborts_with_the_rid():
    engine, fake = await _started_engine()
    fake.script, fake.hang = (lambda rid: []), True
    got_call = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(engine.generate(_request())) as deltas:
            got_call.set()
            async for _ in deltas:
                pass

    task = asyncio.create_task(consume())
    await got_call.wait()
    for _ in range(5):
        await asyncio.sleep(0)
    assert engine.waiting_requests == 1  # accepted, no output yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rid = fake.calls[-1]["rid"]
    assert fake.tokenizer_manager.aborts == [{"rid": rid, "abort_all": False}]
    assert fake.closed[-1] == rid
    assert engine.waiting_requests == 0


@pytest.mark.parametrize(("item", "exc_type"), [
    (queue_full_abort, EngineOverloaded),
    (bad_request_abort, EngineBadRequest),
    (plain_abort, EngineUnavailable),
])
async def test_abort_items_raise_errors(item, exc_type):
    engine, fake = await _started_engine()
    fake.script = lambda rid: [item(rid)]
    with pytest.raises(exc_type):
        async for _ in engine.generate(_request()):
            pass
    assert fake.closed[-1] == fake.calls[-1]["rid"]


async def test_validation_error_becomes_bad_request():
    engine, fake = await _started_engine()
    # tokenizer_manager.py `_validate_one_request` (0.5.23) raises ValueError on the first __anext__
    fake.raise_on_first = ValueError("The input (40000 tokens) is longer than the model's context length "
                                     "(32768 tokens).")
    with pytest.raises(EngineBadRequest, match="context length") as info:
        async for _ in engine.generate(_request()):
            pass
    assert info.value.field == "messages"


async def test_failed_warm_up_stops_sglang():
    def factory(**kwargs: Any) -> FakeSGLangEngine:
        fake = FakeSGLangEngine(**kwargs)
        fake.raise_on_first = RuntimeError("CUDA error: out of memory")
        return fake

    engine = SGLangEngine(_config(), engine_factory=factory, tokenizer=WordTokenizer())
    with pytest.raises(EngineInternalError, match="SGLang failed: RuntimeError: CUDA error: out of memory"):
        await engine.start()
    assert FakeSGLangEngine.instances[-1].shut_down
    with pytest.raises(EngineUnavailable):
        async for _ in engine.generate(_request()):
            pass


async def test_generate_before_start_is_not_ready():
    engine = SGLangEngine(_config(), engine_factory=FakeSGLangEngine, tokenizer=WordTokenizer())
    with pytest.raises(EngineUnavailable):
        async for _ in engine.generate(_request()):
            pass
    with pytest.raises(EngineUnavailable):
        _ = engine.model_info


def test_module_imports_without_sglang():
    code = ("import sys; sys.modules['sglang'] = None\n"
            "import genrpc.service.engines.sglang_engine as m\n"
            "assert 'sglang' not in [k for k, v in sys.modules.items() if v is not None]\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------------------------
# metrics: SGLang's multiprocess files + in-process tokenizer metrics beside genrpc's registry
# ------------------------------------------------------------------------------------------------------------

def test_sglang_metrics_exported_beside_genrpcs(tmp_path):
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest

    # A "scheduler process": prometheus_client imported with PROMETHEUS_MULTIPROC_DIR set, as SGLang's
    # subprocesses are (utils/common.py set_prometheus_multiproc_dir, observability/metrics_collector.py).
    writer = ("from prometheus_client import Counter, Gauge\n"
              "Gauge('sglang:num_running_reqs', 'running', ['model_name'], multiprocess_mode='mostrecent')"
              ".labels(model_name='qwen').set(3)\n"
              "Counter('sglang:prompt_tokens', 'prompt', ['model_name']).labels(model_name='qwen').inc(11)\n"
              "Counter('genrpc_should_not_leak', 'x').inc()\n")
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=120,
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    ours = CollectorRegistry()
    Counter("genrpc_requests", "genrpc's own", registry=ours).inc(2)
    tokenizer_metric = Counter("sglang:e2e_requests_test", "in-process TokenizerManager metric")  # default REGISTRY
    tokenizer_metric.inc(5)
    try:
        ours.register(sglang_metrics_collector(path=str(tmp_path)))
        text = generate_latest(ours).decode()
    finally:
        REGISTRY.unregister(tokenizer_metric)
    assert "genrpc_requests_total 2.0" in text
    assert 'sglang:num_running_reqs{model_name="qwen"} 3.0' in text
    assert 'sglang:prompt_tokens_total{model_name="qwen"} 11.0' in text
    assert "sglang:e2e_requests_test_total 5.0" in text
    assert "genrpc_should_not_leak" not in text


# ------------------------------------------------------------------------------------------------------------
# GPU: a real sglang.Engine on Qwen2.5 with 4 GPUs (skipped with a reason anywhere else)
# ------------------------------------------------------------------------------------------------------------

def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed (pip install '.[sglang]' on a GPU machine)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.cuda.device_count() < 4:
        return f"needs 4 CUDA GPUs, found {torch.cuda.device_count()}"
    if not os.environ.get("GENRPC_TEST_SGLANG_MODEL"):
        return "set GENRPC_TEST_SGLANG_MODEL to a local Qwen2.5-7B-Instruct directory"
    return None


gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")


@pytest.fixture(scope="module")
async def real_engine():
    settings = _config(model=os.environ.get("GENRPC_TEST_SGLANG_MODEL", ""), dp_size=4, tp_size=1,
                         metrics_port=0)
    engine = SGLangEngine(settings)
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest.mark.gpu
@gpu
async def test_gpu_greedy_generation_and_seed(real_engine):
    ids = real_engine.tokenizer.apply_chat_template([{"role": "user", "content": "Count from 1 to 5."}])
    async def run(**kw: Any) -> tuple[str, Any]:
        deltas = [d async for d in real_engine.generate(GenerationRequest(
            request_id=uuid.uuid4().hex, prompt_token_ids=ids, sampling=SamplingParams(**kw)))]
        return "".join(d.text for d in deltas), deltas[-1]
    text, last = await run(max_tokens=32, temperature=0.0)
    assert "1" in text and last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert last.prompt_tokens == len(ids) and 0 < last.completion_tokens <= 32
    a, _ = await run(max_tokens=24, temperature=1.0, seed=1234)
    b, _ = await run(max_tokens=24, temperature=1.0, seed=1234)
    assert a == b
    _, last = await run(max_tokens=3, temperature=0.0)
    assert last.finish_reason is FinishReason.LENGTH and last.completion_tokens == 3


@pytest.mark.gpu
@gpu
async def test_gpu_cancel_frees_the_slot(real_engine):
    ids = real_engine.tokenizer.encode("Write a very long story about a lighthouse.")
    request = GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=ids,
                                sampling=SamplingParams(max_tokens=4000, temperature=0.0))
    async with contextlib.aclosing(real_engine.generate(request)) as deltas:
        async for _ in deltas:
            break
    for _ in range(100):
        if real_engine._engine.tokenizer_manager.rid_to_state == {}:
            break
        await asyncio.sleep(0.05)
    assert real_engine._engine.tokenizer_manager.rid_to_state == {}
    assert real_engine.running_requests == 0


# ------------------------------------------------------------------------------------------------------------
# images (vision models)
# ------------------------------------------------------------------------------------------------------------

IMAGES = ("https://example.com/a.png", "data:image/png;base64,aGk=", "http://example.com/c.jpg")


def test_image_kwargs_one_requests_list_in_order():
    # io_struct.py GenerateReqInput (0.5.23): with a flat input_ids list (a single request) a list image_data is
    # that request's images; tokenizer_manager.py passes it on to the model's mm_processor as is.
    assert image_kwargs(()) == {}
    assert image_kwargs(IMAGES) == {"image_data": list(IMAGES)}


def test_config_has_vision(tmp_path):
    assert not config_has_vision(str(tmp_path))  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    assert not config_has_vision(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2_5_VLForConditionalGeneration"],
                                                      "vision_config": {"depth": 32}}))
    assert config_has_vision(str(tmp_path))


async def test_vision_model_passes_image_data_with_the_ids():
    FakeSGLangEngine.vision = True
    try:
        engine, fake = await _started_engine()
    finally:
        FakeSGLangEngine.vision = False
    assert engine.model_info.accepts_images  # SGLang built a multimodal processor
    assert "image_data" not in fake.calls[0]  # the warm-up is text only
    request = GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=[1, 2, 3, 4, 5],
                                sampling=SamplingParams(max_tokens=8), images=IMAGES)
    deltas = [d async for d in engine.generate(request)]
    call = fake.calls[-1]
    assert call["input_ids"] == [1, 2, 3, 4, 5] and call["image_data"] == list(IMAGES)
    assert deltas[-1].finish_reason is FinishReason.STOP
    deltas = [d async for d in engine.generate(_request())]
    assert "image_data" not in fake.calls[-1]  # a text request on a vision model carries none


async def test_text_model_does_not_accept_images(tmp_path):
    engine, fake = await _started_engine()
    assert not engine.model_info.accepts_images  # tokenizer_manager.mm_processor is None
    request = GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=[1, 2], images=IMAGES[:1],
                                sampling=SamplingParams(max_tokens=8))
    with pytest.raises(EngineUnsupported, match="does not accept images"):
        async for _ in engine.generate(request):
            pass
    assert len(fake.calls) == 1  # only the warm-up reached SGLang


async def test_accepts_images_from_config_json_without_mm_processor(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"depth": 32}}))
    engine = SGLangEngine(_config(model=str(tmp_path)), engine_factory=FakeSGLangEngine, tokenizer=WordTokenizer())
    await engine.start()
    fake = FakeSGLangEngine.instances[-1]
    del fake.tokenizer_manager.mm_processor  # another SGLang version: no such attribute
    engine._model_info = engine._build_model_info()
    assert engine.model_info.accepts_images


def test_service_workers_share_one_sglang_engine(sglang_checked):
    """--service-workers N with SGLang: worker 0 builds the engine with N tokenizer workers (SGLang's own ServerArgs
    accept it), the others attach with `Engine.attach_tokenizer_worker(parent_pid=...)` (read from SGLang's source)."""
    assert sglang_checked["tokenizer-workers"]["ok"], sglang_checked["tokenizer-workers"]
    assert sglang_checked["tokenizer-workers"]["fields"]["tokenizer_worker_num"] == 4
    assert "parent_pid" in sglang_checked["engine_api"]["attach_tokenizer_worker"]


async def test_attached_worker_does_not_build_an_engine():
    attached: list[int] = []

    class FakeSGLang(FakeSGLangEngine):
        @classmethod
        def attach_tokenizer_worker(cls, parent_pid=None):
            attached.append(parent_pid)
            return FakeSGLangEngine(attached=True)

    FakeSGLangEngine.instances.clear()
    worker = SGLangEngine(_workers_config(attach_to_pid=4242), engine_factory=FakeSGLang, tokenizer=WordTokenizer())
    await worker.start()  # attaches, then warms up through the attached engine
    assert attached == [4242]
    assert [e.kwargs for e in FakeSGLangEngine.instances] == [{"attached": True}]
    assert FakeSGLangEngine.instances[0].calls  # the warm-up generated on the attached engine
    await worker.shutdown()
    host = SGLangEngine(_workers_config(), engine_factory=FakeSGLang, tokenizer=WordTokenizer())
    host.host()  # the engine host builds the engine and generates nothing itself (it holds SGLang's router)
    hosted = FakeSGLangEngine.instances[-1]
    assert hosted.kwargs["tokenizer_worker_num"] == 4 and hosted.calls == [] and attached == [4242]
    await host.shutdown()
    assert hosted.shut_down
