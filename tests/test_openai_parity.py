"""OpenAI parity (issue 3) end to end: each request field's effect, shown with the real model through Envoy with
the official SDK in strict response-validation mode, and the same features over gRPC."""

from __future__ import annotations

import json
import math
from typing import Annotated

import grpc
import openai
import pydantic
import pytest
from google.protobuf import json_format
from tokenizers import Tokenizer

from genrpc.settings import Settings
from genrpc.v1 import chat_pb2, completion_pb2, generation_service_pb2_grpc

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a story about a robot."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
EPSILON = 1e-3  # logprob comparisons: float32 softmax vs log_softmax


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.openai_base_url, api_key="unused", max_retries=0, timeout=180,
                         _strict_response_validation=True)


@pytest.fixture(scope="module")
def tokenizer(stack):
    # The served engine's tokenizer (the llama.cpp engine's cached export of the GGUF vocabulary).
    from genrpc.service.engines.gguf_files import bundled_gguf_path
    from genrpc.service.engines.llamacpp.tokenizer import load_cached

    return load_cached(bundled_gguf_path(), Settings().cache_dir)[0].backend


def ask(client, stack, **fields):
    fields.setdefault("messages", QUESTION)
    return client.chat.completions.create(model=stack.model, **fields)


# ---- sampling -------------------------------------------------------------------------------------------

def test_logit_bias_bans_and_forces_tokens(client, stack, tokenizer):
    greedy = ask(client, stack, max_tokens=8, temperature=0).choices[0].message.content
    first = tokenizer.encode(greedy, add_special_tokens=False).ids[0]
    banned = ask(client, stack, max_tokens=8, temperature=0, logit_bias={str(first): -100}).choices[0].message.content
    assert tokenizer.encode(banned, add_special_tokens=False).ids[0] != first
    bang = tokenizer.token_to_id("!")
    forced = ask(client, stack, max_tokens=5, temperature=0, logit_bias={str(bang): 100}).choices[0].message.content
    assert forced == "!!!!!"


def test_top_k_1_equals_greedy(client, stack):
    greedy = ask(client, stack, max_tokens=16, temperature=0).choices[0].message.content
    for seed in (1, 2):
        sampled = ask(client, stack, max_tokens=16, temperature=1.0, seed=seed, extra_body={"top_k": 1})
        assert sampled.choices[0].message.content == greedy


def _check_every_token(reply, keep):
    tokens = reply.choices[0].logprobs.content
    assert tokens
    for token in tokens:
        top = [alt.logprob for alt in token.top_logprobs]
        assert keep(token.logprob, top), (token.token, token.logprob, top)


def test_truncation_samplers_only_pick_allowed_tokens(client, stack):
    """At temperature 1 the sampler's probabilities are the model's, which logprobs report: every picked token
    must pass the truncation rule it was sampled under."""
    common = dict(messages=STORY, max_tokens=24, temperature=1.0, logprobs=True, top_logprobs=20)
    _check_every_token(ask(client, stack, seed=3, extra_body={"top_k": 3}, **common),
                       lambda lp, top: lp >= top[2] - EPSILON)
    _check_every_token(ask(client, stack, seed=4, extra_body={"min_p": 0.3}, **common),
                       lambda lp, top: lp >= top[0] + math.log(0.3) - EPSILON)
    # top_a: llama.cpp (the default engine) has no top-a sampler, so it is refused naming the field (the reference
    # engine honours it: tests/test_reference_engine.py).
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, stack, seed=5, extra_body={"top_a": 0.5}, **common)
    assert refused.value.body["param"] == "top_a"

    def in_nucleus(lp, top):
        more_likely = sum(math.exp(t) for t in top if t > lp + EPSILON)
        return more_likely < 0.5 + EPSILON
    _check_every_token(ask(client, stack, seed=6, top_p=0.5, **common), in_nucleus)


def test_penalties_reduce_repetition(client, stack):
    prompt = [{"role": "user", "content": "Write the word hello twenty times, separated by spaces."}]
    plain = ask(client, stack, messages=prompt, max_tokens=40, temperature=0).choices[0].message.content
    for field in ("frequency_penalty", "presence_penalty"):
        penalised = ask(client, stack, messages=prompt, max_tokens=40, temperature=0, **{field: 2.0})
        assert penalised.choices[0].message.content.lower().count("hello") < plain.lower().count("hello"), field
    repeated = ask(client, stack, messages=prompt, max_tokens=40, temperature=0, extra_body={"repetition_penalty": 1.8})
    assert repeated.choices[0].message.content.lower().count("hello") < plain.lower().count("hello")


