"""Front-path benchmark: what the service, the bridge and Envoy cost per streamed token, without a model.

Runs the real service with the synthetic engine (`--engine synthetic`: timestamp tokens, see
service/engines/synthetic.py), the real bridge and the real Envoy as processes, and a load client in its own
process per cell. Per path and concurrency it reports:

  * tok/s delivered (tokens the client received inside the measurement window),
  * CPU µs per delivered token of each process (utime+stime deltas from /proc/PID/stat over the window),
  * per-token delivery lag p50/p99: client receive time minus the token's emission time (each synthetic
    token's text is its emission timestamp, so merged deltas are still measured per token),
  * TTFT p50 (request sent → first content received).

Paths: `grpc` (Chat RPC straight to the service), `grpc-envoy` (Chat RPC through Envoy), `sse` (OpenAI
`stream: true` through Envoy to the bridge inside the service process: `genrpc up`'s default, `--serve-bridge`),
`sse-bridge` (the same through Envoy to a bridge process of its own calling the service over gRPC:
`--bridge-process`; the summary gives its CPU per token over `sse`'s, cell by cell), `unary` (OpenAI `stream: false` through Envoy's transcoder; its
"lag" is the wait for the whole response, and TTFT is the full response time), and `grpc-floor`: the same Chat
client against a bare grpc.aio server that only relays the synthetic engine's tokens as chunks (no validation,
templating, choices, metrics or interceptor), whose CPU per token (in the service column) is what grpc.aio itself
costs on this machine to stream one message per token: the floor under any Python gRPC service doing the same.
Pacing: `paced` = the engine emits `--rate` tok/s to every stream (one step for all streams, like a GPU decode
step); `unpaced` = one step per event-loop turn, as fast as the service takes them.

The machine may be shared: CPU time per token is robust to that, tok/s and lag are not. Asserts nothing.
    .venv/bin/python benchmarks/bench_front.py [--duration 3] [--concurrency 1,16,64,256] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import uuid

from _stats import percentile
from genrpc import processes
from genrpc.settings import PORT_SETTINGS, Settings

PATHS = ("grpc", "grpc-envoy", "sse", "sse-bridge", "unary", "grpc-floor")
PROCESS_NAMES = ("service", "bridge", "envoy")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Tokens per request (requests run back to back in every stream). Unary paced requests are short so that
# whole responses land inside the window often enough to measure a rate.
PACED_TOKENS, UNPACED_TOKENS, UNARY_PACED_TOKENS = 100, 200, 20
WARMUP_S = 0.5

TARGET_SSE_US, TARGET_GRPC_US, TARGET_LAG_P99_MS = 100, 40, 50


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# ---- the load client (its own process) -------------------------------------------------------------------

async def run_client(args: argparse.Namespace) -> dict:
    import grpc
    import httpx

    from genrpc.service.engines.synthetic import TOKEN_TEXT_WIDTH, lag_us, parse_emission_times
    from genrpc.v1 import chat_pb2, generation_service_pb2_grpc

    pids = {name: int(pid) for name, pid in (item.split("=") for item in args.pids.split(","))}
    loop = asyncio.get_running_loop()
    window: dict[str, float] = {}
    tokens_in_window = 0
    lags_ms: list[float] = []
    ttfts_ms: list[float] = []
    errors: list[str] = []
    extra = {"stream_interval": args.stream_interval} if args.stream_interval is not None else {}

    def in_window() -> bool:
        return "start" in window and "end" not in window

    def received(text: str, now_ns: int) -> None:
        nonlocal tokens_in_window
        if not in_window():
            return
        stamps = parse_emission_times(text)
        tokens_in_window += len(stamps)
        lags_ms.extend(lag_us(stamp, now_ns) / 1000 for stamp in stamps)

    def first_token(started: float) -> None:
        if in_window():
            ttfts_ms.append((time.perf_counter() - started) * 1000)

    messages = [{"role": "user", "content": "Benchmark the front path."}]

    async def grpc_worker(stub) -> None:
        request = chat_pb2.ChatCompletionRequest(
            model=args.model, max_completion_tokens=args.tokens, stream=True, **extra,
            messages=[chat_pb2.ChatMessage(role="user", content={"string_value": messages[0]["content"]})])
        while True:
            started, first = time.perf_counter(), True
            async for chunk in stub.Chat(request):
                for choice in chunk.choices:
                    if choice.delta.content:
                        if first:
                            first_token(started)
                            first = False
                        received(choice.delta.content, time.time_ns())

    async def sse_worker(client: httpx.AsyncClient) -> None:
        body = {"model": args.model, "messages": messages, "max_tokens": args.tokens, "stream": True, **extra}
        while True:
            started, first = time.perf_counter(), True
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices", ()):
                        content = choice.get("delta", {}).get("content")
                        if content:
                            if first:
                                first_token(started)
                                first = False
                            received(content, time.time_ns())

    async def unary_worker(client: httpx.AsyncClient) -> None:
        body = {"model": args.model, "messages": messages, "max_tokens": args.tokens}
        while True:
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            content = response.json()["choices"][0]["message"]["content"]
            assert len(content) == args.tokens * TOKEN_TEXT_WIDTH, "short unary response"
            first_token(started)
            received(content, time.time_ns())

    async def guarded(worker, *worker_args) -> None:
        try:
            await worker(*worker_args)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - reported in the results, the cell is marked
            errors.append(f"{type(error).__name__}: {error}"[:300])

    channels, client = [], None
    if args.path in ("grpc", "grpc-envoy", "grpc-floor"):
        # Each channel its own TCP connection (SO_REUSEPORT spreads connections, not streams, over workers).
        channels = [grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(args.channels)]
        stubs = [generation_service_pb2_grpc.GenerationServiceStub(c) for c in channels]
        workers = [guarded(grpc_worker, stubs[i % len(stubs)]) for i in range(args.concurrency)]
    else:
        client = httpx.AsyncClient(base_url=args.target, timeout=60,
                                   limits=httpx.Limits(max_connections=args.concurrency + 8,
                                                       max_keepalive_connections=args.concurrency + 8))
        worker = sse_worker if args.path.startswith("sse") else unary_worker
        workers = [guarded(worker, client) for _ in range(args.concurrency)]
    tasks = [loop.create_task(w) for w in workers]
    await asyncio.sleep(WARMUP_S)
    all_pids = {**pids, "client": os.getpid()}
    cpu_start = {name: cpu_seconds(pid) for name, pid in all_pids.items()}
    window["start"] = time.perf_counter()
    await asyncio.sleep(args.duration)
    window["end"] = time.perf_counter()
    cpu_end = {name: cpu_seconds(pid) for name, pid in all_pids.items()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    if client is not None:
        await client.aclose()
    elapsed = window["end"] - window["start"]
    return {"tokens": tokens_in_window, "elapsed_s": elapsed,
            "cpu_s": {name: cpu_end[name] - cpu_start[name] for name in all_pids},
            "lag_p50_ms": percentile(lags_ms, 0.5), "lag_p99_ms": percentile(lags_ms, 0.99),
            "ttft_p50_ms": percentile(ttfts_ms, 0.5), "errors": errors[:3], "error_count": len(errors)}


# ---- grpc.aio's floor: a bare server relaying chunks (its own process) ------------------------------------

async def run_floor_server(port: int, rate: float) -> None:
    """GenerationService.Chat only, on a generic handler, relaying the synthetic engine's tokens (the service's own
    token source, same schedule) one chunk per token, the last with finish_reason "length"."""
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from genrpc.service.engines.base import GenerationRequest, SamplingParams
    from genrpc.service.engines.synthetic import SyntheticEngine, SyntheticEngineConfig
    from genrpc.v1 import chat_pb2

    engine = SyntheticEngine(SyntheticEngineConfig("floor", tokens_per_s=rate, max_queue=1 << 20))
    await engine.start()

    async def chat(request: chat_pb2.ChatCompletionRequest, context):
        base = dict(id="chatcmpl-" + "0" * 32, object="chat.completion.chunk", created=int(time.time()),
                    model=request.model, system_fingerprint="fp_floor")
        null = {"null_value": 0}
        yield chat_pb2.ChatCompletionChunk(**base, choices=[chat_pb2.ChatCompletionChunkChoice(
            index=0, delta=chat_pb2.ChatCompletionDelta(role="assistant", content=""), logprobs=null,
            finish_reason=null)])
        generation = GenerationRequest(uuid.uuid4().hex, [0],
                                       SamplingParams(max_tokens=request.max_completion_tokens))
        async for delta in engine.generate(generation):
            yield chat_pb2.ChatCompletionChunk(**base, choices=[chat_pb2.ChatCompletionChunkChoice(
                index=0, delta=chat_pb2.ChatCompletionDelta(content=delta.text), logprobs=null,
                finish_reason={"string_value": "length"} if delta.finish_reason else null)])

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("genrpc.v1.GenerationService", {
        "Chat": grpc.unary_stream_rpc_method_handler(
            chat, request_deserializer=chat_pb2.ChatCompletionRequest.FromString,
            response_serializer=chat_pb2.ChatCompletionChunk.SerializeToString)}),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        await engine.shutdown()


# ---- the orchestrator --------------------------------------------------------------------------------------

class Front:
    """Service (synthetic engine, serving the bridge's app too), a bridge process, an Envoy routing streams to the
    service's bridge and a second Envoy routing them to the bridge process, and the grpc floor server, on free
    loopback ports; `stop()` stops them all."""

    def __init__(self, rate: float, workdir: pathlib.Path, service_workers: int = 1):
        from genrpc.cli import envoy_yaml, settings_env
        from genrpc.envoy.config import envoy_command

        ports = {name: processes.free_port() for name in PORT_SETTINGS}
        ports["metrics_port"] = -1
        self.settings = Settings(engine="synthetic", synthetic_tokens_per_s=rate, max_queue=8192,
                                 shutdown_grace_s=1, log_level="warning", **ports)
        env = settings_env(self.settings)
        # the layout `genrpc --bridge-process` runs: a bridge process on ports of its own, behind its own Envoy
        self.process_settings = self.settings.model_copy(update={
            name: processes.free_port() for name in ("bridge_port", "envoy_port", "envoy_admin_port",
                                                     "envoy_stats_port")} | {"bridge_metrics_port": -1})
        cli = [sys.executable, "-m", "genrpc.cli"]
        self.children: list[processes.Child] = []
        try:
            extra = ["--service-workers", str(service_workers)] if service_workers > 1 else []
            service = processes.spawn("service", [*cli, "serve", "--serve-bridge", "true", *extra], env=env,
                                      log_path=workdir / f"service-{rate}.log")
            self.children.append(service)
            processes.wait_until(processes.grpc_serving(self.settings.grpc_address()), service, 60, "SERVING")
            bridge = processes.spawn("bridge", [*cli, "bridge"], env=settings_env(self.process_settings),
                                     log_path=workdir / f"bridge-{rate}.log")
            self.children.append(bridge)
            processes.wait_until(processes.http_ok(f"http://127.0.0.1:{self.process_settings.bridge_port}/health"),
                                 bridge, 60, "ready")
            envoys = []
            for i, settings in enumerate((self.settings, self.process_settings)):
                config = workdir / f"envoy-{i}.yaml"
                config.write_text(envoy_yaml(settings))
                envoy = processes.spawn(f"envoy {i}", envoy_command(str(config),
                                                                    base_id=os.getpid() % 10000 + 7000 + i),
                                        log_path=workdir / f"envoy-{i}-{rate}.log")
                self.children.append(envoy)
                processes.wait_until(processes.http_ok(f"http://127.0.0.1:{settings.envoy_admin_port}/ready"),
                                     envoy, 60, "ready")
                envoys.append(envoy)
            self.floor_port = processes.free_port()
            floor = processes.spawn("grpc floor", [sys.executable, __file__, "--floor-server", "--port",
                                                   str(self.floor_port), "--rate", str(rate)],
                                    log_path=workdir / f"floor-{rate}.log")
            self.children.append(floor)
            processes.wait_until(processes.grpc_serving(f"127.0.0.1:{self.floor_port}"), floor, 60, "SERVING")
        except BaseException:
            self.stop()
            raise
        self.service_pids = [service.pid, *worker_pids(service.pid)]
        self.pids = {"service": service.pid, "bridge": bridge.pid, "envoy": envoys[0].pid}
        self.process_envoy_pid = envoys[1].pid
        self.floor_pid = floor.pid

    def targets(self) -> dict[str, str]:
        host = self.settings.host
        return {"grpc": f"{host}:{self.settings.grpc_port}", "grpc-envoy": f"{host}:{self.settings.envoy_port}",
                "grpc-floor": f"127.0.0.1:{self.floor_port}",
                "sse": f"http://{host}:{self.settings.envoy_port}",
                "sse-bridge": f"http://{host}:{self.process_settings.envoy_port}",
                "unary": f"http://{host}:{self.settings.envoy_port}"}

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop(timeout_s=10)


def worker_pids(pid: int) -> list[int]:
    """Child processes of `pid` (service workers started by `genrpc serve --service-workers N`)."""
    path = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def run_cell(front: Front, path: str, concurrency: int, tokens: int, duration: float,
             stream_interval: int | None, channels: int = 1) -> dict:
    pids = dict(front.pids)
    pids.pop("service")
    if path == "sse-bridge":
        pids["envoy"] = front.process_envoy_pid
    # grpc-floor: the bare server takes the service's place (and column)
    service_pids = [front.floor_pid] if path == "grpc-floor" else front.service_pids
    pids.update({f"service{i}": pid for i, pid in enumerate(service_pids)})
    argv = [sys.executable, __file__, "--client", "--path", path, "--concurrency", str(concurrency),
            "--tokens", str(tokens), "--duration", str(duration), "--target", front.targets()[path],
            "--model", front.settings.model_id, "--channels", str(min(channels, concurrency)), "--pids", ",".join(f"{k}={v}" for k, v in pids.items())]
    if stream_interval is not None:
        argv += ["--stream-interval", str(stream_interval)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120)
    if done.returncode != 0:
        raise RuntimeError(f"client failed ({path} x{concurrency}):\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = result.pop("cpu_s")
    result["cpu_s"] = {"service": sum(v for k, v in cpu.items() if k.startswith("service")),
                       "bridge": cpu["bridge"], "envoy": cpu["envoy"], "client": cpu["client"]}
    return result


USED = {"grpc": ("service",), "grpc-envoy": ("service", "envoy"), "sse": ("service", "envoy"),
        "sse-bridge": ("service", "bridge", "envoy"), "unary": ("service", "envoy"), "grpc-floor": ("service",)}


def per_token_us(r: dict) -> dict[str, float]:
    tokens = r["tokens"]
    return {name: (r["cpu_s"][name] * 1e6 / tokens if tokens else float("nan")) for name in r["cpu_s"]}


def front_us(path: str, r: dict) -> float:
    """CPU µs per delivered token of the processes on `path`."""
    per_token = per_token_us(r)
    return sum(per_token[name] for name in USED[path])


def format_row(path: str, pacing: str, concurrency: int, offered: float | None, r: dict) -> str:
    tokens = r["tokens"]
    rate = tokens / r["elapsed_s"]
    per_token = per_token_us(r)
    used = USED[path]
    front = front_us(path, r)

    def us(name: str) -> str:
        return f"{per_token[name]:7.0f}" if name in used else "      -"

    notes = []
    if pacing == "paced" and concurrency in (64, 256) and path in ("sse", "sse-bridge", "grpc-envoy"):
        limit = TARGET_SSE_US if path.startswith("sse") else TARGET_GRPC_US
        notes.append(f"front<={limit}: {'ok' if front <= limit else 'MISS'}")
    if pacing == "paced" and path != "unary":
        notes.append(f"p99<={TARGET_LAG_P99_MS}ms: {'ok' if r['lag_p99_ms'] <= TARGET_LAG_P99_MS else 'MISS'}")
    if offered:
        kept = rate >= 0.95 * offered
        notes.append(f"offered {offered:.0f}: {'kept up' if kept else 'FELL BEHIND'}")
    if r["error_count"]:
        notes.append(f"{r['error_count']} errors: {r['errors'][0]}")
    lag = "      -       -" if path == "unary" else f"{r['lag_p50_ms']:7.1f} {r['lag_p99_ms']:7.1f}"
    client_cpu = r["cpu_s"]["client"] / r["elapsed_s"] * 100
    return (f"{path:10} {pacing:7} {concurrency:5} {rate:8.0f} {us('service')} {us('bridge')} {us('envoy')} "
            f"{front:7.0f} {lag} {r['ttft_p50_ms']:8.1f} {client_cpu:6.0f}%  {'; '.join(notes)}")


HEADER = (f"{'path':10} {'pacing':7} {'strms':>5} {'tok/s':>8} {'svc µs':>7} {'brg µs':>7} {'envoy µs':>7} "
          f"{'front µs':>7} {'lag p50':>7} {'lag p99':>7} {'TTFT p50':>8} {'client':>7}  targets / notes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell")
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--pacing", default="unpaced,paced")
    parser.add_argument("--rate", type=float, default=50.0, help="paced: tokens per second per stream")
    parser.add_argument("--stream-interval", type=int, default=None,
                        help="send this request extension with every streamed request (default: none sent)")
    parser.add_argument("--service-workers", type=int, default=1)
    parser.add_argument("--client-channels", type=int, default=1,
                        help="gRPC paths: connections the client spreads its streams over")
    parser.add_argument("--output", default="", help="also write the table to this file")
    parser.add_argument("--channels", type=int, default=1, help=argparse.SUPPRESS)
    # the client side (internal: one client process per cell)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--pids", help=argparse.SUPPRESS)
    parser.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        asyncio.run(run_floor_server(args.port, args.rate))
        return
    if args.client:
        args.concurrency = int(args.concurrency)
        print(json.dumps(asyncio.run(run_client(args))))
        return

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    paths = args.paths.split(",")
    lines = [f"bench_front: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.2f} at start; {args.duration:.0f} s per cell; service workers "
             f"{args.service_workers}; stream_interval {args.stream_interval}; gRPC client connections "
             f"{args.client_channels}",
             "µs columns: CPU µs per delivered token (utime+stime from /proc); front = the processes on the path; "
             "client = load client CPU %",
             f"targets (paced 64/256 streams): SSE front <= {TARGET_SSE_US} µs/token, gRPC via Envoy (service+Envoy) "
             f"<= {TARGET_GRPC_US} µs/token, p99 lag <= {TARGET_LAG_P99_MS} ms; 128 x {args.rate:.0f} tok/s over SSE "
             f"delivered in full",
             "unpaced: the engine emits a token to every stream each event-loop turn, faster than the front can "
             "carry, so backlogs (and lag) grow: read tok/s and µs/token there, not lag",
             "", HEADER]
    print("\n".join(lines), flush=True)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="genrpc-bench-front-"))
    fronts: dict[tuple[str, int, str], float] = {}
    for pacing in args.pacing.split(","):
        rate = args.rate if pacing == "paced" else 0.0
        tokens = PACED_TOKENS if pacing == "paced" else UNPACED_TOKENS
        front = Front(rate, workdir, args.service_workers)
        try:
            cells = [(path, c) for path in paths for c in concurrencies]
            if pacing == "paced" and 128 not in concurrencies:  # the "128 x 50 tok/s over SSE in full"
                cells += [(path, 128) for path in ("sse", "sse-bridge") if path in paths]
            for path, concurrency in cells:
                cell_tokens = UNARY_PACED_TOKENS if (path, pacing) == ("unary", "paced") else tokens
                result = run_cell(front, path, concurrency, cell_tokens, args.duration, args.stream_interval,
                                  args.client_channels)
                offered = concurrency * rate if pacing == "paced" else None
                line = format_row(path, pacing, concurrency, offered, result)
                fronts[(pacing, concurrency, path)] = front_us(path, result)
                lines.append(line)
                print(line, flush=True)
                for child in front.children:
                    child.ensure_alive()
        finally:
            front.stop()
    pairs = [(pacing, c) for (pacing, c, path) in fronts if path == "sse" and (pacing, c, "sse-bridge") in fronts]
    if pairs:
        lines.append("\nSSE front CPU per token, the bridge as a process of its own / inside the service (same run):")
        for pacing, c in pairs:
            own, inside = fronts[(pacing, c, "sse-bridge")], fronts[(pacing, c, "sse")]
            lines.append(f"  {pacing:7} {c:4} streams: {own:6.0f} / {inside:6.0f} µs = {own / inside:4.2f}x")
        print("\n".join(lines[-len(pairs) - 1:]))
    lines.append(f"\nload average at end {os.getloadavg()[0]:.2f}; logs in {workdir}")
    print(lines[-1])
    if args.output:
        pathlib.Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
