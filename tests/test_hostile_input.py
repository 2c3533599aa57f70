"""Hostile input through the real stack: every body any client can send gets a well-formed answer.

For each body: never a 5xx, never a hang, an error body that is valid UTF-8 JSON in OpenAI's shape, and the two
REST paths (Envoy's transcoder for `"stream": false`, the bridge for `"stream": true`) give the same verdict.
A hypothesis property explores type confusion across every declared request field."""

from __future__ import annotations

import json
import math

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from google.protobuf import json_format, struct_pb2
from grpc_status import rpc_status

from genrpc.bridge.encoding import _OPAQUE
from genrpc.v1 import chat_pb2, completion_pb2, generation_service_pb2_grpc, responses_pb2

TIMEOUT = httpx.Timeout(15.0)
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.ports['envoy_port']}", timeout=TIMEOUT) as client:
        yield client


def check_well_formed(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.content[:300]!r}"
    if response.status_code >= 400:
        text = response.content.decode("utf-8")  # raises on invalid UTF-8
        body = json.loads(text)
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"], (what, body)
        assert error["type"] in ("invalid_request_error", "rate_limit_error", "permission_error"), (what, body)


def post(http: httpx.Client, path: str, body: bytes | str | dict, content_type: str = "application/json"):
    data = json.dumps(body) if isinstance(body, dict) else body
    return http.post(path, content=data, headers={"content-type": content_type})


def verdicts(http: httpx.Client, body: dict, path: str = "/v1/chat/completions") -> tuple[int, int]:
    """(status without stream, status with stream) for one body; both checked for well-formedness."""
    unary = post(http, path, {**body, "stream": False})
    check_well_formed(unary, f"unary {body}")
    streamed = post(http, path, {**body, "stream": True})
    check_well_formed(streamed, f"stream {body}")
    return unary.status_code, streamed.status_code


BAD_VALUES = [None, {}, [], [1], {"a": 1}, "x", "", -1, 0, 10**30, -(10**30), 1.5, True, "1", "yes"]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
          "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice",
          "parallel_tool_calls", "user", "metadata", "top_k", "min_p", "repetition_penalty", "ignore_eos",
          "min_tokens", "top_a", "response_format", "stream_options", "truncation"]


@pytest.mark.parametrize("raw", [
    b"", b"{", b'{"model": "x", "messages": [', b"null", b"[]", b'"text"', b"123",
    b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe bad utf-8"}]}',
    b'{"model": "\xc3\x28"}',
    b'{"max_tokens": NaN}', b'{"temperature": Infinity}', b'{"temperature": -Infinity}',
    b'{"model": "a", "model": "b", "messages": []}',
    b"[" * 5000 + b"]" * 5000,
    b'{"messages": ' + b'[{"role":"user","content":' * 200 + b'"x"' + b"}]" * 200 + b"}",
])
def test_malformed_bodies(http, raw):
    for stream in (False, True):
        body = raw if not stream or not raw.startswith(b"{") else raw.replace(b"{", b'{"stream": true, ', 1)
        response = post(http, "/v1/chat/completions", body)
        check_well_formed(response, repr(body[:80]))
        assert response.status_code >= 400


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "", "application/xml"])
def test_wrong_content_types(http, stack, content_type):
    body = json.dumps({"model": stack.model, "messages": MESSAGES, "max_tokens": 1})
    response = post(http, "/v1/chat/completions", body, content_type)
    check_well_formed(response, content_type)


def test_logit_bias_with_object_values_is_a_400(http, stack):
    for path, extra in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        unary, streamed = verdicts(http, {"model": stack.model, "max_tokens": 1, "logit_bias": {"x": {}}, **extra},
                                   path)
        assert unary == streamed == 400


@pytest.mark.parametrize("fields", [
    {"tools": [None]}, {"tools": [None, {"type": "function", "function": {"name": "f"}}]}, {"functions": [None]},
    {"modalities": [None]}, {"messages": [None]}, {"messages": [{**MESSAGES[0], "tool_calls": [None]}]},
    {"stop": ["a", None]}, {"logit_bias": {"1": None}},
    {"tools": [[{"type": "function", "function": {"name": "f"}}]]}, {"modalities": [["text"]]}, {"functions": [[]]},
    {"stream_interval": -1}])
