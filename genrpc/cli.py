"""`genrpc` command line: serve | bridge | up | chat | envoy-config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from genrpc import chat as chat_module
from genrpc import settings as settings_module
from genrpc.settings import Settings

MODEL_LOAD_TIMEOUT_S = 900  # first run converts the bundled GGUF; a slow disk can take minutes
# The bridge's gRPC client (its calls to the service) on grpc's iomgr TCP client instead of the EventEngine one:
# each streamed message then wakes only grpc.aio's poller thread, which reads the socket itself, where the
# EventEngine client handed every read across its thread pool (up to four thread wake-ups per message, each
# costing tens of microseconds on a VM). Measured: the bridge's CPU per SSE token -14% to -53% at 1-256 paced streams
# (README, "Benchmarks"). grpc reads GRPC_EXPERIMENTS once, when it is imported, so main() sets it before anything
# imports grpc (its workers inherit it); a GRPC_EXPERIMENTS already in the environment wins.
BRIDGE_GRPC_EXPERIMENTS = "-event_engine_client"


def _logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The service's per-request access log: bare JSON lines (one object per line, for log shippers).
    access = logging.getLogger("genrpc.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False


def cmd_serve(settings: Settings, _: argparse.Namespace) -> int:
    from genrpc.service.server import serve

    _logging(settings)
    if settings.sglang_engine_host:
        from genrpc.service.server import host_sglang_engine

        asyncio.run(host_sglang_engine(settings))
        return 0
    if settings.service_workers > 1 and not settings.worker_of:
        if settings.grpc_port == 0:
            logging.error("--service-workers > 1 needs a fixed --grpc-port (port 0 would give each worker its own)")
            return 2
        return _serve_workers(settings)
    if settings.serve_bridge:
        from genrpc.bridge.in_service import BridgeInService

        asyncio.run(serve(settings, fronts=lambda server: [BridgeInService(settings, server)]))
    else:
        asyncio.run(serve(settings))
    return 0


def _serve_workers(settings: Settings) -> int:
    """N service workers on one port. CPU engines: one engine per worker. SGLang: one engine for the GPUs, held by
    an engine-host process started first with N tokenizer workers; the N serving workers attach to it (SGLang's
    `Engine.attach_tokenizer_worker`), as the HTTP workers of `sglang serve` do. Worker i serves metrics on
    --metrics-port + i, and with --serve-bridge the bridge's on --bridge-metrics-port + i (when fixed ports are set)."""
    from genrpc import processes
    from genrpc.supervisor import ChildSpec, Supervisor

    def metrics_env(i: int) -> dict[str, str]:
        return {name: str(port + i if port > 0 else port) for name, port in (
            ("GENRPC_METRICS_PORT", settings.metrics_port), ("GENRPC_BRIDGE_METRICS_PORT", settings.bridge_metrics_port))}

    if settings.engine != "sglang":
        return _run_workers(settings, "serve", settings.service_workers, metrics_env,
                            processes.grpc_serving(settings.grpc_address()), MODEL_LOAD_TIMEOUT_S)

    def engine_host(supervisor: Supervisor) -> ChildSpec:
        # Ready once SGLang's hand-over to attaching workers exists: the host's args in shared memory.
        return ChildSpec("sglang-engine", lambda: [sys.executable, "-m", "genrpc.cli", "serve"],
                         lambda: os.path.exists(f"/dev/shm/multi_tokenizer_args_{supervisor.pid('sglang-engine')}"),
                         MODEL_LOAD_TIMEOUT_S,
                         {**settings_env(settings), "GENRPC_WORKER_OF": str(os.getpid()),
                          "GENRPC_SGLANG_ENGINE_HOST": "true", "GENRPC_METRICS_PORT": "-1"},
                         stop_timeout_s=settings.shutdown_grace_s + 60, stop_last=True)

    return _run_workers(settings, "serve", settings.service_workers, metrics_env,
                        processes.grpc_serving(settings.grpc_address()), MODEL_LOAD_TIMEOUT_S,
                        lambda i, supervisor: ["--sglang-attach-pid", str(supervisor.pid("sglang-engine"))],
                        first=engine_host)