def test_ignore_eos_and_min_tokens(client, stack):
    short = ask(client, stack, messages=[{"role": "user", "content": "Say hi."}], max_tokens=200, temperature=0)
    assert short.choices[0].finish_reason == "stop"
    n = short.usage.completion_tokens
    forced = ask(client, stack, messages=[{"role": "user", "content": "Say hi."}], max_tokens=n + 10, temperature=0,
                 extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == n + 10 and forced.choices[0].finish_reason == "length"
    # llama.cpp (the default engine) has no minimum-length sampler: min_tokens = max_tokens is ignore_eos ...
    longer = ask(client, stack, messages=[{"role": "user", "content": "Say hi."}], max_tokens=n + 5, temperature=0,
                 extra_body={"min_tokens": n + 5})
    assert longer.usage.completion_tokens == n + 5
    # ... and a shorter minimum is refused naming the field (the reference engine honours it).
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, stack, max_tokens=n + 40, temperature=0, extra_body={"min_tokens": n + 5})
    assert refused.value.body["param"] == "min_tokens"


def test_n_choices_with_seed(client, stack):
    reply = ask(client, stack, messages=STORY, n=3, seed=11, max_tokens=12, temperature=1.0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1
    # Reproducing the same choices from the same seed across requests is the reference engine's guarantee
    # (bit-identical alone or batched); llama.cpp, the default engine, is not batch invariant.
    assert 3 <= reply.usage.completion_tokens <= 36  # summed over the three choices, 12 tokens at most each
    streamed = list(ask(client, stack, messages=STORY, n=3, seed=11, max_tokens=12, temperature=1.0, stream=True,
                        stream_options={"include_usage": True}))
    by_index = {i: "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
                for i in range(3)}
    assert all(by_index[i] for i in range(3))
    assert 3 <= streamed[-1].usage.completion_tokens <= 36


# ---- logprobs -------------------------------------------------------------------------------------------

def test_chat_logprobs_unary_and_streamed(client, stack):
    reply = ask(client, stack, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    text_tokens = [t for t in content if t.bytes and t.token not in ("<|im_end|>",)]
    assert "".join(t.token for t in text_tokens).startswith(reply.choices[0].message.content[:5])
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert abs(token.logprob - token.top_logprobs[0].logprob) < EPSILON  # greedy picks the top token
        assert bytes(token.bytes).decode("utf-8", errors="replace") == token.token
    chunks = list(ask(client, stack, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces = "".join(t.token for t in chunk.choices[0].logprobs.content)
            assert pieces == chunk.choices[0].delta.content


def test_completion_logprobs(client, stack):
    reply = client.completions.create(model=stack.model, prompt="The capital of France is", max_tokens=6,
                                      temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(len(alternatives) <= 3 for alternatives in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert "".join(logprobs.tokens) == reply.choices[0].text


# ---- structured output ----------------------------------------------------------------------------------

class CityAnswer(pydantic.BaseModel):
    # Bounded, so a completed answer always fits max_tokens: the grammar guarantees validity of what is
    # generated, and a bounded schema guarantees that generation completes.
    city: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population_millions: int = pydantic.Field(ge=0, le=100000)
    landmarks: list[Annotated[str, pydantic.Field(max_length=40)]] = pydantic.Field(max_length=3)


def test_parse_with_pydantic_schema(client, stack):
    for seed in (1, 2, 3, 4):
        completion = client.chat.completions.parse(model=stack.model, messages=QUESTION, response_format=CityAnswer,
                                                   temperature=1.0, seed=seed, max_tokens=400)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, CityAnswer), completion.choices[0].message.content
        # Keys come out in declaration order (strict schemas list every field in `required`, in order).
        assert list(json.loads(completion.choices[0].message.content)) == list(CityAnswer.model_fields)


def test_json_object_and_schema_with_enum(client, stack):
    # A grammar makes the output valid JSON once it is complete: ask for a short object, greedily, so it completes.
    reply = ask(client, stack, response_format={"type": "json_object"}, max_tokens=200, temperature=0,
                messages=[{"role": "user", "content": 'Reply with a JSON object like {"city": "Paris"}.'}])
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "confidence": {"type": "integer", "minimum": 0, "maximum": 10}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    for seed in (1, 2):
        reply = ask(client, stack, messages=[{"role": "user", "content": "Is Paris in France?"}], temperature=1.0,
                    seed=seed, max_tokens=100,
                    response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}})
        data = json.loads(reply.choices[0].message.content)
        assert set(data) == {"answer", "confidence"} and data["answer"] in ("yes", "no")
        assert isinstance(data["confidence"], int) and 0 <= data["confidence"] <= 10


# ---- tools ----------------------------------------------------------------------------------------------

WEATHER_QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]


def test_tool_choice_required_unary(client, stack):
    reply = ask(client, stack, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
                parallel_tool_calls=False, temperature=0, max_tokens=100)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert isinstance(arguments["city"], str) and arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert call.function.name == "get_time" and isinstance(arguments["timezone"], str)


def test_named_tool_choice_streamed(client, stack):
    chunks = list(ask(client, stack, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL, TIME_TOOL],
                      tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0,
                      max_tokens=100, stream=True))
    deltas = [d for c in chunks if c.choices and c.choices[0].delta.tool_calls for d in c.choices[0].delta.tool_calls]
    calls: dict[int, list] = {}
    for delta in deltas:
        calls.setdefault(delta.index, []).append(delta)
    assert sorted(calls) == list(range(len(calls))) and calls  # parallel calls are allowed by default
    for fragments in calls.values():
        first, *rest = fragments
        assert first.id and first.type == "function" and first.function.name == "get_time"
        assert all(d.id is None and d.function.name is None for d in rest)
        arguments = "".join(d.function.arguments or "" for d in fragments)
        assert isinstance(json.loads(arguments)["timezone"], str)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_round_trip(client, stack):
    reply = ask(client, stack, tools=[WEATHER_TOOL], temperature=0, max_tokens=40, messages=[
        *WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature_c": 21, "sky": "sunny"})}])
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > 100  # the tools section and the tool result are in the prompt


# ---- completions, content parts, context ----------------------------------------------------------------

def test_completions_prompt_forms_and_echo(client, stack, tokenizer):
    batch = client.completions.create(model=stack.model, prompt=["The capital of France is", "One, two, three,"],
                                      max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    alone = client.completions.create(model=stack.model, prompt="One, two, three,", max_tokens=4, temperature=0)
    assert batch.choices[1].text == alone.choices[0].text
    ids = tokenizer.encode("One, two, three,", add_special_tokens=False).ids
    by_tokens = client.completions.create(model=stack.model, prompt=ids, max_tokens=4, temperature=0)
    assert by_tokens.choices[0].text == alone.choices[0].text
    echoed = client.completions.create(model=stack.model, prompt="One, two, three,", max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "One, two, three," + alone.choices[0].text
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=stack.model, prompt="x", suffix="y")
    assert bad.value.body["param"] == "suffix"


def test_image_parts_refused_text_parts_accepted(client, stack):
    with pytest.raises(openai.BadRequestError) as bad:
        ask(client, stack, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    assert "does not accept images" in bad.value.message and bad.value.body["param"] == "messages[0].content[1]"
    parts = ask(client, stack, max_tokens=8, temperature=0, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]}])
    assert parts.choices[0].message.content == ask(client, stack, max_tokens=8, temperature=0).choices[0].message.content


def test_truncation_auto(client, stack):
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"Fact {i}: " + "the sky is blue and the grass is green. " * 60},
                    {"role": "assistant", "content": "Noted."}]
    history.append({"role": "user", "content": "What is the capital of France?"})
    max_tokens = 2048  # the server's ceiling; the whole history (~7k tokens) does not fit beside it in 8192
    with pytest.raises(openai.BadRequestError) as bad:
        ask(client, stack, messages=history, max_tokens=max_tokens)
    assert str(max_tokens) in bad.value.message
    reply = ask(client, stack, messages=history, max_tokens=max_tokens, temperature=0, stop=["\n"],
                extra_body={"truncation": "auto"})
    extra = reply.model_extra or {}
    assert extra.get("dropped_messages", 0) > 0
    assert reply.usage.prompt_tokens + max_tokens <= 8192


