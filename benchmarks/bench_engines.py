"""Engines side by side, in process, on the same GGUF and prompts: genrpc's llama.cpp engine against llama.cpp's
own server (xllamacpp's `handle_completions`, same server parameters), at 1 / 4 / 8 / 16 concurrent streams.

    .venv/bin/python benchmarks/bench_engines.py [--tokens 128] [--concurrency 1 4 8 16] [--with-reference]

Every stream generates exactly --tokens tokens (greedy, EOS ignored). Per row: median time to first token,
median per-stream decode rate (tokens after the first / time after the first), aggregate tokens/s (all tokens /
wall time), and the ratio genrpc / llama.cpp. `--with-reference` adds the torch reference engine (slow).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from dataclasses import dataclass

from genrpc.settings import Settings
from genrpc.service.engines.base import GenerationRequest, SamplingParams
from genrpc.service.engines.factory import llamacpp_config
from genrpc.service.engines.llamacpp import LlamaCppEngine, LlamaCppEngineConfig
from genrpc.service.engines.llamacpp.engine import server_params

USER_PROMPTS = [
    "What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
    "Give me a tip for learning Python.", "What is photosynthesis?", "Write a haiku about autumn.",
    "How many legs does a spider have?", "What does a CPU do?", "Explain gravity in one sentence.",
    "What is the boiling point of water?", "Suggest a name for a cat.", "What is 12 times 7?",
    "Who wrote Romeo and Juliet?", "What is a prime number?", "Describe the ocean in a few words.",
    "How do bees make honey?",
]


@dataclass
class Run:
    ttft: float  # seconds from the call to the first token
    last: float  # seconds from the call to the last token
    tokens: int

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / (self.last - self.ttft) if self.last > self.ttft else 0.0


@dataclass
class Row:
    ttft_ms: float
    decode: float
    aggregate: float


def summarize(runs: list[Run], wall: float) -> Row:
    return Row(ttft_ms=1000 * statistics.median(r.ttft for r in runs),
               decode=statistics.median(r.decode_rate for r in runs),
               aggregate=sum(r.tokens for r in runs) / wall)


async def bench_engine(engine, prompts: list[list[int]], concurrency: int, tokens: int) -> Row:
    async def one(prompt: list[int]) -> Run:
        sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        first = last = 0.0
        count = 0
        async for delta in engine.generate(GenerationRequest(f"bench-{time.monotonic_ns()}", prompt, sampling)):
            last = time.perf_counter() - t0
            first = first or last
            count = delta.completion_tokens
        return Run(first, last, count)

    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(concurrency)))
    return summarize(list(runs), time.perf_counter() - t0)


def bench_xllamacpp(server, prompts: list[list[int]], concurrency: int, tokens: int) -> Row:
    """llama.cpp's own server: one thread per stream calling handle_completions, as its HTTP server would."""
    runs: list[Run] = [Run(0.0, 0.0, 0)] * concurrency

    def one(i: int) -> None:
        body = {"prompt": prompts[i % len(prompts)], "n_predict": tokens, "stream": True, "temperature": 0.0,
                "ignore_eos": True, "cache_prompt": True}
        t0 = time.perf_counter()
        times: list[float] = []

        def on_chunk(chunk: dict) -> bool:
            if chunk["choices"][0].get("finish_reason") is None:
                times.append(time.perf_counter() - t0)
            return False

        server.handle_completions(body, on_chunk)
        runs[i] = Run(times[0], times[-1], tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(runs, time.perf_counter() - t0)


def print_table(title: str, rows: dict[int, Row], baseline: dict[int, Row] | None) -> None:
    print(f"\n{title}")
    print(f"{'streams':>7} {'TTFT ms':>9} {'decode tok/s':>13} {'aggregate tok/s':>16}"
          + (f" {'decode x':>9} {'aggregate x':>12}" if baseline else ""))
    for c, row in rows.items():
        line = f"{c:>7} {row.ttft_ms:>9.1f} {row.decode:>13.1f} {row.aggregate:>16.1f}"
        if baseline:
            base = baseline[c]
            line += f" {row.decode / base.decode:>9.2f} {row.aggregate / base.aggregate:>12.2f}"
        print(line)


async def main(args: argparse.Namespace) -> None:
    import xllamacpp

    slots = max(args.concurrency)
    settings = Settings(max_batch_size=slots)
    engine = LlamaCppEngine(llamacpp_config(settings))
    t0 = time.perf_counter()
    await engine.start()
    print(f"genrpc llama.cpp engine: start (tokenizer + load + warm-up) {time.perf_counter() - t0:.2f} s")
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in USER_PROMPTS]
    config, context = engine._config, engine.model_info.context_length_tokens
    print(f"model {config.gguf_path.name}, {config.threads or 'all'} threads, {slots} slots, "
          f"{args.tokens} tokens per stream")

    ours: dict[int, Row] = {}
    for c in args.concurrency:
        await bench_engine(engine, prompts, c, 4)  # warm the slots' prompt caches alike for both sides
        ours[c] = await bench_engine(engine, prompts, c, args.tokens)
    await engine.shutdown()

    t0 = time.perf_counter()
    server = xllamacpp.Server(server_params(config, context))
    print(f"xllamacpp Server: load {time.perf_counter() - t0:.2f} s")
    theirs: dict[int, Row] = {}
    for c in args.concurrency:
        await asyncio.to_thread(bench_xllamacpp, server, prompts, c, 4)
        theirs[c] = await asyncio.to_thread(bench_xllamacpp, server, prompts, c, args.tokens)
    del server

    print_table("llama.cpp's own server in process (xllamacpp handle_completions)", theirs, None)
    print_table("genrpc llama.cpp engine in process (ratios: genrpc / llama.cpp)", ours, theirs)

    if args.with_reference:
        from genrpc.service.engines.reference import ReferenceEngine

        reference = ReferenceEngine(Settings(max_batch_size=slots))
        await reference.start()
        ref_rows = {c: await bench_engine(reference, prompts, c, args.tokens) for c in args.concurrency}
        await reference.shutdown()
        print_table("genrpc reference engine (torch) in process (ratios: reference / llama.cpp)", ref_rows, theirs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--with-reference", action="store_true")
    asyncio.run(main(parser.parse_args()))
