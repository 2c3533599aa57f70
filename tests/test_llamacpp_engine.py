"""The llama.cpp engine (the default) with the real bundled GGUF: every sampling field, logprobs, constraints,
UTF-8, cancellation, the bounded queue, start-up errors, and a service process without torch."""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import subprocess
import sys
import time

import pytest

from genrpc.settings import Settings
from genrpc.service.constraints import forced_tool_call_grammar
from genrpc.service.engines.base import (Engine, EngineOverloaded, EngineUnsupported, FinishReason, GenerationDelta,
                                         GenerationRequest, SamplingParams, Tokenizer)
from genrpc.service.engines.gguf_files import bundled_gguf_path
from genrpc.service.engines.factory import llamacpp_config
from genrpc.service.engines.llamacpp import LlamaCppEngine, LlamaCppEngineConfig
from genrpc.service.engines.llamacpp.grammar import gbnf_from_xgrammar
from genrpc.service.engines.llamacpp.tokenizer import NotAChatModelError

SLOTS = 3
MAX_QUEUE = 2
STORY = "Write a long story about a dragon who learns to cook."
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}


@pytest.fixture(scope="module")
async def engine():
    eng = LlamaCppEngine(llamacpp_config(Settings(max_batch_size=SLOTS, max_queue=MAX_QUEUE)))
    await eng.start()
    yield eng
    await eng.shutdown()


