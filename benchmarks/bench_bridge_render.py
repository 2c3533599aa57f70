"""Micro-benchmark: the bridge's cost to render one OpenAI stream chunk as an SSE frame.

before: the generic mapping for every chunk (`MessageToDict` + `json.dumps`, what the bridge did for each chunk);
after:  `ChunkRenderer.feed` (the per-stream template; the generic mapping only for unusual chunks).
The stream is what the service sends for plain text: a role chunk, N text deltas, the finish chunk (with usage)
and the usage chunk. Prints the median µs per chunk over several runs, and the ratio.

    .venv/bin/python benchmarks/bench_bridge_render.py [--tokens 256] [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from google.protobuf import json_format, struct_pb2

from genrpc.bridge.openai_api import ChunkRenderer
from genrpc.v1 import chat_pb2, common_pb2, completion_pb2

NULL = struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
WORDS = ["Hello", " world", ",", " the", " quick", " brown", " fox", " jumps", " naïve", " café", " 日本", "\n"]


def chat_stream(tokens: int) -> list[Any]:
    base = dict(id="chatcmpl-0f1e2d3c4b5a69788796a5b4c3d2e1f0", object="chat.completion.chunk",
                created=1700000000, model="HuggingFaceTB/SmolLM2-135M-Instruct", system_fingerprint="fp_genrpc_0")
    usage = common_pb2.Usage(prompt_tokens=12, completion_tokens=tokens, total_tokens=12 + tokens)

    def chunk(delta: chat_pb2.ChatCompletionDelta, finish: struct_pb2.Value = NULL, **kw: Any):
        return chat_pb2.ChatCompletionChunk(**base, **kw, choices=[chat_pb2.ChatCompletionChunkChoice(
            index=0, delta=delta, logprobs=NULL, finish_reason=finish)])

    out = [chunk(chat_pb2.ChatCompletionDelta(role="assistant", content=""))]
    out += [chunk(chat_pb2.ChatCompletionDelta(content=WORDS[i % len(WORDS)])) for i in range(tokens)]
    out.append(chunk(chat_pb2.ChatCompletionDelta(), struct_pb2.Value(string_value="stop"), usage=usage))
    out.append(chat_pb2.ChatCompletionChunk(**base, usage=usage))
    return out


def completion_stream(tokens: int) -> list[Any]:
    base = dict(id="cmpl-0f1e2d3c4b5a69788796a5b4c3d2e1f0", object="text_completion", created=1700000000,
                model="HuggingFaceTB/SmolLM2-135M-Instruct", system_fingerprint="fp_genrpc_0")
    usage = common_pb2.Usage(prompt_tokens=12, completion_tokens=tokens, total_tokens=12 + tokens)
    out = [completion_pb2.Completion(**base, choices=[completion_pb2.CompletionChoice(
        index=0, text=WORDS[i % len(WORDS)], logprobs=NULL, finish_reason=NULL)]) for i in range(tokens)]
    out.append(completion_pb2.Completion(**base, usage=usage, choices=[completion_pb2.CompletionChoice(
        index=0, text="", logprobs=NULL, finish_reason=struct_pb2.Value(string_value="length"))]))
    out.append(completion_pb2.Completion(**base, usage=usage))
    return out


def render_before(chunks: list[Any]) -> list[bytes]:
    """The bridge's per-chunk rendering before the template (bridge/app.py `chunk_to_json` + `frame`)."""
    out = []
    for msg in chunks:
        d = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        if d.get("choices"):
            d.pop("usage", None)
        else:
            d["choices"] = []
        out.append(b"data: " + json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n")
    return out


def render_after(chat: bool) -> Any:
    def render(chunks: list[Any]) -> list[bytes]:
        renderer = ChunkRenderer(chat, include_usage=True)  # one renderer per stream, as in the bridge
        return [renderer.feed(msg) for msg in chunks]
    return render


def median_us_per_chunk(render: Any, chunks: list[Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        render(chunks)
        times.append((time.perf_counter() - t0) / len(chunks) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="text deltas per stream")
    parser.add_argument("--runs", type=int, default=15, help="streams rendered per measurement (median taken)")
    args = parser.parse_args()
    print(f"{'stream':<12} {'before µs/chunk':>16} {'after µs/chunk':>15} {'ratio':>7}")
    for name, chunks, chat in (("chat", chat_stream(args.tokens), True),
                               ("completion", completion_stream(args.tokens), False)):
        after = render_after(chat)
        assert render_before(chunks) == after(chunks), "the template renderer must print the same bytes"
        render_before(chunks), after(chunks)  # warm-up
        b = median_us_per_chunk(render_before, chunks, args.runs)
        a = median_us_per_chunk(after, chunks, args.runs)
        print(f"{name:<12} {b:>16.2f} {a:>15.2f} {b / a:>6.1f}x")


if __name__ == "__main__":
    main()
