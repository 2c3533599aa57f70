"""Overload through the whole stack: a burst of `--factor` x capacity (slots + queue) requests at once, a third each
as REST (transcoder), SSE (bridge) and gRPC through Envoy. Prints the 429 / RESOURCE_EXHAUSTED latency (p50, p99),
how many were admitted and completed, the 5xx count (must be 0) and the highest engine queue seen on /metrics.

    .venv/bin/python benchmarks/bench_overload.py --slots 16 --queue 256 --factor 4 --max-tokens 8 --rounds 3

Each side (`--sides`: values of --envoy-max-requests, default 0 = the service decides alone and -1 = Envoy also
refuses the excess past capacity, all paths counted together) gets its own `genrpc up` on free loopback ports, stopped at its end;
the sides take turns round by round, and the summary gives medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
from google.protobuf import json_format

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the shared metrics watcher

from _stack_up import QueueWatch  # noqa: E402
from _stats import percentile  # noqa: E402
from genrpc import processes  # noqa: E402
from genrpc.settings import PORT_SETTINGS, DEFAULT_MODEL_ID  # noqa: E402
from genrpc.v1 import chat_pb2, generation_service_pb2_grpc  # noqa: E402

MESSAGES = [{"role": "user", "content": "Count from one to ten."}]


async def rest(client: httpx.AsyncClient, stream: bool, max_tokens: int) -> tuple[str, int, float, bool]:
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json={
            "model": DEFAULT_MODEL_ID, "messages": MESSAGES, "max_tokens": max_tokens, "stream": stream}) as response:
        body = await response.aread()
    complete = response.status_code == 200 and (not stream or body.rstrip().endswith(b"[DONE]"))
    retry_after = response.headers.get("retry-after") == "1"
    status = response.status_code if response.status_code != 429 or retry_after else -429  # -429: no retry-after
    return ("sse" if stream else "rest"), status, time.perf_counter() - started, complete


async def rpc(stub, max_tokens: int) -> tuple[str, int, float, bool]:
    request = json_format.ParseDict({"model": DEFAULT_MODEL_ID, "messages": MESSAGES, "max_tokens": max_tokens},
                                    chat_pb2.ChatCompletionRequest())
    started = time.perf_counter()
    try:
        await stub.CreateChatCompletion(request, timeout=600)
        return "grpc", 200, time.perf_counter() - started, True
    except grpc.aio.AioRpcError as error:
        status = {grpc.StatusCode.RESOURCE_EXHAUSTED: 429}.get(error.code(), 500 + error.code().value[0])
        return "grpc", status, time.perf_counter() - started, False


async def burst(envoy: str, count: int, max_tokens: int, watch: "QueueWatch", queue: int, probes: int):
    """The burst, plus `probes` sequential requests per path sent while the server is full (queue at its
    setting): their refusal latency is the server's decision time without the burst's client-side contention."""
    async with httpx.AsyncClient(base_url=f"http://{envoy}", timeout=600,
                                 limits=httpx.Limits(max_connections=count)) as client, \
            httpx.AsyncClient(base_url=f"http://{envoy}", timeout=600) as probe_client, \
            grpc.aio.insecure_channel(envoy) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        calls = [rest(client, False, max_tokens) if i % 3 == 0 else rest(client, True, max_tokens) if i % 3 == 1
                 else rpc(stub, max_tokens) for i in range(count)]
        everything = asyncio.gather(*calls)
        probed = []
        deadline = time.monotonic() + 60
        while watch.max_waiting < queue and time.monotonic() < deadline and not everything.done():
            await asyncio.sleep(0.01)
        for _ in range(probes):
            for call in (lambda: rest(probe_client, False, max_tokens), lambda: rest(probe_client, True, max_tokens),
                         lambda: rpc(stub, max_tokens)):
                probed.append(await call())
        return await everything, probed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--queue", type=int, default=256)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--probes", type=int, default=20, help="sequential probes per path while the server is full")
    parser.add_argument("--sides", default="0,-1", help="--envoy-max-requests values to run in turn, one stack each "
                                                        "(0: the service decides alone; -1: Envoy refuses the "
                                                        "excess past capacity itself, all paths together)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every side, taking turns; the summary "
                                                                 "gives medians over the rounds")
    args = parser.parse_args()
    sides = [int(value) for value in args.sides.split(",")]
    # side -> path kind -> [(p50, p99) per round], over every refusal of that path whoever decided it
    rounds: dict[int, dict[str, list[tuple[float, float]]]] = {side: {} for side in sides}
    for round_no in range(1, args.rounds + 1):
        for side in sides:
            print(f"--- round {round_no}, envoy_max_requests {side} ---")
            found = run_side(args, side)
            for kind in ("grpc", "rest", "sse"):
                durations = [d for decider in found.get(kind, {}).values() for d in decider]
                rounds[side].setdefault(kind, []).append((percentile(durations, .5), percentile(durations, .99)))
    if len(sides) > 1:
        print(f"Envoy-timed refusals, p50 / p99 ms per side (medians over {args.rounds} round(s)), and the p99 "
              f"ratio to side {sides[0]}:")
        for kind in ("grpc", "rest", "sse"):
            base_p99 = statistics.median(p99 for _, p99 in rounds[sides[0]][kind])
            cells = []
            for side in sides:
                p50 = statistics.median(p50 for p50, _ in rounds[side][kind])
                p99 = statistics.median(p99 for _, p99 in rounds[side][kind])
                ratio = f"{p99 / base_p99:.3f}x" if base_p99 > 0 else "-x"  # a 0 ms p99 (Envoy's ms clock) has none
                cells.append(f"{side}: {p50:.1f} / {p99:.1f} ({ratio})")
            print(f"  {kind:4s}  " + "   ".join(cells))


def run_side(args: argparse.Namespace, envoy_max_requests: int) -> dict[str, dict[str, list[float]]]:
    capacity = args.slots + args.queue
    count = int(capacity * args.factor)
    ports = {n: processes.free_port() for n in PORT_SETTINGS}
    env = {f"GENRPC_{n.upper()}": str(p) for n, p in ports.items()}
    env.update(GENRPC_MAX_BATCH_SIZE=str(args.slots), GENRPC_MAX_QUEUE=str(args.queue),
               GENRPC_ENVOY_MAX_REQUESTS=str(envoy_max_requests))
    log = tempfile.NamedTemporaryFile(prefix="genrpc-overload-", suffix=".log", delete=False).name
    child = processes.spawn("genrpc up", [sys.executable, "-m", "genrpc.cli", "up", "--envoy-base-id", "4243"],
                            env=env, log_path=log)
    try:
        processes.wait_until(processes.http_ok(f"http://127.0.0.1:{ports['envoy_admin_port']}/ready"), child, 900,
                             "ready")
        processes.wait_until(processes.grpc_serving(f"127.0.0.1:{ports['grpc_port']}"), child, 60, "SERVING")
        with QueueWatch(f"http://127.0.0.1:{ports['metrics_port']}/metrics") as watch:
            started = time.perf_counter()
            results, probed = asyncio.run(burst(f"127.0.0.1:{ports['envoy_port']}", count, args.max_tokens, watch,
                                                args.queue, args.probes))
            wall = time.perf_counter() - started
        refused = [r for r in results if abs(r[1]) == 429]
        admitted = [r for r in results if r[1] == 200]
        errors = [r for r in results + probed if r[1] >= 500]
        print(f"burst: {count} requests ({args.factor:g}x capacity {args.slots} slots + {args.queue} queue), "
              f"max_tokens {args.max_tokens}, done in {wall:.1f} s")
        latencies = [r[2] for r in refused]
        print(f"  refused 429/RESOURCE_EXHAUSTED: {len(refused)}; latency p50 {percentile(latencies, .5) * 1000:.1f} ms,"
              f" p99 {percentile(latencies, .99) * 1000:.1f} ms, max {max(latencies, default=0) * 1000:.1f} ms; "
              f"without retry-after: {sum(1 for r in refused if r[1] == -429)}")
        for kind in ("rest", "sse", "grpc"):
            lat = [r[2] for r in refused if r[0] == kind]
            print(f"    {kind:4s}: {len(lat)} refused, p50 {percentile(lat, .5) * 1000:.1f} ms, "
                  f"p99 {percentile(lat, .99) * 1000:.1f} ms")
        for kind in ("rest", "sse", "grpc"):
            lat = [r[2] for r in probed if r[0] == kind and abs(r[1]) == 429]
            print(f"  probes while full, {kind:4s}: {len(lat)}/{sum(1 for r in probed if r[0] == kind)} refused, "
                  f"p50 {percentile(lat, .5) * 1000:.1f} ms, p99 {percentile(lat, .99) * 1000:.1f} ms")
        print(f"  admitted: {len(admitted)}, completed: {sum(1 for r in admitted if r[3])}")
        print(f"  5xx / other errors: {len(errors)}; other statuses: "
              f"{sorted({r[1] for r in results} - {200, 429, -429})}")
        print(f"  max queue seen (genrpc_waiting_requests): {watch.max_waiting:.0f} (setting {args.queue}); "
              f"max running: {watch.max_running:.0f} (slots {args.slots})")
    finally:
        child.stop()
    print("  refusals timed by Envoy (access log: the request's last byte in to the response's last byte out, so "
          "without the load client's own queueing), by who decided:")
    found = envoy_refusal_durations_ms(log)
    for kind, deciders in sorted(found.items()):
        for decider, durations in sorted(deciders.items()):
            print(f"    {kind:4s} by {decider:7s}: {len(durations)} refused, p50 {percentile(durations, .5):.1f} ms, "
                  f"p99 {percentile(durations, .99):.1f} ms")
    return found


def envoy_refusal_durations_ms(log_path: str) -> dict[str, dict[str, list[float]]]:
    """Envoy's access-log time from a 429 / RESOURCE_EXHAUSTED request's last byte to its response's last byte,
    per path kind (rest, sse, grpc) and decider
    ("Envoy": its admission limit, response flag UO; "service" otherwise); `genrpc up` logs Envoy's JSON access
    lines on its stdout."""
    found: dict[str, dict[str, list[float]]] = {}
    with open(log_path, errors="replace") as lines:
        for line in lines:
            if '"duration_ms"' not in line:
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if str(entry.get("status")) == "429" or entry.get("grpc_status") == "ResourceExhausted":
                    path = entry.get("path") or ""
                    kind = "sse" if entry.get("route") == "stream" else "grpc" if path.startswith("/genrpc") else "rest"
                    decider = "Envoy" if "UO" in str(entry.get("flags")) else "service"
                    # from the request's last byte: what the client's own pace of sending leaves out
                    server_ms = float(entry["duration_ms"]) - float(entry.get("request_ms") or 0)
                    found.setdefault(kind, {}).setdefault(decider, []).append(server_ms)
    return found


if __name__ == "__main__":
    main()
