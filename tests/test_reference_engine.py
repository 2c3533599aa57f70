"""The CPU engine with the real bundled model: batching, identity, sampling, cancellation, limits, model cache."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import time

import pytest

from genrpc.settings import Settings
from genrpc.service.engines.base import (Engine, EngineBadRequest, EngineInternalError, EngineOverloaded,
                                         EngineUnavailable, FinishReason, GenerationDelta, GenerationRequest,
                                         SamplingParams)
from genrpc.service.engines.factory import reference_config
from genrpc.service.engines.reference.engine import ReferenceEngine
from genrpc.service.engines.reference.model_store import resolve_model_dir

MAX_BATCH = 8
# Prompts that make the model talk for well over 32 tokens, so greedy comparisons cover all 32.
PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how photosynthesis works in detail.",
    "List ten interesting facts about the ocean.",
    "Describe the history of the Roman Empire.",
    "Give me a recipe for chocolate chip cookies.",
    "Why is the sky blue? Explain like I'm five.",
    "Write a poem about autumn leaves falling.",
    "What are the benefits of learning a second language?",
]


@pytest.fixture(scope="module")
async def engine():
    eng = ReferenceEngine(reference_config(Settings(max_batch_size=MAX_BATCH, max_queue=1)))
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest.fixture(scope="module")
def prompts(engine: ReferenceEngine) -> list[list[int]]:
    return [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture(scope="module")
async def alone_runs(engine: ReferenceEngine, prompts: list[list[int]]) -> list[list[GenerationDelta]]:
    """Each prompt's greedy 32 tokens (with the logprob of each), run strictly one at a time."""
    return [await collect(engine, p, max_tokens=32, logprobs=0) for p in prompts]


@pytest.fixture(scope="module")
def alone(alone_runs: list[list[GenerationDelta]]) -> list[list[int]]:
    return [_tokens(deltas) for deltas in alone_runs]


def request(prompt: list[int], max_tokens: int = 32, **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(request_id=f"test-{time.monotonic_ns()}", prompt_token_ids=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, **sampling))


async def collect(engine: ReferenceEngine, prompt: list[int], delay: float = 0.0, **kw) -> list[GenerationDelta]:
    await asyncio.sleep(delay)
    return [d async for d in engine.generate(request(prompt, **kw))]