def test_field_policy(client, stack):
    harmless = ask(client, stack, max_tokens=4, temperature=0, user="u-1", metadata={"team": "a"}, store=False,
                   service_tier="auto", extra_body={"prompt_cache_key": "k"})
    assert harmless.choices[0].message.content
    for fields, param in (({"verbosity": "low"}, "verbosity"), ({"reasoning_effort": "low"}, "reasoning_effort"),
                          ({"modalities": ["text", "audio"]}, "modalities")):
        with pytest.raises(openai.BadRequestError) as bad:
            ask(client, stack, max_tokens=4, **fields)
        assert bad.value.body["param"] == param and param in bad.value.message


# ---- the same over gRPC ---------------------------------------------------------------------------------

async def test_grpc_parity(stack):
    async with grpc.aio.insecure_channel(stack.envoy_address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)

        def chat(**fields):
            body = {"model": stack.model, "messages": WEATHER_QUESTION, "temperature": 0, "max_tokens": 60, **fields}
            return json_format.ParseDict(body, chat_pb2.ChatCompletionRequest())

        forced = await stub.CreateChatCompletion(chat(tools=[WEATHER_TOOL], tool_choice="required",
                                                      parallel_tool_calls=False))
        call = forced.choices[0].message.tool_calls[0]
        assert forced.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["unit"] in ("celsius", "fahrenheit")
        chunks = [c async for c in stub.Chat(chat(n=2, seed=5, temperature=1.0, logprobs=True, top_logprobs=1,
                                                  max_tokens=6))]
        indexes = {c.choices[0].index for c in chunks if c.choices}
        assert indexes == {0, 1}
        with_logprobs = [c for c in chunks if c.choices and c.choices[0].delta.content]
        assert all(json_format.MessageToDict(c.choices[0].logprobs)["content"] for c in with_logprobs)
        # as over REST: a short object asked for, so the grammar-constrained output completes within max_tokens
        structured = await stub.CreateChatCompletion(chat(
            response_format={"type": "json_object"}, max_tokens=200,
            messages=[{"role": "user", "content": 'Reply with a JSON object like {"city": "Paris"}.'}]))
        assert structured.choices[0].finish_reason == "stop", structured.choices[0].message.content
        assert isinstance(json.loads(structured.choices[0].message.content.string_value), dict)
        batch = await stub.CreateCompletion(json_format.ParseDict(
            {"model": stack.model, "prompt": ["Hello", "Bye"], "max_tokens": 3, "n": 2, "seed": 1},
            completion_pb2.CompletionRequest()))
        assert [c.index for c in batch.choices] == [0, 1, 2, 3]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateChatCompletion(chat(verbosity="high"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_dashscope_route_with_the_real_model(stack):
    import httpx

    url = f"http://127.0.0.1:{stack.ports['envoy_port']}/api/v1/services/aigc/text-generation/generation"
    body = {"model": stack.model, "input": {"messages": QUESTION},
            "parameters": {"result_format": "message", "max_tokens": 12, "temperature": 0}}
    reply = httpx.post(url, json=body, timeout=120).json()
    openai_reply = httpx.post(f"{stack.openai_base_url}/chat/completions", timeout=120, json={
        "model": stack.model, "messages": QUESTION, "max_tokens": 12, "temperature": 0}).json()
    assert reply["output"]["choices"][0]["message"]["content"] == openai_reply["choices"][0]["message"]["content"]
    assert reply["usage"]["output_tokens"] == openai_reply["usage"]["completion_tokens"]
    with httpx.stream("POST", url, json={**body, "parameters": {**body["parameters"], "incremental_output": True}},
                      headers={"X-DashScope-SSE": "enable"}, timeout=120) as response:
        events = [e for e in response.read().decode().split("\n\n") if e.strip()]
    datas = [json.loads(line[5:]) for e in events for line in e.splitlines() if line.startswith("data:")]
    text = "".join(d["output"]["choices"][0]["message"]["content"] for d in datas)
    assert text == reply["output"]["choices"][0]["message"]["content"]
