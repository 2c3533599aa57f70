"""A synthetic token source for benchmarking the front path (service, bridge, Envoy). Benchmarks only:
it runs no model and its text is not language. Selected with `--engine synthetic`, never the default.

It behaves like a batched engine from the service's point of view: one step loop emits one token to every
running request per step (a GPU decode step does the same), through a per-request asyncio queue, at
`--synthetic-tokens-per-s` steps per second (0 = unpaced: one step per event-loop turn, as fast as the service
can take them). A request runs for exactly `max_tokens` tokens and finishes with `length`.

Emission timestamps: each token's text is its emission time, so a client on the same host can measure the
per-token delivery lag (emission → client) exactly, even when the service merges several tokens into one
message. A token's text is `TOKEN_TEXT_WIDTH` characters: the wall-clock time in microseconds modulo 16**11
(about 203 days), as 11 lowercase hex digits, and a space — 12 bytes, about three times a real token's text,
which makes the payload slightly pessimistic. `parse_emission_times` reads them back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from genrpc.service.engines.base import (
    EngineOverloaded,
    EngineUnavailable,
    EngineUnsupported,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
)

TOKEN_TEXT_WIDTH = 12
_TIME_MODULUS_US = 16 ** 11
SYNTHETIC_TOKEN_ID = 256  # the one id the engine emits; the tokenizer is byte-level below it


def emission_text(now_ns: int) -> str:
    return f"{(now_ns // 1000) % _TIME_MODULUS_US:011x} "


def parse_emission_times(text: str) -> list[int]:
    """The emission times (µs, modulo 16**11) of the synthetic tokens in `text`, in order."""
    return [int(text[i:i + TOKEN_TEXT_WIDTH - 1], 16) for i in range(0, len(text) - TOKEN_TEXT_WIDTH + 1,
                                                                    TOKEN_TEXT_WIDTH)]


def lag_us(emitted_us: int, received_ns: int) -> int:
    """Receive time minus emission time, in µs, across the modulus wrap."""
    return ((received_ns // 1000) - emitted_us) % _TIME_MODULUS_US


class ByteTokenizer:
    """Byte-level tokenizer (ids 0-255 are bytes; 256 is the synthetic token) with a plain chat template."""

    vocab_size = SYNTHETIC_TOKEN_ID + 1
    supports_tools = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode(errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        def content(value: Any) -> str:
            if isinstance(value, str):
                return value
            return "".join(part.get("text", "") for part in value or [])
        return self.encode("".join(f"<|{m['role']}|>{content(m.get('content'))}\n" for m in messages)
                           + "<|assistant|>")


@dataclass(frozen=True)
class SyntheticEngineConfig:
    model_id: str
    tokens_per_s: float = 0.0  # per stream; 0 = unpaced
    max_queue: int = 256
    context_length: int = 0  # 0 = effectively unbounded


class SyntheticEngine:
    def __init__(self, config: SyntheticEngineConfig) -> None:
        self._rate = float(config.tokens_per_s)
        self._max_queue = config.max_queue
        self._info = ModelInfo(model_id=config.model_id, context_length_tokens=config.context_length or 1 << 20,
                               owned_by="genrpc-synthetic", fingerprint="genrpc-synthetic")
        self._tokenizer = ByteTokenizer()
        self._queues: dict[str, asyncio.Queue[GenerationDelta]] = {}
        self._progress: dict[str, tuple[GenerationRequest, int]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> ByteTokenizer:
        return self._tokenizer

    @property
    def running_requests(self) -> int:
        return len(self._progress)

    @property
    def waiting_requests(self) -> int:
        return 0

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._step_loop())

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None

    async def _step_loop(self) -> None:
        interval = 1.0 / self._rate if self._rate > 0 else 0.0
        next_step = time.monotonic()
        while True:
            if not self._progress:
                self._wake.clear()
                await self._wake.wait()
                next_step = time.monotonic()
            text = emission_text(time.time_ns())
            for request_id, (request, done) in list(self._progress.items()):
                done += 1
                last = done >= request.sampling.max_tokens
                self._queues[request_id].put_nowait(GenerationDelta(
                    text=text, token_ids=(SYNTHETIC_TOKEN_ID,), completion_tokens=done,
                    prompt_tokens=len(request.prompt_token_ids),
                    finish_reason=FinishReason.LENGTH if last else None))
                if last:
                    del self._progress[request_id]
                else:
                    self._progress[request_id] = (request, done)
            if interval:  # absolute schedule: a late step does not push back the next ones
                next_step += interval
                await asyncio.sleep(max(0.0, next_step - time.monotonic()))
            else:
                await asyncio.sleep(0)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if self._loop_task is None:
            raise EngineUnavailable("the synthetic engine is not started")
        if request.sampling.logprobs is not None:
            raise EngineUnsupported("the synthetic engine reports no logprobs", "logprobs")
        if len(self._progress) >= self._max_queue:
            raise EngineOverloaded("the synthetic engine is at --max-queue running requests")
        queue: asyncio.Queue[GenerationDelta] = asyncio.Queue()
        self._queues[request.request_id] = queue
        self._progress[request.request_id] = (request, 0)
        self._wake.set()
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            self._progress.pop(request.request_id, None)
            self._queues.pop(request.request_id, None)