def cmd_bridge(settings: Settings, _: argparse.Namespace) -> int:
    from genrpc.bridge.server import serve

    _logging(settings)
    logging.getLogger("genrpc.bridge").info("GRPC_EXPERIMENTS=%s", os.environ.get("GRPC_EXPERIMENTS", ""))
    if settings.bridge_workers > 1 and not settings.worker_of:
        from genrpc import processes

        # Worker i serves its metrics on --bridge-metrics-port + i (when a fixed port is set).
        return _run_workers(settings, "bridge", settings.bridge_workers,
                            lambda i: {"GENRPC_BRIDGE_METRICS_PORT": str(settings.bridge_metrics_port + i
                                                                         if settings.bridge_metrics_port > 0
                                                                         else settings.bridge_metrics_port)},
                            processes.http_ok(f"http://{settings.host}:{settings.bridge_port}/health"), 60)
    asyncio.run(serve(settings))
    return 0


def _run_workers(settings: Settings, command: str, count: int, env_for: Callable[[int], dict[str, str]],
                 ready: Callable[[], bool], ready_timeout_s: float,
                 argv_for: Callable[[int, Any], list[str]] = lambda i, supervisor: [],
                 first: Callable[[Any], Any] | None = None) -> int:
    """N processes of one command sharing its port (SO_REUSEPORT), so per-token Python work is not bound to one
    GIL. This process only supervises them (genrpc.supervisor: started one after the other, a crashed worker is
    restarted, SIGTERM drains them all at once). A worker's readiness is its port's, which the first worker
    decides alone. `first(supervisor)` gives a child to start before the workers and stop after them."""
    from genrpc.supervisor import ChildSpec, Supervisor

    env = {**settings_env(settings), "GENRPC_WORKER_OF": str(os.getpid())}
    argv = [sys.executable, "-m", "genrpc.cli", command]
    supervisor = Supervisor([], stop_together=True)
    if first is not None:
        supervisor.add(first(supervisor))
    for i in range(count):
        supervisor.add(ChildSpec(f"{command}-{i}", lambda i=i: [*argv, *argv_for(i, supervisor)], ready,
                                 ready_timeout_s, {**env, **env_for(i)}, stop_timeout_s=settings.shutdown_grace_s + 5))
    return supervisor.run()


# glibc gives each thread that allocates its own arena (up to 8 per core); the service's gRPC and engine threads
# then keep freed memory in many arenas, and its RSS crept up ~1% per 1,000-stream cancel storm. Two arenas held it
# flat (measured: 8 storms, 82.0 -> 82.7 MiB against 79.5 -> 85.8 MiB). A MALLOC_ARENA_MAX the user set wins.
SERVICE_ARENAS = "2"


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as GENRPC_* variables, so children see exactly what the parent resolved."""
    return {f"GENRPC_{name.upper()}": str(value) for name, value in settings.model_dump().items()}


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    """Runs the service (serving the bridge too, or a bridge process with --bridge-process) and Envoy under
    genrpc.supervisor (start in order, restart on crash, drain in order)."""
    from genrpc import processes
    from genrpc.envoy import config as envoy_config
    from genrpc.supervisor import ChildSpec, Supervisor

    _logging(settings)
    log = logging.getLogger("genrpc.up")
    env = settings_env(settings)
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="genrpc-up-"))
    try:
        config = envoy_yaml(settings)  # a bad --api-keys-file fails here, before minutes of model loading
    except (OSError, ValueError) as error:
        log.error("envoy config: %s", error)
        return 2
    if settings.api_keys_file:
        log.info("Envoy requires an API key (Authorization: Bearer KEY) from %s", settings.api_keys_file)
    config_path = run_dir / "envoy.yaml"
    config_path.write_text(config)
    cli = [sys.executable, "-m", "genrpc.cli"]
    drain_s = settings.shutdown_grace_s + 5
    service_env = {**env, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", SERVICE_ARENAS)}
    if not settings.bridge_process:
        service_env["GENRPC_SERVE_BRIDGE"] = "true"  # the bridge's app inside the service (bridge/in_service.py)
    specs = [
        ChildSpec("service", lambda: [*cli, "serve"], processes.grpc_serving(settings.grpc_address()),
                  MODEL_LOAD_TIMEOUT_S, service_env, stop_timeout_s=drain_s),
        *([ChildSpec("bridge", lambda: [*cli, "bridge"],
                     processes.http_ok(f"http://{settings.host}:{settings.bridge_port}/health"), 60, env,
                     stop_timeout_s=drain_s)] if settings.bridge_process else []),
        ChildSpec("envoy", lambda: envoy_config.envoy_command(str(config_path), base_id=args.envoy_base_id),
                  processes.http_ok(f"http://127.0.0.1:{settings.envoy_admin_port}/ready"), 60),
    ]

    def announce() -> None:
        print(f"""