def chat(engine: LlamaCppEngine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


async def collect(engine: LlamaCppEngine, prompt: list[int], **sampling) -> list[GenerationDelta]:
    sampling.setdefault("max_tokens", 16)
    request = GenerationRequest(f"t-{time.monotonic_ns()}", prompt, SamplingParams(**sampling))
    return [d async for d in engine.generate(request)]


def ids(deltas: list[GenerationDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text(deltas: list[GenerationDelta]) -> str:
    return "".join(d.text for d in deltas)


async def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# ---- protocol, counting, finish reasons -------------------------------------------------------------------

def test_protocol_and_model_info(engine: LlamaCppEngine) -> None:
    assert isinstance(engine, Engine) and isinstance(engine.tokenizer, Tokenizer)
    assert engine.model_info.context_length_tokens == 8192  # SmolLM2's context_length from the GGUF
    assert engine.model_info.fingerprint.startswith("llamacpp-")
    assert engine.tokenizer.vocab_size == 49152


async def test_greedy_deterministic_and_counted(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, STORY)
    first, second = await collect(engine, prompt, max_tokens=20, temperature=0, ignore_eos=True), \
        await collect(engine, prompt, max_tokens=20, temperature=0, ignore_eos=True)
    assert ids(first) == ids(second) and len(ids(first)) == 20
    assert [d.completion_tokens for d in first][-1] == 20 and first[-1].finish_reason is FinishReason.LENGTH
    assert text(first) == engine.tokenizer.decode(ids(first))
    assert first[-1].prompt_tokens == len(prompt)
    assert second[-1].cached_prompt_tokens > 0  # llama.cpp reused the slot's KV for the same prompt


async def test_eos_is_stop(engine: LlamaCppEngine) -> None:
    deltas = await collect(engine, chat(engine, "Say hi."), max_tokens=300, temperature=0)
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].completion_tokens < 300


@pytest.mark.parametrize("logprobs", [None, 0], ids=["ids-recovered", "ids-reported"])
async def test_utf8_never_split_and_every_token_counted(engine: LlamaCppEngine, logprobs: int | None) -> None:
    # A rare character is several byte-level tokens of partial UTF-8 in SmolLM2's 49k vocabulary; a grammar makes
    # the model write it, so tokens that end mid-character are certain.
    rare = "龘"
    assert len(engine.tokenizer.encode(rare)) > 1
    deltas = await collect(engine, chat(engine, "Write a Chinese character."), max_tokens=40, temperature=0,
                           ebnf=f'root ::= "{rare * 3}"', logprobs=logprobs)
    assert text(deltas) == rare * 3 and deltas[-1].finish_reason is FinishReason.STOP
    for d in deltas:
        assert "\ufffd" not in d.text  # no split multi-byte character
    assert any(len(d.token_ids) > 1 for d in deltas)  # tokens merged until their character completed
    assert engine.tokenizer.decode(ids(deltas)) == rare * 3  # every token id recovered
    # Every token is counted; without logprobs the end-of-generation token (no text) has no recovered id.
    assert deltas[-1].completion_tokens == len(ids(deltas)) + (1 if logprobs is None else 0)


# ---- sampling fields --------------------------------------------------------------------------------------

async def test_seed_reproducible_and_seeds_differ(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, STORY)
    # One at a time: llama.cpp is not batch invariant, so a seed reproduces a sample for the same batch mix only.
    runs = [await collect(engine, prompt, max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in (7, 7, 8)]
    assert text(runs[0]) == text(runs[1]) and text(runs[0]) != text(runs[2])


async def test_top_k_1_equals_greedy(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, STORY)
    greedy = await collect(engine, prompt, temperature=0, ignore_eos=True)
    sampled = await collect(engine, prompt, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    assert ids(sampled) == ids(greedy)


async def test_truncation_samplers_keep_picks_in_bounds(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, STORY)
    for fields, ok in (({"top_k": 3}, lambda lp, top: lp >= top[2][1] - 1e-3),
                       ({"min_p": 0.3}, lambda lp, top: lp >= top[0][1] - 1.204 - 1e-3),  # ln(0.3)
                       ({"top_p": 0.5}, lambda lp, top: sum(2.718281828 ** t for _, t in top if t > lp + 1e-3)
                        < 0.5 + 1e-3)):
        deltas = await collect(engine, prompt, max_tokens=24, temperature=1.0, seed=5, logprobs=20,
                               ignore_eos=True, **fields)
        for d in deltas:
            for item in d.logprobs:
                assert ok(item.logprob, item.top), (fields, item)


async def test_logit_bias_forces_and_bans(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, STORY)
    bang = engine.tokenizer.encode("!")[0]
    forced = await collect(engine, prompt, max_tokens=5, temperature=0, logit_bias={bang: 100.0})
    assert text(forced) == "!!!!!"
    greedy = await collect(engine, prompt, max_tokens=4, temperature=0)
    banned = await collect(engine, prompt, max_tokens=4, temperature=0, logit_bias={ids(greedy)[0]: -100.0})
    assert ids(banned)[0] != ids(greedy)[0]


async def test_penalties_reduce_repetition(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, "Write the word hello twenty times, separated by spaces.")
    plain = text(await collect(engine, prompt, max_tokens=40, temperature=0)).lower().count("hello")
    for field, value in (("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 1.8)):
        penalised = text(await collect(engine, prompt, max_tokens=40, temperature=0, **{field: value}))
        assert penalised.lower().count("hello") < plain, field


async def test_logprobs_are_natural_logs_with_sorted_alternatives(engine: LlamaCppEngine) -> None:
    deltas = await collect(engine, chat(engine, STORY), max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    items = [item for d in deltas for item in d.logprobs]
    assert [i.token_id for i in items] == ids(deltas)  # English: one token per delta, each with its logprob
    for item in items:
        assert item.logprob <= 0 and len(item.top) == 3
        assert [lp for _, lp in item.top] == sorted((lp for _, lp in item.top), reverse=True)
        assert item.top[0][0] == item.token_id and abs(item.top[0][1] - item.logprob) < 1e-6  # greedy
        assert sum(2.718281828 ** lp for _, lp in item.top) <= 1 + 1e-4
    no_logprobs = await collect(engine, chat(engine, STORY), max_tokens=4, temperature=0)
    assert all(not d.logprobs for d in no_logprobs)


async def test_stop_token_ids_end_with_stop(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, STORY)
    greedy = ids(await collect(engine, prompt, max_tokens=12, temperature=0, ignore_eos=True))
    stop_at = next(i for i, t in enumerate(greedy) if i >= 3 and t not in greedy[:i])
    deltas = await collect(engine, prompt, max_tokens=12, temperature=0, stop_token_ids=(greedy[stop_at],))
    assert ids(deltas) == greedy[:stop_at + 1] and deltas[-1].finish_reason is FinishReason.STOP
    assert text(deltas) == engine.tokenizer.decode(greedy[:stop_at])  # the stop token's text is not output


async def test_ignore_eos_and_min_tokens(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, "Say hi.")
    short = await collect(engine, prompt, max_tokens=300, temperature=0)
    n = short[-1].completion_tokens
    forced = await collect(engine, prompt, max_tokens=n + 10, temperature=0, ignore_eos=True)
    assert forced[-1].completion_tokens == n + 10 and forced[-1].finish_reason is FinishReason.LENGTH
    # min_tokens == max_tokens is ignore_eos; below it llama.cpp has no equivalent: refused, naming the field.
    at_max = await collect(engine, prompt, max_tokens=n + 5, temperature=0, min_tokens=n + 5)
    assert at_max[-1].completion_tokens == n + 5
    with pytest.raises(EngineUnsupported) as caught:
        await collect(engine, prompt, max_tokens=n + 40, temperature=0, min_tokens=n + 5)
    assert caught.value.field == "min_tokens"


async def test_top_a_is_refused_naming_it(engine: LlamaCppEngine) -> None:
    with pytest.raises(EngineUnsupported) as caught:
        await collect(engine, chat(engine, STORY), top_a=0.5)
    assert caught.value.field == "top_a"


# ---- constrained decoding -----------------------------------------------------------------------------------

async def test_json_schema_output_validates(engine: LlamaCppEngine) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "confidence": {"type": "integer", "minimum": 0, "maximum": 10}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    for seed in (1, 2, 3):
        deltas = await collect(engine, chat(engine, "Is Paris in France? Answer in JSON."), max_tokens=100,
                               temperature=1.0, seed=seed, json_schema=json.dumps(schema))
        data = json.loads(text(deltas))
        assert set(data) == {"answer", "confidence"} and data["answer"] in ("yes", "no")
        assert isinstance(data["confidence"], int) and 0 <= data["confidence"] <= 10


async def test_forced_tool_call_grammar(engine: LlamaCppEngine) -> None:
    ebnf = forced_tool_call_grammar([WEATHER_TOOL], parallel=True)
    for seed in (1, 2):
        deltas = await collect(engine, chat(engine, "What's the weather in Paris?"), max_tokens=300,
                               temperature=1.0, seed=seed, ebnf=ebnf)
        calls = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text(deltas), re.S)
        assert calls and deltas[-1].finish_reason is FinishReason.STOP
        for call in calls:
            data = json.loads(call)
            assert data["name"] == "get_weather" and data["arguments"]["unit"] in ("celsius", "fahrenheit")


def test_gbnf_conversion_spells_xgrammar_the_gbnf_way() -> None:
    gbnf = gbnf_from_xgrammar('root ::= ((a_b{0, -1} "x_y" [^\\0-\\x1f]))\n'
                              'a_b ::= (("\\"") | ("q" a_b)) (=([ \\n]* [,}\\]:]))\n')
    assert gbnf == 'root ::= ((a-b{0,} "x_y" [^\\x00-\\x1f]))\na-b ::= (("\\"") | ("q" a-b))\n'


# ---- cancellation and the queue -----------------------------------------------------------------------------

async def test_cancel_frees_slot_within_a_step(engine: LlamaCppEngine) -> None:
    await wait_for(lambda: engine.running_requests == 0)
    stream = engine.generate(GenerationRequest("cancel-me", chat(engine, STORY),
                                               SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)))
    await anext(stream)
    await anext(stream)
    assert engine.running_requests == 1
    await stream.aclose()
    await wait_for(lambda: engine.running_requests == 0, timeout=10)


async def test_task_cancel_frees_slot(engine: LlamaCppEngine) -> None:
    task = asyncio.create_task(collect(engine, chat(engine, STORY), max_tokens=2000, ignore_eos=True))
    await wait_for(lambda: engine.running_requests == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: engine.running_requests == 0, timeout=10)


async def test_queue_bounded_by_max_queue(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, STORY)
    started = asyncio.Event()

    async def hold() -> None:
        async for _ in engine.generate(GenerationRequest(f"hold-{time.monotonic_ns()}", prompt,
                                                         SamplingParams(max_tokens=4000, ignore_eos=True))):
            started.set()

    holders = [asyncio.create_task(hold()) for _ in range(SLOTS + MAX_QUEUE)]
    try:
        await wait_for(lambda: engine.running_requests == SLOTS and engine.waiting_requests == MAX_QUEUE)
        with pytest.raises(EngineOverloaded):
            await collect(engine, prompt)
    finally:
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    await wait_for(lambda: engine.running_requests == 0 and engine.waiting_requests == 0)
    assert len(ids(await collect(engine, prompt, max_tokens=3, ignore_eos=True))) == 3  # still serving


# ---- start-up errors and the service process ----------------------------------------------------------------

async def test_missing_gguf_is_a_clear_start_error(tmp_path: pathlib.Path) -> None:
    engine = LlamaCppEngine(LlamaCppEngineConfig(gguf_path=tmp_path / "nope.gguf", cache_dir=tmp_path,
                                                 model_id="m"))
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        await engine.start()


async def test_gguf_without_chat_template_is_refused(tmp_path: pathlib.Path) -> None:
    plain = tmp_path / "plain.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(bundled_gguf_path()), str(plain),
                    "--remove-metadata", "tokenizer.chat_template", "--force"], check=True, capture_output=True)
    engine = LlamaCppEngine(LlamaCppEngineConfig(gguf_path=plain, cache_dir=tmp_path, model_id="m"))
    with pytest.raises(NotAChatModelError, match="no chat template"):
        await engine.start()


def test_serve_with_missing_model_exits_with_the_reason(tmp_path: pathlib.Path) -> None:
    result = subprocess.run([sys.executable, "-m", "genrpc.cli", "serve", "--model", str(tmp_path / "nope.gguf"),
                             "--grpc-port", "0", "--metrics-port", "-1"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "model not found" in result.stderr and "nope.gguf" in result.stderr


def test_engine_process_does_not_import_torch() -> None:
    """With the default engine, the service process stays torch-free (fast start, small RSS)."""
    code = ("import asyncio, re, sys\n"
            "from genrpc.settings import Settings\n"
            "from genrpc.service.server import build_engine\n"
            "engine = build_engine(Settings())\n"
            "asyncio.run(engine.start())\n"
            "print(int('torch' in sys.modules), int('transformers' in sys.modules),"
            " int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    torch_loaded, transformers_loaded, rss_mb = map(int, result.stdout.split()[-3:])
    assert (torch_loaded, transformers_loaded) == (0, 0)
    assert rss_mb < 400, rss_mb


def test_llama_server_http_listener_is_closed(engine: LlamaCppEngine) -> None:
    """xllamacpp also starts llama-server's HTTP listener on a loopback port; the engine's random API key keeps
    it from serving anyone (genrpc's only entry points are gRPC and Envoy)."""
    import httpx

    address = engine._server.listening_address
    assert address.startswith("http://127.0.0.1:")
    assert httpx.post(f"{address}/completion", json={"prompt": "hi", "n_predict": 2}, timeout=30).status_code == 401
    assert httpx.get(f"{address}/slots", timeout=30).status_code == 401
