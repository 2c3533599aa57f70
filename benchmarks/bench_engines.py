"""genrpc against llama.cpp on the same GGUF and prompts, in one run, at 1 / 4 / 8 / 16 concurrent streams:

  1. llama.cpp's own server in process (xllamacpp's `handle_completions`, the same server parameters),
  2. genrpc's llama.cpp engine in process,
  3. the whole genrpc stack (`genrpc up`: service, bridge, Envoy) driven by the OpenAI SDK, streaming,
  4. llama.cpp's own HTTP server (llama-server's OpenAI route on the same `xllamacpp.Server`) driven by the same
     OpenAI SDK client: what any HTTP front costs on this machine, with the client sharing its cores,

    .venv/bin/python benchmarks/bench_engines.py [--tokens 128] [--concurrency 1 4 8 16] [--with-reference]

One side runs at a time (the others sit idle), and the sides take turns round by round (`--rounds`), so drift on a
shared machine hits all of them alike. llama.cpp's side drives the very `xllamacpp.Server` the engine loaded. Every
stream generates exactly --tokens tokens (greedy, EOS ignored; llama.cpp's side sends the plain greedy request a
llama-server client would). Per row, medians over the rounds of: median time to first token, median per-stream
decode rate (tokens after the first / time after the first), aggregate tokens/s (all tokens / wall time), and the
ratios to llama.cpp.
Also: the stack's cached start time and the service's RSS. `--with-reference` adds the torch reference engine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai

from genrpc import processes

from genrpc.settings import PORT_SETTINGS, Settings
from genrpc.service.engines.base import GenerationRequest, SamplingParams
from genrpc.service.engines.factory import llamacpp_config, reference_config
from genrpc.service.engines.llamacpp import LlamaCppEngine
from genrpc.service.engines.llamacpp import engine as llamacpp_engine

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


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def service_pid(up_pid: int) -> int:
    """The `genrpc serve` child of `genrpc up`."""
    for task in os.listdir(f"/proc/{up_pid}/task"):
        for child in open(f"/proc/{up_pid}/task/{task}/children").read().split():
            if b" serve" in open(f"/proc/{child}/cmdline", "rb").read().replace(b"\0", b" ") + b" ":
                return int(child)
    raise LookupError("no service child")


def bench_stack(base_url: str, model: str, user_prompts: list[str], concurrency: int, tokens: int,
                api_key: str = "unused") -> Row:
    """The OpenAI SDK streaming over HTTP (through Envoy and the bridge, or to llama-server), one thread per
    stream."""
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)

    def one(i: int) -> Run:
        t0 = time.perf_counter()
        first = last = 0.0
        count = 0
        for chunk in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": user_prompts[i % len(user_prompts)]}],
                max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter() - t0
                first = first or last
            if chunk.usage:
                count = chunk.usage.completion_tokens
        return Run(first, last, count)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(one, range(concurrency)))
    return summarize(runs, time.perf_counter() - t0)


class StackUnderTest:
    """`genrpc up` (service, bridge, Envoy) on free ports, idle between the rounds driven against it."""

    def __init__(self, slots: int) -> None:
        ports = {n: processes.free_port() for n in PORT_SETTINGS}
        env = {f"GENRPC_{n.upper()}": str(p) for n, p in ports.items()}
        env["GENRPC_MAX_BATCH_SIZE"] = str(slots)
        log = tempfile.NamedTemporaryFile(prefix="genrpc-bench-", suffix=".log", delete=False).name
        t0 = time.perf_counter()
        self.child = processes.spawn("genrpc up", [sys.executable, "-m", "genrpc.cli", "up", "--envoy-base-id",
                                                   "4242"], env=env, log_path=log)
        try:
            processes.wait_until(processes.http_ok(f"http://127.0.0.1:{ports['envoy_admin_port']}/ready"),
                                 self.child, 900, "ready")
        except BaseException:
            self.child.stop()
            raise
        self.start_s = time.perf_counter() - t0
        self.base_url = f"http://127.0.0.1:{ports['envoy_port']}/v1"

    def run(self, concurrency: int, tokens: int) -> Row:
        return bench_stack(self.base_url, Settings().model_id, USER_PROMPTS, concurrency, tokens)

    def service_rss_mb(self) -> float:
        return rss_mb(service_pid(self.child.pid))

    def stop(self) -> None:
        self.child.stop()


def median_row(rows: list[Row]) -> Row:
    return Row(ttft_ms=statistics.median(r.ttft_ms for r in rows), decode=statistics.median(r.decode for r in rows),
               aggregate=statistics.median(r.aggregate for r in rows))


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
    slots = max(args.concurrency)
    # The stack first, so its start is measured on an idle machine; it sleeps while the in-process sides run.
    stack = StackUnderTest(slots)
    try:
        # llama-server's HTTP listener has an unguessable API key (the engine keeps its HTTP port closed): read it.
        api_keys: list[str] = []
        engine_params = llamacpp_engine.server_params

        def keep_api_key(*params_args):
            params = engine_params(*params_args)
            api_keys.extend(params.api_keys)
            return params

        llamacpp_engine.server_params = keep_api_key
        engine = LlamaCppEngine(llamacpp_config(Settings(max_batch_size=slots)))
        t0 = time.perf_counter()
        await engine.start()
        print(f"genrpc llama.cpp engine: start (tokenizer + load + warm-up) {time.perf_counter() - t0:.2f} s")
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in USER_PROMPTS]
        # llama.cpp's own server: the very xllamacpp.Server the engine loaded (same parameters, same weights),
        # driven directly as llama-server's HTTP handlers drive it.
        server = engine._server
        print(f"model {engine._config.gguf_path.name}, {engine._config.threads or 'all'} threads, {slots} slots, "
              f"{args.tokens} tokens per stream, {args.rounds} interleaved rounds per row (medians)")

        llama_server_url = f"{server.listening_address}/v1"
        sides = {
            "llama.cpp": lambda c, n: asyncio.to_thread(bench_xllamacpp, server, prompts, c, n),
            "engine": lambda c, n: bench_engine(engine, prompts, c, n),
            "stack": lambda c, n: asyncio.to_thread(stack.run, c, n),
            "llama-server": lambda c, n: asyncio.to_thread(bench_stack, llama_server_url, "model", USER_PROMPTS, c,
                                                           n, api_keys[0]),
        }
        results: dict[str, dict[int, Row]] = {name: {} for name in sides}
        for c in args.concurrency:
            for run in sides.values():
                await run(c, 4)  # warm the slots' prompt caches alike for every side
            # The sides take turns round by round, so a slow minute of a shared machine hits all three alike.
            rounds: dict[str, list[Row]] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, run in sides.items():
                    rounds[name].append(await run(c, args.tokens))
            for name in sides:
                results[name][c] = median_row(rounds[name])
        await engine.shutdown()
        service_rss = stack.service_rss_mb()
    finally:
        stack.stop()

    theirs = results["llama.cpp"]
    print_table("llama.cpp's own server in process (xllamacpp handle_completions)", theirs, None)
    print_table("genrpc llama.cpp engine in process (ratios: genrpc / llama.cpp)", results["engine"], theirs)
    print_table("whole genrpc stack: OpenAI SDK streaming through Envoy + bridge (ratios: stack / llama.cpp)",
                results["stack"], theirs)
    print_table("llama.cpp's own HTTP server (llama-server's /v1/chat/completions on the same xllamacpp.Server), "
                "the same OpenAI SDK client (ratios: llama-server / llama.cpp)", results["llama-server"], theirs)
    print_table("whole genrpc stack against llama-server, both through the OpenAI SDK (ratios: stack / llama-server)",
                results["stack"], results["llama-server"])
    print(f"\nstack cached start (genrpc up to Envoy ready): {stack.start_s:.1f} s; service RSS after the run: "
          f"{service_rss:.0f} MB")

    if args.with_reference:
        from genrpc.service.engines.reference.engine import ReferenceEngine

        reference = ReferenceEngine(reference_config(Settings(max_batch_size=slots)))
        await reference.start()
        ref_rows = {c: await bench_engine(reference, prompts, c, args.tokens) for c in args.concurrency}
        await reference.shutdown()
        print_table("genrpc reference engine (torch) in process (ratios: reference / llama.cpp)", ref_rows, theirs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row; medians are printed")
    parser.add_argument("--with-reference", action="store_true")
    asyncio.run(main(parser.parse_args()))