genrpc is up (model {settings.model_id}):
  Playground    http://{settings.host}:{settings.envoy_port}/playground
  OpenAI REST   http://{settings.host}:{settings.envoy_port}/v1
  DashScope     http://{settings.host}:{settings.envoy_port}/api/v1/services/aigc/text-generation/generation
  gRPC (Envoy)  {settings.host}:{settings.envoy_port}
  gRPC (direct) {settings.grpc_address()}
  health        http://{settings.host}:{settings.envoy_port}/health/ready
  metrics       http://{settings.host}:{settings.metrics_port}/metrics (service)
                http://{settings.host}:{settings.bridge_metrics_port}/metrics (bridge)
                http://{settings.host}:{settings.envoy_stats_port}/stats/prometheus (Envoy)
Press Ctrl-C to stop.""", flush=True)

    log.info("starting the stack (the service first: loading the model takes a while)")
    return Supervisor(specs, on_ready=announce).run()


def envoy_yaml(settings: Settings, *, listen_host: str | None = None, grpc_host: str | None = None,
               bridge_host: str | None = None, descriptor: str | pathlib.Path | None = None, **options: Any) -> str:
    """Envoy's config for `settings`, the one path from settings to `genrpc.envoy.config.render` (used by
    `genrpc up` and `genrpc envoy-config`). Hosts default to --host; `--api-keys-file` turns on Bearer-key auth,
    `--cors-allowed-origins` CORS, `--rate-limit-rps` the rate limit; `--grpc-upstreams` lists the service
    replicas (default: the one at grpc_host:grpc_port). `options`: render's optional limits
    (unary_timeout_s, stream_idle_timeout_s). The descriptor defaults to the installed one."""
    from genrpc.envoy import config as envoy_config

    keys_file = envoy_config.read_keys_file(settings.api_keys_file) if settings.api_keys_file else None
    tls = None
    if settings.tls_cert_file or settings.tls_key_file or settings.tls_client_ca_file:
        if not (settings.tls_cert_file and settings.tls_key_file):
            raise ValueError("TLS needs both --tls-cert-file and --tls-key-file")
        tls = envoy_config.TlsFiles(str(pathlib.Path(settings.tls_cert_file).resolve()),
                                    str(pathlib.Path(settings.tls_key_file).resolve()),
                                    str(pathlib.Path(settings.tls_client_ca_file).resolve())
                                    if settings.tls_client_ca_file else "")
    return envoy_config.render(
        listen_host=listen_host or settings.host, listen_port=settings.envoy_port,
        admin_port=settings.envoy_admin_port, grpc_host=grpc_host or settings.host, grpc_port=settings.grpc_port,
        bridge_host=bridge_host or settings.host, bridge_port=settings.bridge_port,
        descriptor_path=str(descriptor or envoy_config.descriptor_path()),
        api_keys=keys_file.keys if keys_file else None, client_limits=keys_file.limits if keys_file else None,
        cors_allowed_origins=settings.cors_origins(), rate_limit_rps=settings.rate_limit_rps, tls=tls,
        request_headers_timeout_s=settings.request_headers_timeout_s, request_timeout_s=settings.request_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
        max_request_bytes=settings.max_request_bytes,
        grpc_upstreams=envoy_config.parse_upstreams(settings.grpc_upstreams) or None,
        health_check_interval_s=settings.envoy_health_check_interval_s, stats_port=settings.envoy_stats_port,
        max_generating_requests=settings.gateway_admission_limit(), **options)


ENVOY_SETTINGS = ["host", "grpc_port", "bridge_port", "envoy_port", "envoy_admin_port", "envoy_stats_port",
                  "api_keys_file", "cors_allowed_origins", "rate_limit_rps", "tls_cert_file", "tls_key_file",
                  "tls_client_ca_file", "request_headers_timeout_s", "request_timeout_s", "idle_timeout_s",
                  "grpc_upstreams", "envoy_health_check_interval_s", "max_request_bytes", "envoy_max_requests"]


def cmd_envoy_config(settings: Settings, args: argparse.Namespace) -> int:
    """Renders Envoy's config (e.g. in the Envoy pod's init container, with the API keys from the Secret)."""
    try:
        text = envoy_yaml(settings, listen_host=args.listen_host, grpc_host=args.grpc_host,
                          bridge_host=args.bridge_host, descriptor=args.descriptor,
                          unary_timeout_s=args.unary_timeout_s,
                          stream_idle_timeout_s=args.stream_idle_timeout_s)
    except (OSError, ValueError) as error:
        print(f"genrpc envoy-config: error: {error}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    output = pathlib.Path(args.output)
    partial = output.with_name(f".{output.name}.partial")  # Envoy never sees a half-written file
    partial.write_text(text)
    os.replace(partial, output)
    keys = "with API-key auth" if settings.api_keys_file else "WITHOUT authentication (no --api-keys-file)"
    print(f"genrpc envoy-config: wrote {output} ({keys})", file=sys.stderr)
    return 0


def cmd_chat(settings: Settings, args: argparse.Namespace) -> int:
    """One streamed answer, or an interactive chat without a prompt (genrpc/chat.py)."""
    return chat_module.run(settings, args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bridge"]:  # the command comes first; set before the import below brings in grpc
        os.environ.setdefault("GRPC_EXPERIMENTS", BRIDGE_GRPC_EXPERIMENTS)
    from genrpc.envoy.config import DEFAULT_LIMITS

    parser = argparse.ArgumentParser(prog="genrpc", description="LLM over gRPC and OpenAI REST.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC service")
    settings_module.add_arguments(serve)
    bridge = commands.add_parser("bridge", help="run the SSE bridge")
    settings_module.add_arguments(bridge)
    up = commands.add_parser("up", help="run the service (with the bridge) and Envoy; Ctrl-C stops all")
    settings_module.add_arguments(up)
    up.add_argument("--envoy-base-id", type=int, default=0, help="Envoy --base-id (shared-memory namespace)")
    chat = commands.add_parser("chat", help="chat with the model: one answer, or interactive without a prompt")
    settings_module.add_arguments(chat, ["host", "envoy_port", "grpc_port", "grpc_target", "model_id"])
    chat_module.add_arguments(chat)
    envoy = commands.add_parser("envoy-config", help="write Envoy's config (listener, clusters, API keys)")
    settings_module.add_arguments(envoy, ENVOY_SETTINGS)
    envoy.add_argument("--listen-host", default=None, help="address Envoy's listener binds (default: --host)")
    envoy.add_argument("--grpc-host", default=None, help="host of the gRPC service, an IP or a DNS name such as a "
                                                         "Kubernetes Service (default: --host); ignored when "
                                                         "--grpc-upstreams lists the replicas")
    envoy.add_argument("--bridge-host", default=None, help="host of the SSE bridge (default: --host)")
    envoy.add_argument("--descriptor", default=None,
                       help="path of the proto descriptor set as Envoy will see it (not read here) "
                            "[default: the one installed with genrpc, genrpc/envoy/genrpc.pb]")
    for name, default in DEFAULT_LIMITS.items():
        if name in Settings.model_fields:
            continue  # a setting (e.g. --max-request-bytes): one flag, one default
        envoy.add_argument("--" + name.replace("_", "-"), type=int, default=default,
                           help=f"see genrpc.envoy.config.render [default {default}]")
    envoy.add_argument("--output", "-o", default="-", help="file to write (replaced atomically; - = stdout)")
    args = parser.parse_args(argv)
    settings = settings_module.from_args(args)
    handler = {"serve": cmd_serve, "bridge": cmd_bridge, "up": cmd_up, "chat": cmd_chat,
               "envoy-config": cmd_envoy_config}[args.command]
    return handler(settings, args)


if __name__ == "__main__":
    sys.exit(main())