def _tokens(deltas: list[GenerationDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_protocol_and_model_info(engine: ReferenceEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.model_info.model_id == "smollm2-135m-instruct"
    assert engine.model_info.context_length_tokens == 8192  # SmolLM2's max_position_embeddings
    assert engine.tokenizer.eos_token_ids  # <|im_end|>


async def test_batched_greedy_matches_alone(engine: ReferenceEngine, prompts, alone, alone_runs) -> None:
    assert all(len(a) == 32 for a in alone)
    # Half start together, the rest join a running batch a little later (merge with left padding).
    runs = [collect(engine, p, delay=0.0 if i < 4 else 0.15 * (i - 3), logprobs=0) for i, p in enumerate(prompts)]
    batched = await asyncio.gather(*runs)
    for i, deltas in enumerate(batched):
        assert _tokens(deltas) == alone[i], f"prompt {i} diverged from its alone run"
        # Bit-identical numbers, not just the same argmax (see invariance.py).
        assert [d.logprobs[0].logprob for d in deltas] == [d.logprobs[0].logprob for d in alone_runs[i]]
        assert "".join(d.text for d in deltas) == engine.tokenizer.decode(alone[i])
        assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert engine.max_batch_size_seen > 1
    await wait_for(lambda: engine.running_requests == 0)  # rows leave the batch just after their last delta


async def test_cancel_mid_stream_frees_slot_and_spares_others(engine: ReferenceEngine, prompts, alone) -> None:
    others = [asyncio.create_task(collect(engine, p)) for p in prompts[1:4]]
    stream = engine.generate(request(prompts[0], max_tokens=200))
    for _ in range(5):
        await anext(stream)
    assert engine.running_requests == 4
    await stream.aclose()
    results = await asyncio.gather(*others)
    await wait_for(lambda: engine.running_requests == 0)
    assert [_tokens(r) for r in results] == alone[1:4]


async def test_task_cancel_frees_slot(engine: ReferenceEngine, prompts) -> None:
    task = asyncio.create_task(collect(engine, prompts[0], max_tokens=500))
    await wait_for(lambda: engine.running_requests == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: engine.running_requests == 0, timeout=5)


async def test_seed_reproducibility(engine: ReferenceEngine, prompts) -> None:
    def sampled(seed: int) -> list[int]:
        return collect(engine, prompts[6], max_tokens=16, temperature=1.0, top_p=0.95, seed=seed)

    first, again, other, beside_greedy = await asyncio.gather(
        sampled(1234), sampled(1234), sampled(99), collect(engine, prompts[2]))
    assert _tokens(first) == _tokens(again)
    assert _tokens(first) != _tokens(other)
    alone_first = await sampled(1234)  # same seed alone, without batch neighbours
    assert _tokens(alone_first) == _tokens(first)


async def test_eos_is_stop_and_max_tokens_is_length(engine: ReferenceEngine) -> None:
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    deltas = await collect(engine, prompt, max_tokens=100)
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert deltas[-1].token_ids[0] in engine.tokenizer.eos_token_ids
    assert deltas[-1].completion_tokens == len(deltas) < 100
    assert "Paris" in "".join(d.text for d in deltas)
    assert all(d.finish_reason is None for d in deltas[:-1])

    deltas = await collect(engine, prompt, max_tokens=3)
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert deltas[-1].completion_tokens == len(_tokens(deltas)) == 3
    assert deltas[-1].prompt_tokens == len(prompt)

    # An extra stop id (the first greedy token) ends the request at once.
    first = _tokens(deltas)[0]
    deltas = await collect(engine, prompt, max_tokens=10, stop_token_ids=(first,))
    assert [d.finish_reason for d in deltas] == [FinishReason.STOP]


async def test_sampling_extras(engine: ReferenceEngine) -> None:
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    deltas = await collect(engine, prompt, max_tokens=12, ignore_eos=True)
    assert deltas[-1].finish_reason is FinishReason.LENGTH and deltas[-1].completion_tokens == 12
    assert engine.tokenizer.eos_token_ids & set(_tokens(deltas))  # went past EOS

    deltas = await collect(engine, prompt, max_tokens=4, min_tokens=4)
    assert not engine.tokenizer.eos_token_ids & set(_tokens(deltas[:3]))

    forced = engine.tokenizer.encode(" banana")[0]
    deltas = await collect(engine, prompt, max_tokens=3, logit_bias={forced: 100.0}, logprobs=2)
    assert _tokens(deltas) == [forced] * 3
    for d in deltas:
        (lp,) = d.logprobs
        assert lp.token_id == forced and lp.logprob <= 0 and len(lp.top) == 2


async def test_queued_request_cancelled_never_runs_and_queue_limit(engine: ReferenceEngine, prompts) -> None:
    admitted = engine.admitted_requests
    full = [asyncio.create_task(collect(engine, p, max_tokens=24)) for p in prompts]
    await wait_for(lambda: engine.running_requests == MAX_BATCH)
    queued = asyncio.create_task(collect(engine, prompts[0]))
    await wait_for(lambda: engine.waiting_requests == 1)
    with pytest.raises(EngineOverloaded):  # max_queue=1 in this fixture
        await collect(engine, prompts[1])
    queued.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await queued
    assert engine.waiting_requests == 0
    await asyncio.gather(*full)
    await wait_for(lambda: engine.running_requests == 0)
    assert engine.admitted_requests - admitted == MAX_BATCH


async def test_worker_error_fails_request_then_recovers(engine: ReferenceEngine, prompts, alone) -> None:
    batch = engine._batch
    real_step = batch.decode_step

    def broken_step():
        batch.decode_step = real_step  # fail once
        raise RuntimeError("injected")

    batch.decode_step = broken_step
    with pytest.raises(EngineInternalError, match="generation failed: RuntimeError: injected$") as info:
        await collect(engine, prompts[0])
    assert isinstance(info.value.__cause__, RuntimeError)
    await wait_for(lambda: engine.running_requests == 0)
    assert _tokens(await collect(engine, prompts[0])) == alone[0]


async def test_prompt_longer_than_context_is_rejected(engine: ReferenceEngine) -> None:
    with pytest.raises(EngineBadRequest, match="context"):
        await collect(engine, [1] * engine.model_info.context_length_tokens)


def test_streaming_detokeniser_keeps_utf8_and_spaces(engine: ReferenceEngine) -> None:
    text = "Héllo  wörld, 世界 🙂 ends with space "
    ids = engine.tokenizer.encode(text)
    stream = engine.tokenizer.decode_stream()
    pieces = [stream.step(engine.tokenizer.backend, i) for i in ids]
    assert "".join(p for p in pieces if p) == text
    assert all("\ufffd" not in p for p in pieces if p)


def test_model_store_reuses_conversion(engine: ReferenceEngine) -> None:
    settings = Settings()
    t0 = time.perf_counter()
    first = resolve_model_dir(settings.model, settings.cache_dir)
    assert time.perf_counter() - t0 < 1.0  # the conversion was done by the engine fixture: no-op now
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert resolve_model_dir(settings.model, settings.cache_dir) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(mtimes)
    assert first.parent == settings.cache_dir and first.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert not list(first.parent.glob(".tmp-*"))
    # A directory is used as is.
    assert resolve_model_dir(str(first), settings.cache_dir) == first


def test_model_store_rejects_missing_model(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(str(tmp_path / "nope.gguf"), tmp_path)


# --- constrained decoding (xgrammar) -------------------------------------------------------------------------

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "paid": {"type": "boolean"},
        "customer": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16},
                           "country": {"type": "string", "enum": ["FR", "DE", "US"]}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "paid", "customer"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def check_schema(schema: dict, value, path: str = "$") -> None:
    """Validates the JSON Schema features the tests use (type, enum, const, properties, items, bounds)."""
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != {schema['const']!r}"
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{path}: not an object"
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(value), f"{path}: missing {schema.get('required')}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra keys {set(value) - set(props)}"
        for key, sub in props.items():
            if key in value:
                check_schema(sub, value[key], f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list), f"{path}: not an array"
        assert len(value) <= schema.get("maxItems", len(value))
        for i, item in enumerate(value):
            check_schema(schema.get("items", {}), item, f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), f"{path}: not a string"
        assert len(value) <= schema.get("maxLength", len(value))
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: not an integer"
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value)
    elif kind == "boolean":
        assert isinstance(value, bool), f"{path}: not a boolean"


def _chat(engine: ReferenceEngine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def _text(deltas: list[GenerationDelta]) -> str:
    return "".join(d.text for d in deltas)


async def test_json_schema_output_always_validates(engine: ReferenceEngine) -> None:
    person = _chat(engine, "Describe a fictional person as JSON.")
    order = _chat(engine, "Give me an example shop order as JSON.")
    any_object = _chat(engine, 'Return a JSON object with the keys "name" and "age" for a cat.')
    cases = [(person, PERSON_SCHEMA, seed) for seed in (1, 2, 3)] + \
            [(order, ORDER_SCHEMA, seed) for seed in (4, 5, 6)] + \
            [(any_object, {"type": "object"}, seed) for seed in (7, 8)]  # json_object
    runs = await asyncio.gather(*[
        collect(engine, prompt, max_tokens=80, temperature=1.0, seed=seed, json_schema=json.dumps(schema))
        for prompt, schema, seed in cases])
    for (_, schema, seed), deltas in zip(cases, runs, strict=True):
        text = _text(deltas)
        assert deltas[-1].finish_reason is FinishReason.STOP, (seed, text)
        assert deltas[-1].token_ids[0] in engine.tokenizer.eos_token_ids  # only EOS follows a complete value
        value = json.loads(text)
        check_schema(schema, value)
        assert isinstance(value, dict)


async def test_greedy_json_and_max_tokens_is_length(engine: ReferenceEngine) -> None:
    prompt = _chat(engine, "Describe a fictional person as JSON.")
    deltas = await collect(engine, prompt, max_tokens=80, json_schema=json.dumps(PERSON_SCHEMA), logprobs=0)
    assert deltas[-1].finish_reason is FinishReason.STOP
    check_schema(PERSON_SCHEMA, json.loads(_text(deltas)))
    assert all(d.logprobs[0].logprob <= 0 for d in deltas)
    # Out of tokens first: LENGTH with a valid prefix (completing it is the client's business, as in OpenAI).
    short = await collect(engine, prompt, max_tokens=5, json_schema=json.dumps(PERSON_SCHEMA))
    assert short[-1].finish_reason is FinishReason.LENGTH and short[-1].completion_tokens == 5
    assert _text(deltas).startswith(_text(short))


async def test_forced_tool_call_grammar(engine: ReferenceEngine) -> None:
    from genrpc.service.constraints import forced_tool_call_grammar

    grammar = forced_tool_call_grammar([WEATHER_TOOL], parallel=False)
    prompt = _chat(engine, "What is the weather like in Paris today?")
    runs = await asyncio.gather(*[collect(engine, prompt, max_tokens=64, temperature=1.0, seed=seed, ebnf=grammar)
                                  for seed in (11, 12)])
    for deltas in runs:
        text = _text(deltas)
        assert deltas[-1].finish_reason is FinishReason.STOP, text
        assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>"), text
        call = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
        assert set(call) == {"name", "arguments"} and call["name"] == "get_weather"
        check_schema(WEATHER_TOOL["function"]["parameters"], call["arguments"])


async def test_constrained_row_leaves_batch_neighbours_unchanged(engine: ReferenceEngine, prompts, alone,
                                                                 alone_runs) -> None:
    constrained = collect(engine, _chat(engine, "Describe a fictional person as JSON."), max_tokens=40,
                          temperature=1.0, seed=3, json_schema=json.dumps(PERSON_SCHEMA))
    plain = [collect(engine, prompts[i], logprobs=0) for i in (0, 1, 2)]
    _, *results = await asyncio.gather(constrained, *plain)
    for i, deltas in zip((0, 1, 2), results, strict=True):
        assert _tokens(deltas) == alone[i]
        assert [d.logprobs[0].logprob for d in deltas] == [d.logprobs[0].logprob for d in alone_runs[i]]


async def test_bad_grammar_is_rejected(engine: ReferenceEngine) -> None:
    prompt = _chat(engine, "Hi")
    await wait_for(lambda: engine.running_requests == 0)  # the previous test's rows leave one step late
    with pytest.raises(EngineBadRequest, match="JSON schema") as info:
        await collect(engine, prompt, json_schema='{"type": "frobnicate"}')
    assert info.value.field == "response_format"
    with pytest.raises(EngineBadRequest, match="JSON schema"):
        await collect(engine, prompt, json_schema="{not json")
    with pytest.raises(EngineBadRequest, match="grammar") as info:
        await collect(engine, prompt, ebnf="root ::= undefined_rule")
    assert info.value.field == "tool_choice"
    with pytest.raises(EngineBadRequest):
        await collect(engine, prompt, json_schema="{}", ebnf='root ::= "a"')
    assert engine.running_requests == 0 and engine.waiting_requests == 0  # nothing was queued


async def test_min_tokens_yields_to_a_complete_grammar(engine: ReferenceEngine) -> None:
    deltas = await collect(engine, _chat(engine, "Say yes."), max_tokens=8, ebnf='root ::= "yes"', min_tokens=5)
    assert _text(deltas) == "yes" and deltas[-1].finish_reason is FinishReason.STOP


async def test_shutdown_fails_running_requests(engine: ReferenceEngine, prompts) -> None:
    """Runs last: it stops the module's engine."""
    task = asyncio.create_task(collect(engine, prompts[0], max_tokens=500))
    await wait_for(lambda: engine.running_requests == 1)
    await engine.shutdown()
    with pytest.raises(EngineUnavailable):
        await task
    with pytest.raises(EngineUnavailable):
        await collect(engine, prompts[0])