def test_transcoder_quirks_get_one_verdict_on_both_paths(http, stack, fields):
    # the transcoder skips a null element of a repeated field and reads a nested list as its elements; the bridge
    # must read such a body the same way (and a field only streaming uses is still checked without streaming)
    unary, streamed = verdicts(http, {"model": stack.model, "messages": MESSAGES, "max_tokens": 1, **fields})
    assert unary == streamed, f"{fields}: transcoder {unary} vs bridge {streamed}"


@pytest.mark.parametrize("value", [{}, {"a": 1}, {"": 1}, {"a": {"": 1}}, [], [1], "x"])
def test_list_value_fields_get_one_verdict_on_both_paths(http, stack, value):
    # the transcoder reads an object given for a google.protobuf.ListValue as an empty list
    unary, streamed = verdicts(http, {"model": stack.model, "input": "Hi", "max_output_tokens": 1,
                                      "context_management": value}, "/v1/responses")
    assert unary == streamed, f"{value}: transcoder {unary} vs bridge {streamed}"


@pytest.mark.parametrize("fields, headers", [
    ({"user": "\x80"}, {}), ({"user": "café"}, {}), ({"prompt_cache_key": "日本語\x7f"}, {}),
    ({}, {"x-request-id": "é".encode()}), ({}, {"x-genrpc-affinity": "clé".encode()}),
    ({}, {"traceparent": b"\xff"})])
def test_non_ascii_keys_and_headers_are_served(http, stack, fields, headers):
    # the affinity key (from prompt_cache_key / user / the header) and the headers the bridge forwards become gRPC
    # metadata, which takes printable ASCII only: they must never fail the call
    body = {"model": stack.model, "messages": MESSAGES, "max_tokens": 1, **fields}
    for stream in (False, True):
        response = http.post("/v1/chat/completions", content=json.dumps({**body, "stream": stream}),
                             headers={"content-type": "application/json", **headers})
        assert response.status_code == 200, (stream, response.status_code, response.text[:300])


def test_stream_must_be_a_boolean(http, stack):
    for value in ("yes", "true", 1, "1"):
        response = post(http, "/v1/chat/completions", {"model": stack.model, "messages": MESSAGES, "stream": value})
        check_well_formed(response, f"stream={value!r}")
        assert response.status_code == 400, (value, response.text)


