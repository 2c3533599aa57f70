"""`genrpc chat`: talk to a running genrpc from the terminal.

`genrpc chat "question"` streams one answer (for scripts); `genrpc chat` alone opens a REPL with multi-turn
history. By default it speaks OpenAI REST to Envoy (the official `openai` SDK, streamed, usage included), so it
exercises what OpenAI clients use; `--grpc` speaks the `Chat` RPC to the service instead. Ctrl-C while an answer
streams stops it: the HTTP connection is closed (Envoy and the bridge then cancel the generation) or the gRPC
call is cancelled, and the REPL carries on. After each answer: finish reason, usage, time to first token and
decode speed, on stderr (so `genrpc chat "…" > answer.txt` keeps only the answer).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

PROMPT = ">>> "
HELP = """Commands:
  /reset              forget the conversation (keeps the system prompt)
  /system [TEXT]      set the system prompt (no TEXT: remove it)
  /set NAME VALUE     set temperature, top_p, max_tokens or seed (VALUE `none` unsets)
  /show               show the model, endpoint and parameters
  /exit               leave (also Ctrl-D)
Ctrl-C stops the answer being written (the server stops generating it)."""


@dataclass
class Params:
    max_tokens: int | None = 256
    temperature: float | None = 0.7
    top_p: float | None = None
    seed: int | None = None

    def set(self, name: str, value: str) -> None:
        """Sets a parameter from its text (`none` unsets it); ValueError names what is wrong."""
        kinds = {"max_tokens": int, "temperature": float, "top_p": float, "seed": int}
        if name not in kinds:
            raise ValueError(f"unknown parameter {name!r} (one of {', '.join(kinds)})")
        setattr(self, name, None if value.lower() == "none" else kinds[name](value))


@dataclass
class Answer:
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    stopped: bool = False  # Ctrl-C
    error: str = ""

    def summary(self) -> str:
        parts = ["stopped" if self.stopped else ("error" if self.error else self.finish_reason or "?")]
        if self.prompt_tokens is not None:
            parts.append(f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens")
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s:.2f} s")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        return "[" + " · ".join(parts) + "]"


@dataclass
class Delta:
    """One streamed event: text, and/or the finish reason, and/or usage."""
    text: str = ""
    finish_reason: str = ""
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens)


class ChatError(Exception):
    """The server's error message (or why it could not be reached)."""


class RestBackend:
    """OpenAI REST through Envoy, with the official SDK."""

    def __init__(self, base_url: str, api_key: str, model: str, timeout_s: float):
        import openai

        self.endpoint = base_url
        self.model = model
        self._openai = openai
        # no retries: a retried stream would silently start over; no key given -> a placeholder, never the
        # OPENAI_API_KEY of the environment (it belongs to another service)
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", max_retries=0,
                                    timeout=timeout_s)

    def stream(self, messages: list[dict[str, str]], params: Params) -> Iterator[Delta]:
        openai = self._openai
        extra: dict[str, Any] = {k: v for k, v in (("max_tokens", params.max_tokens),
                                                   ("temperature", params.temperature), ("top_p", params.top_p),
                                                   ("seed", params.seed)) if v is not None}
        try:
            stream = self.client.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                         stream_options={"include_usage": True}, **extra)
        except openai.APIStatusError as e:
            raise ChatError(_openai_message(e)) from None
        except openai.APIConnectionError as e:
            raise ChatError(f"cannot reach {self.endpoint}: {e.__cause__ or e}") from None
        # closing the stream closes the connection: Envoy and the bridge cancel the generation
        with contextlib.closing(stream):
            try:
                for chunk in stream:
                    usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) if chunk.usage else None
                    if not chunk.choices:
                        yield Delta(usage=usage)
                    for choice in chunk.choices:
                        yield Delta(choice.delta.content or "", choice.finish_reason or "", usage)
            except openai.APIError as e:  # an SSE error event after the stream started
                raise ChatError(_openai_message(e)) from None
            except openai.APIConnectionError as e:
                raise ChatError(f"connection lost: {e.__cause__ or e}") from None


def _openai_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):  # the SDK unwraps {"error": {...}}
        message = body.get("message") or (body.get("error") or {}).get("message")
        if message:
            status = getattr(e, "status_code", None)
            return f"{status}: {message}" if status else str(message)
    return str(e)


