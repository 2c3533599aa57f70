"""CPU engine figures: model load (first run / cached), single-stream TTFT and decode rate, aggregate tok/s.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_engine.py [--skip-convert] [--fast-single] [--tokens 128]

The first-run figure converts the bundled GGUF into a throw-away cache dir (~30 s); the default cache is untouched.
Every stream generates exactly --tokens tokens (greedy, EOS ignored) so runs are comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from genrpc.settings import Settings
from genrpc.service.engines.base import GenerationRequest, SamplingParams
from genrpc.service.engines.factory import reference_config
from genrpc.service.engines.reference import ReferenceEngine, resolve_model_dir

USER_PROMPTS = [
    "What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
    "Give me a tip for learning Python.", "What is photosynthesis?", "Write a haiku about autumn.",
    "How many legs does a spider have?", "What does a CPU do?", "Explain gravity in one sentence.",
    "What is the boiling point of water?", "Suggest a name for a cat.", "What is 12 times 7?",
    "Who wrote Romeo and Juliet?", "What is a prime number?", "Describe the ocean in a few words.",
    "How do bees make honey?",
]


def first_run_conversion() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        resolve_model_dir("", tmp)
        return time.perf_counter() - t0


async def stream(engine: ReferenceEngine, prompt: list[int], tokens: int) -> tuple[float, float, int]:
    """Returns (time to first token, time of last token, tokens) measured from the call."""
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    first = last = 0.0
    count = 0
    async for delta in engine.generate(GenerationRequest(f"bench-{time.monotonic_ns()}", prompt, sampling)):
        last = time.perf_counter() - t0
        first = first or last
        count += len(delta.token_ids)
    return first, last, count


async def main(args: argparse.Namespace) -> None:
    if not args.skip_convert:
        print(f"first run (GGUF -> safetensors conversion): {first_run_conversion():.1f} s")
    engine = ReferenceEngine(reference_config(Settings(max_batch_size=max(args.concurrency),
                                                       reference_batch_invariant=not args.fast_single)))
    t0 = time.perf_counter()
    await engine.start()
    print(f"cached start (load + warm-up): {time.perf_counter() - t0:.1f} s")
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in USER_PROMPTS]

    singles = [await stream(engine, prompts[0], args.tokens) for _ in range(3)]
    ttft = statistics.median(s[0] for s in singles)
    decode = statistics.median((s[2] - 1) / (s[1] - s[0]) for s in singles)
    print(f"single stream: TTFT {ttft * 1000:.0f} ms, decode {decode:.1f} tok/s ({len(prompts[0])}-token prompt)")

    for n in args.concurrency:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream(engine, prompts[i % len(prompts)], args.tokens) for i in range(n)))
        wall = time.perf_counter() - t0
        total = sum(r[2] for r in results)
        print(f"{n:2d} streams: {total / wall:6.1f} tok/s aggregate, TTFT median "
              f"{statistics.median(r[0] for r in results) * 1000:.0f} ms, max batch {engine.max_batch_size_seen}")
    await engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    parser.add_argument("--skip-convert", action="store_true")
    parser.add_argument("--fast-single", action="store_true", help="reference_batch_invariant=False (faster lone streams)")
    asyncio.run(main(parser.parse_args()))