def test_oversize_body_is_413_naming_the_limit(http, stack):
    huge = "word " * (20 * 1024 * 1024 // 5)
    for stream in (False, True):
        response = post(http, "/v1/chat/completions", {"model": stack.model, "messages": [
            {"role": "user", "content": huge}], "max_tokens": 1, "stream": stream})
        check_well_formed(response, "20 MB body")
        assert response.status_code == 413
        assert "max_request_bytes" in response.json()["error"]["message"]


def test_limits_over_rest_name_the_limit(http, stack):
    """Counts over their limits, and a prompt too long for the context (refused before tokenising): a 400 naming
    the limit on both REST paths."""
    cases = {
        "max_n": {"n": 17},
        "max_stop": {"stop": ["a", "b", "c", "d", "e"]},
        "max_logit_bias": {"logit_bias": {str(i): 1 for i in range(301)}},
        "max_messages": {"messages": MESSAGES * 1025},
        "max_tokens_limit": {"max_tokens": 2049},
        "max_prompt_tokens": {"messages": [{"role": "user", "content": "x" * (1024 * 1024)}]},
    }
    for limit, fields in cases.items():
        for stream in (False, True):
            body = {"model": stack.model, "messages": MESSAGES, "max_tokens": 1, **fields, "stream": stream}
            response = post(http, "/v1/chat/completions", body)
            check_well_formed(response, limit)
            assert response.status_code == 400, (limit, stream, response.text)
            error = response.json()["error"]
            assert limit in error["message"] and error["code"] == "limit_exceeded", (limit, error)


DASHSCOPE_PATH = "/api/v1/services/aigc/text-generation/generation"


def check_dashscope_error(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.content[:300]!r}"
    if response.status_code >= 400:
        body = json.loads(response.content.decode("utf-8"))
        assert isinstance(body["code"], str) and body["code"], (what, body)
        assert isinstance(body["message"], str) and body["message"], (what, body)


def test_dashscope_route_hostile_input(http, stack):
    for raw in (b"", b"{", b"null", b"[]", b'{"model": "\xc3\x28"}',
                b'{"model": "m", "input": {"prompt": "\xff bad"}}', b"[" * 5000 + b"]" * 5000,
                b'{"a": 1, "a": 2}'):
        for headers in ({}, {"x-dashscope-sse": "enable"}):
            response = http.post(DASHSCOPE_PATH, content=raw, headers={"content-type": "application/json",
                                                                        **headers})
            check_dashscope_error(response, repr(raw[:60]))
            assert response.status_code >= 400
    for field in ("temperature", "top_p", "seed", "max_tokens", "n", "stop", "result_format", "incremental_output",
                  "enable_search", "repetition_penalty"):
        for value in BAD_VALUES:
            if field == "max_tokens" and value is None:
                continue
            body = {"model": stack.model, "input": {"messages": MESSAGES},
                    "parameters": {"max_tokens": 1, field: value}}
            check_dashscope_error(post(http, DASHSCOPE_PATH, body), f"{field}={value!r}")
    for value in BAD_VALUES:
        for key in ("model", "input", "parameters"):
            if key == "parameters" and value in (None, {}):
                continue  # valid: no parameters, so no max_tokens (a long generation)
            body = {"model": stack.model, "input": {"messages": MESSAGES}, "parameters": {"max_tokens": 1}, key: value}
            check_dashscope_error(post(http, DASHSCOPE_PATH, body), f"{key}={value!r}")


def test_grpc_bad_input_gets_precise_status(stack):
    """Native gRPC, direct and through Envoy: a bad field, a limit, corrupt bytes: INVALID_ARGUMENT, never
    INTERNAL/UNKNOWN."""
    for address in (stack.grpc_address, stack.envoy_address):
        with grpc.insecure_channel(address) as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            for bad in (chat_pb2.ChatCompletionRequest(model=stack.model, messages=[], max_tokens=-5),
                        chat_pb2.ChatCompletionRequest(model=stack.model, messages=[
                            chat_pb2.ChatMessage(role="user", content=struct_pb2.Value(string_value="hi"))],
                            max_tokens=1, n=17)):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.CreateChatCompletion(bad, timeout=30)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            raw = channel.unary_unary("/genrpc.v1.GenerationService/CreateChatCompletion",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for garbage in (b"\x72\x05\x0a\x01x\x11\xff", b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f"):
                with pytest.raises(grpc.RpcError) as caught:
                    raw(garbage, timeout=30)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (garbage, caught.value.details())


# Token counts are left to test_type_confusion_every_field: a random valid count could generate for minutes.
PROPERTY_FIELDS = [f for f in FIELDS if f not in ("max_tokens", "max_completion_tokens", "min_tokens", "n")] + [
    "prompt", "echo", "suffix", "best_of"]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.dictionaries(st.sampled_from(PROPERTY_FIELDS), json_value,
                              max_size=5),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_property_no_5xx_and_paths_agree(http, stack, fields, path):
    base = {"model": stack.model, "max_tokens": 1}
    base.update({"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "Hi"})
    body = {**base, **fields}
    if any(isinstance(v, float) and not math.isfinite(v) for v in body.values()):
        return
    unary, streamed = verdicts(http, body, path)
    assert unary == streamed, f"{body}: transcoder {unary} vs bridge {streamed}"


# Field names drawn from the request's own protobuf schema, nested: random keys almost never hit `function`,
# `role` or `json_schema`, so the top-level property above never reaches a nested field's parsing.
_TOKEN_COUNTS = {"max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens", "n", "best_of"}


def schema_shaped(descriptor, depth: int = 0) -> st.SearchStrategy:
    """A JSON object whose keys are `descriptor`'s fields (token counts left out), each value either shaped like
    the field (a nested message by its own schema, a list for a repeated field) or any JSON value."""
    fields = {}
    for field in descriptor.fields:
        if field.name in _TOKEN_COUNTS:
            continue
        nested = field.message_type
        if nested is not None and nested.GetOptions().map_entry:
            shaped = st.dictionaries(st.text(max_size=6), json_leaf, max_size=3)
        elif nested is not None and nested.full_name not in _OPAQUE and depth < 3:
            shaped = schema_shaped(nested, depth + 1)
        else:
            shaped = json_leaf
        if field.is_repeated and not (nested is not None and nested.GetOptions().map_entry):
            shaped = st.lists(st.one_of(shaped, json_leaf), max_size=3)
        fields[field.name] = st.one_of(shaped, json_value)
    if depth:
        return st.fixed_dictionaries({}, optional=fields)
    # at the top, one or two fields over a valid request: every other field parses, so each mutation is reached
    one_field = st.sampled_from(sorted(fields)).flatmap(lambda name: fields[name].map(lambda value: (name, value)))
    return st.lists(one_field, min_size=1, max_size=2).map(dict)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.one_of(
    schema_shaped(chat_pb2.ChatCompletionRequest.DESCRIPTOR).map(
        lambda fields: ("/v1/chat/completions", {"messages": MESSAGES, **fields})),
    schema_shaped(completion_pb2.CompletionRequest.DESCRIPTOR).map(
        lambda fields: ("/v1/completions", {"prompt": "Hi", **fields})),
    schema_shaped(responses_pb2.CreateResponseRequest.DESCRIPTOR).map(
        lambda fields: ("/v1/responses", {"input": "Hi", **fields}))))
def test_property_schema_shaped_bodies_get_one_verdict(http, stack, case):
    path, body = case
    limit = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
    body = {**body, "model": stack.model, limit: 1}
    body.pop("stream", None)
    unary, streamed = verdicts(http, body, path)
    assert unary == streamed, f"{path} {body}: transcoder {unary} vs bridge {streamed}"


@pytest.fixture(scope="module")
def grpc_stub(stack):
    with grpc.insecure_channel(stack.grpc_address) as channel:
        yield generation_service_pb2_grpc.GenerationServiceStub(channel)


_GRPC_CASES = [("CreateChatCompletion", chat_pb2.ChatCompletionRequest, {"messages": MESSAGES}),
               ("CreateCompletion", completion_pb2.CompletionRequest, {"prompt": "Hi"}),
               ("CreateResponse", responses_pb2.CreateResponseRequest, {"input": "Hi"})]


def _grpc_request(message_type, base: dict, fields: dict, model: str):
    """A one-token request of `message_type`: `base` (what makes it valid), then `fields` over it."""
    limit = "max_output_tokens" if message_type is responses_pb2.CreateResponseRequest else "max_tokens"
    return json_format.ParseDict({**base, **fields, "model": model, limit: 1}, message_type())


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(_GRPC_CASES).flatmap(
    lambda c: schema_shaped(c[1].DESCRIPTOR).map(lambda fields: (c, fields))))
def test_property_grpc_errors_are_precise(grpc_stub, stack, case):
    """Native gRPC with the same schema-shaped requests (those protobuf can hold at all): OK or a precise status
    carrying google.rpc details, never INTERNAL or UNKNOWN."""
    (method, message_type, base), fields = case
    try:
        request = _grpc_request(message_type, base, fields, stack.model)
    except (json_format.ParseError, ValueError, TypeError, OverflowError):
        return  # not a message a gRPC client can send
    request.ClearField("stream")
    try:
        getattr(grpc_stub, method)(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (fields, error.details())
        status = rpc_status.from_call(error)
        assert status is not None and status.details, (fields, error.code(), error.details())


_NON_FINITE_CASES = [  # (method, request fields, the field the refusal names)
    ("CreateChatCompletion", {"tool_choice": math.inf}, "tool_choice"),
    ("CreateChatCompletion", {"messages": [{"role": "user", "content": math.nan}]}, "messages[0].content"),
    ("CreateChatCompletion", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "maximum": -math.inf}}}]}, "tools[0]"),
    ("CreateChatCompletion", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "minimum": math.nan}}}}, "response_format"),
    ("CreateCompletion", {"prompt": [1.0, math.inf]}, "prompt"),
    ("CreateResponse", {"tool_choice": math.inf}, "tool_choice"),
    ("CreateResponse", {"input": [{"role": "user", "content": math.inf}]}, "input"),
    ("CreateResponse", {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"maximum": math.inf}}}},
     "text.format"),
]