class GrpcBackend:
    """The `Chat` RPC (server streaming)."""

    def __init__(self, target: str, api_key: str, model: str, timeout_s: float):
        import grpc

        from genrpc.v1 import generation_service_pb2_grpc

        self.endpoint = f"grpc://{target}"
        self.model = model
        self.timeout_s = timeout_s
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self._grpc = grpc
        self.channel = grpc.insecure_channel(target)
        self.stub = generation_service_pb2_grpc.GenerationServiceStub(self.channel)

    def stream(self, messages: list[dict[str, str]], params: Params) -> Iterator[Delta]:
        from google.protobuf import json_format

        from genrpc.v1 import chat_pb2

        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}}
        body.update({k: v for k, v in vars(params).items() if v is not None})
        request = json_format.ParseDict(body, chat_pb2.ChatCompletionRequest())
        call = self.stub.Chat(request, timeout=self.timeout_s, metadata=self.metadata)
        try:
            for chunk in call:
                usage = ((chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                         if chunk.HasField("usage") else None)
                if not chunk.choices:
                    yield Delta(usage=usage)
                for choice in chunk.choices:
                    yield Delta(choice.delta.content, choice.finish_reason.string_value, usage)
        except self._grpc.RpcError as e:
            raise ChatError(f"{e.code().name}: {e.details()}") from None
        finally:
            call.cancel()  # no-op once the call finished; on Ctrl-C it stops the generation


def answer(backend: Any, messages: list[dict[str, str]], params: Params, out: TextIO) -> Answer:
    """Streams one answer to `out`; Ctrl-C stops it (the partial text is kept)."""
    result = Answer()
    started = time.perf_counter()
    first_at = last_at = None
    chunks = 0
    events = backend.stream(messages, params)
    try:
        with contextlib.closing(events):
            for delta in events:
                if delta.text:
                    last_at = time.perf_counter()
                    if first_at is None:
                        first_at = last_at
                        result.ttft_s = first_at - started
                    chunks += 1
                    result.text += delta.text
                    out.write(delta.text)
                    out.flush()
                if delta.finish_reason:
                    result.finish_reason = delta.finish_reason
                if delta.usage:
                    result.prompt_tokens, result.completion_tokens = delta.usage
    except KeyboardInterrupt:
        result.stopped = True
    except ChatError as e:
        result.error = str(e)
    tokens = result.completion_tokens if result.completion_tokens is not None else chunks
    if first_at is not None and last_at is not None and last_at > first_at and tokens > 1:
        result.tokens_per_s = (tokens - 1) / (last_at - first_at)  # decode speed, after the first token
    return result


@dataclass
class Session:
    backend: Any
    params: Params
    system: str = ""
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def turn(self, text: str, out: TextIO, err: TextIO) -> Answer:
        self.history.append({"role": "user", "content": text})
        result = answer(self.backend, self.messages(), self.params, out)
        if result.text:
            out.write("\n")
            self.history.append({"role": "assistant", "content": result.text})
        else:
            self.history.pop()  # nothing came back: the question can simply be asked again
        if result.error:
            err.write(f"error: {result.error}\n")
        err.write(result.summary() + "\n")
        err.flush()
        return result

    def command(self, line: str, err: TextIO) -> bool:
        """Runs a /command; False means leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.history.clear()
            err.write("(conversation cleared)\n")
        elif name == "/system":
            self.system = rest
            err.write(f"(system prompt {'set' if rest else 'removed'})\n")
        elif name == "/set":
            parts = rest.split()
            try:
                if len(parts) != 2:
                    raise ValueError("usage: /set NAME VALUE")
                self.params.set(*parts)
                err.write(f"({parts[0]} = {getattr(self.params, parts[0])})\n")
            except ValueError as e:
                err.write(f"error: {e}\n")
        elif name == "/show":
            err.write(f"model {self.backend.model} at {self.backend.endpoint}; {vars(self.params)}; "
                      f"system prompt: {self.system or '(none)'}; {len(self.history)} messages\n")
        elif name in ("/help", "/?"):
            err.write(HELP + "\n")
        else:
            err.write(f"unknown command {name} (/help lists them)\n")
        err.flush()
        return True


def repl(session: Session, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    err.write(f"genrpc chat: {session.backend.model} at {session.backend.endpoint}\n"
              "/help for commands; Ctrl-C stops an answer, Ctrl-D or /exit leaves.\n")
    err.flush()
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
            out.write("^C\n")
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line, err):
                return 0
            continue
        session.turn(line, out, err)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="*", help="the user message; none: an interactive chat")
    parser.add_argument("--system", default="", help="a system message")
    parser.add_argument("--max-tokens", type=int, default=256, help="maximum tokens per answer")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible answers)")
    parser.add_argument("--timeout", type=float, default=300, help="per-answer deadline in seconds")
    parser.add_argument("--grpc", action="store_true",
                        help="speak gRPC to --grpc-target (default: the service at --host:--grpc-port) instead of "
                             "OpenAI REST to Envoy")
    parser.add_argument("--base-url", default="",
                        help="OpenAI REST base URL [default: http://HOST:ENVOY_PORT/v1]")
    parser.add_argument("--api-key", default=None,
                        help="API key, sent as Authorization: Bearer KEY [env GENRPC_API_KEY]")


def run(settings: Any, args: argparse.Namespace) -> int:
    api_key = args.api_key if args.api_key is not None else os.environ.get("GENRPC_API_KEY", "")
    if args.grpc:
        backend: Any = GrpcBackend(settings.grpc_address(), api_key, settings.model_id, args.timeout)
    else:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        base_url = args.base_url or f"http://{host}:{settings.envoy_port}/v1"
        backend = RestBackend(base_url, api_key, settings.model_id, args.timeout)
    params = Params(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    session = Session(backend, params, system=args.system)
    if not args.prompt:
        return repl(session)
    result = session.turn(" ".join(args.prompt), sys.stdout, sys.stderr)
    return 130 if result.stopped else (1 if result.error else 0)
