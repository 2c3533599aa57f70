"""End-to-end throughput through Envoy with the OpenAI SDK: starts `genrpc up` on free ports, measures

  * stack start-up time (to Envoy ready, model cached or not),
  * single-stream TTFT and decode tok/s (streamed through Envoy + bridge),
  * aggregate tok/s at 1, 4 and 8 concurrent streams (greedy, `max_tokens` fixed, EOS may end a stream early:
    tokens are counted from usage, not assumed),

then stops the stack. Prints its figures; asserts nothing.
    .venv/bin/python benchmarks/bench_stack.py [--max-tokens 128] [--concurrency 1,4,8]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from genrpc import processes

PROMPTS = ["Write a long story about a dragon who learns to cook.", "Explain how a CPU works, in detail.",
           "Describe the history of Rome.", "Write a long poem about the sea.", "Explain photosynthesis step by step.",
           "Tell me about the planets of the solar system.", "How do airplanes fly? Explain at length.",
           "Write an essay about friendship."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_stream(client: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """Returns (ttft_s, total_s, completion_tokens)."""
    started = time.perf_counter()
    ttft = None
    tokens = 0
    for chunk in client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True}):
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft or float("nan"), time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,4,8")
    args = parser.parse_args()
    ports = {n: free_port() for n in ("grpc_port", "bridge_port", "envoy_port", "envoy_admin_port", "metrics_port")}
    env = {f"GENRPC_{n.upper()}": str(p) for n, p in ports.items()}
    log = tempfile.NamedTemporaryFile(prefix="genrpc-bench-", suffix=".log", delete=False).name
    started = time.perf_counter()
    child = processes.spawn("genrpc up", [sys.executable, "-m", "genrpc.cli", "up", "--envoy-base-id", "4242"],
                            env=env, log_path=log)
    try:
        processes.wait_until(processes.http_ok(f"http://127.0.0.1:{ports['envoy_admin_port']}/ready"), child, 900,
                             "ready")
        print(f"stack ready in {time.perf_counter() - started:.1f} s (service load + warm-up, bridge, Envoy)")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['envoy_port']}/v1", api_key="x", max_retries=0,
                               timeout=600)
        one_stream(client, PROMPTS[0], 8)  # warm the path
        runs = [one_stream(client, PROMPTS[0], args.max_tokens) for _ in range(3)]
        ttft = statistics.median(r[0] for r in runs)
        decode = statistics.median((r[2] - 1) / (r[1] - r[0]) for r in runs)
        print(f"single stream through Envoy: TTFT {ttft * 1000:.0f} ms, decode {decode:.1f} tok/s")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(concurrency)]
            wall_started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(lambda p: one_stream(client, p, args.max_tokens), prompts))
            wall = time.perf_counter() - wall_started
            tokens = sum(r[2] for r in results)
            print(f"{concurrency:2d} concurrent streams: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s "
                  f"aggregate; median TTFT {statistics.median(r[0] for r in results) * 1000:.0f} ms")
    finally:
        child.stop()


if __name__ == "__main__":
    main()