@pytest.mark.parametrize("method,fields,field", _NON_FINITE_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_grpc_non_finite_numbers_in_json_fields_are_invalid_argument(grpc_stub, stack, method, fields, field):
    """A gRPC client can put NaN or Infinity in a google.protobuf.Value; JSON cannot hold them, and converting them
    was a ValueError (INTERNAL), found by the property above: now INVALID_ARGUMENT naming the field."""
    message_type, base = next((t, b) for m, t, b in _GRPC_CASES if m == method)
    request = _grpc_request(message_type, base, fields, stack.model)
    with pytest.raises(grpc.RpcError) as caught:
        getattr(grpc_stub, method)(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "NaN or Infinity" in caught.value.details() and field in caught.value.details(), caught.value.details()
    status = rpc_status.from_call(caught.value)
    assert status is not None and status.details


def _dashscope_bodies() -> st.SearchStrategy:
    from genrpc.bridge.dashscope import BRIDGE_PARAMS, CHAT_ONLY_PARAMS, COMMON_PARAMS, OFF_SWITCHES

    names = sorted({*BRIDGE_PARAMS, *CHAT_ONLY_PARAMS, *COMMON_PARAMS, *OFF_SWITCHES, "top_k", "stop"}
                   - {"max_tokens", "n"})
    message = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", "system", "assistant",
                                                                                    "tool"]), json_leaf),
                                                  "content": json_value, "name": json_leaf,
                                                  "tool_calls": json_value, "tool_call_id": json_leaf})
    inputs = st.one_of(st.fixed_dictionaries({"messages": st.one_of(st.lists(message, min_size=1, max_size=3),
                                                                    json_value)}),
                       st.fixed_dictionaries({"prompt": st.one_of(st.just("Hi"), json_leaf)}), json_value)
    parameters = st.dictionaries(st.sampled_from(names), json_value, max_size=3)
    return st.tuples(inputs, parameters, st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_dashscope_bodies())
def test_property_dashscope_bodies_are_answered_in_its_shape(http, stack, case):
    inputs, parameters, sse = case
    body = {"model": stack.model, "input": inputs, "parameters": {**parameters, "max_tokens": 1}}
    if any(isinstance(v, float) and not math.isfinite(v) for v in parameters.values()):
        return
    response = http.post(DASHSCOPE_PATH, content=json.dumps(body), headers={
        "content-type": "application/json", **({"x-dashscope-sse": "enable"} if sse else {})})
    check_dashscope_error(response, f"sse={sse} {body}")


# Last: the longest (every field x every bad value, on both paths).
@pytest.mark.parametrize("field", FIELDS)
def test_type_confusion_every_field(http, stack, field):
    for value in BAD_VALUES:
        if field == "max_tokens" and value is None:
            continue  # no max_tokens at all: generates up to max_tokens_limit (test_max_tokens_limit covers it)
        body = {"model": stack.model, "messages": MESSAGES, "max_tokens": 1, field: value}
        unary, streamed = verdicts(http, body)
        assert unary == streamed, f"{field}={value!r}: transcoder {unary} vs bridge {streamed}"
