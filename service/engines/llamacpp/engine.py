"""LlamaCppEngine: llama.cpp's server (slots, continuous batching, sampler, grammar) in process via `xllamacpp`.

Read from xllamacpp 2026.10.11549 (src/xllamacpp/server.cpp, xllamacpp.pyx) and llama.cpp's tools/server
(server-task.cpp `params_from_json_cmpl`, server-context.cpp `process_token`):

- `Server.handle_completions(dict, callback)` runs llama-server's `/v1/completions` route on the calling thread
  (GIL released). With `stream: true` the callback gets one chunk per *sent* piece of text; returning True
  from it drops the response, which cancels the slot's task (the slot stops within a decode step).
- The prompt may be a list of token ids (the service renders and truncates prompts itself).
- A token that ends in the middle of a UTF-8 character is not sent on its own: its text (and id) arrive with
  the token that completes the character. `timings_per_token` makes every chunk carry `predicted_n`, so the
  delta still counts every token. `n_probs >= 1` gives the id of the chunk's last token, but costs a softmax and
  sort of the whole vocabulary per token (~5% of decode speed with SmolLM2's 49k vocabulary), so it is asked
  for only when the request needs ids from llama.cpp (logprobs, stop_token_ids); otherwise, and for the ids
  before the last of a merged chunk, the ids are recovered from the chunk's bytes (llama.cpp reports no
  logprobs for those).
- Greedy requests (temperature <= 0) send `top_k: 1`: the same argmax after biases and penalties, without a
  pass over the whole vocabulary in the later samplers (another ~5%).
- Penalties (`repeat_penalty`, `frequency_penalty`, `presence_penalty`) count the last `repeat_last_n` tokens of
  prompt + output (the sampler accepts the prompt tokens); this build rejects -1, so the window is set to the
  context length (the whole sequence, as HF's repetition_penalty).
- `ignore_eos` adds -inf logit biases on every end-of-generation token; `n_probs` reports natural-log
  probabilities of the distribution before sampling (`post_sampling_probs` false).
- Requests beyond the slots would wait in llama-server's own queue; this adapter admits at most `slots`
  requests, so `running_requests` is exact and the wait is bounded by `max_queue` (EngineOverloaded).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import pathlib
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from genrpc.service.engines.base import (EngineBadRequest, EngineInternalError, EngineOverloaded, EngineUnavailable,
                                         EngineUnsupported, FinishReason, GenerationDelta, GenerationRequest, ModelInfo,
                                         SamplingParams, TokenLogprob, started)
from genrpc.service.engines.llamacpp.grammar import gbnf_from_xgrammar
from genrpc.service.engines.llamacpp.tokenizer import GGUFTokenizer, load_cached

log = logging.getLogger(__name__)
_MAX_TOKEN_BYTES = 64  # longest token (in bytes) tried when recovering ids of merged chunks


@dataclass(frozen=True)
class LlamaCppEngineConfig:
    """What the llama.cpp engine needs from Settings."""

    gguf_path: pathlib.Path
    cache_dir: pathlib.Path
    model_id: str
    context_length: int = 0  # 0 = the model's own
    slots: int = 16
    max_queue: int = 256
    threads: int = 0  # 0 = all cores
    nice: int = 0  # added to the nice value of llama.cpp's own threads (0 = as the service's; Settings: 5)



def request_body(request: GenerationRequest) -> dict[str, Any]:
    """GenerationRequest -> llama-server completion request; EngineUnsupported for what llama.cpp lacks."""
    s = request.sampling
    if s.top_a:
        raise EngineUnsupported("top_a is not supported by the llama.cpp engine (llama.cpp has no top-a sampler)",
                                "top_a")
    ignore_eos = s.ignore_eos
    if s.min_tokens:
        if s.min_tokens < s.max_tokens and not ignore_eos:
            raise EngineUnsupported("min_tokens below max_tokens is not supported by the llama.cpp engine "
                                    "(llama.cpp has no minimum-length sampler); use ignore_eos", "min_tokens")
        ignore_eos = True  # EOS masked for the whole completion
    body: dict[str, Any] = {
        "prompt": [int(t) for t in request.prompt_token_ids],
        "n_predict": int(s.max_tokens),
        "stream": True,
        "timings_per_token": True,  # `predicted_n` in every chunk: exact token counts
        "n_probs": max(1, s.logprobs or 0) if needs_reported_ids(s) else 0,
        "post_sampling_probs": False,
        "cache_prompt": True,
        "temperature": float(s.temperature),  # <= 0: greedy
        "top_p": float(s.top_p),
        "top_k": 1 if s.temperature <= 0 else int(s.top_k),  # 0 = off in both
        "min_p": float(s.min_p),
        "typical_p": 1.0,
        "repeat_penalty": float(s.repetition_penalty),
        "frequency_penalty": float(s.frequency_penalty),
        "presence_penalty": float(s.presence_penalty),
        # repeat_last_n: set by the engine to the context window (HF's repetition_penalty sees the whole sequence)
        "dry_multiplier": 0.0,
        "xtc_probability": 0.0,
        "mirostat": 0,
        "ignore_eos": ignore_eos,
        "logit_bias": {str(int(t)): float(b) for t, b in s.logit_bias.items()},
    }
    if s.seed is not None:
        body["seed"] = int(s.seed) & 0xFFFFFFFF  # llama.cpp seeds are uint32; 0xFFFFFFFF means "random"
        if body["seed"] == 0xFFFFFFFF:
            body["seed"] = 0xFFFFFFFE
    if s.json_schema is not None:
        body["json_schema"] = json.loads(s.json_schema)
    elif s.ebnf is not None:
        body["grammar"] = gbnf_from_xgrammar(s.ebnf)
    return body


def needs_reported_ids(sampling: SamplingParams) -> bool:
    """Whether llama.cpp must report each token's id (n_probs), rather than the adapter recovering it."""
    return sampling.logprobs is not None or bool(sampling.stop_token_ids)


def threads(config: LlamaCppEngineConfig) -> int:
    return config.threads or os.cpu_count() or 1


def server_params(config: LlamaCppEngineConfig, context: int) -> Any:
    """llama-server's parameters for `config` (also used by the benchmark's plain-xllamacpp baseline)."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(config.gguf_path)
    params.n_parallel = config.slots
    # One KV pool shared by the slots (kv_unified): every slot may use the whole context window, and memory
    # is bounded by one window rather than slots x window.
    params.n_ctx = context
    params.kv_unified = True
    # 8-bit KV cache (half of f16: ~95 MB less for SmolLM2's 8k window); a quantized V cache needs flash
    # attention.
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.cache_type_k = xllamacpp.ggml_type.GGML_TYPE_Q8_0
    params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_Q8_0
    params.cpuparams.n_threads = threads(config)
    params.cpuparams_batch.n_threads = threads(config)
    params.verbosity = -1  # llama.cpp's own logging: errors only
    params.cache_ram_mib = 0  # no host-RAM prompt cache beyond the slots' own KV
    # xllamacpp also starts llama-server's HTTP listener (on a free loopback port); an unguessable API key
    # keeps it closed. The in-process calls do not go through HTTP.
    params.api_keys = [secrets.token_hex(32)]
    params.endpoint_metrics = False
    return params


class _Stream:
    """One request's bridge from llama.cpp's worker thread to the asyncio consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: GenerationRequest, stop_ids: frozenset[int],
                 tokenizer: GGUFTokenizer, recover) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request = request
        self.stop_ids = stop_ids
        self.tokenizer = tokenizer
        self.recover = recover
        self.cancelled = False
        self.finished = False
        self.generated = 0
        self.prompt_tokens = len(request.prompt_token_ids)

    def _put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def on_chunk(self, chunk: dict[str, Any]) -> bool:
        """llama.cpp's callback (worker thread). Returns True to cancel the request."""
        if self.cancelled or self.finished:
            return True
        try:
            return self._handle(chunk)
        except Exception as exc:  # noqa: BLE001 - never let an exception cross into C++
            log.exception("bad chunk from llama.cpp")
            self.finished = True
            self._put(EngineInternalError(f"llama.cpp returned an unexpected chunk: {exc!r}"))
            return True

    def _handle(self, chunk: dict[str, Any]) -> bool:
        if "error" in chunk or "choices" not in chunk:
            self.finished = True
            self._put(_error(chunk.get("error", chunk), self.request.sampling))
            return True
        choice = chunk["choices"][0]
        text = choice.get("text") or ""
        timings = chunk.get("timings") or {}
        usage = chunk.get("usage") or {}
        total = int(usage.get("completion_tokens", timings.get("predicted_n", self.generated)))
        count = max(0, total - self.generated)
        entries = (choice.get("logprobs") or {}).get("content") or []
        ids, logprobs = self._ids_and_logprobs(text, count, entries)
        reason = _finish_reason(choice.get("finish_reason"))
        for i, token in enumerate(ids):
            if token in self.stop_ids:  # a stop token: counted, its text is not part of the completion
                kept = ids[:i + 1]
                self.generated = max(total - (len(ids) - len(kept)), self.generated + len(kept))
                before = b"".join(self.tokenizer.token_bytes(t) for t in ids[:i])
                self.finished = True
                self._put(GenerationDelta(text=before.decode("utf-8", errors="ignore"), token_ids=tuple(kept),
                                          completion_tokens=self.generated, prompt_tokens=self.prompt_tokens,
                                          finish_reason=FinishReason.STOP, logprobs=logprobs[:len(kept)]))
                return True
        self.generated = max(total, self.generated + len(ids))
        if reason is not None:
            self.finished = True
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
            self._put(GenerationDelta(text=text, token_ids=tuple(ids), completion_tokens=self.generated,
                                      prompt_tokens=int(usage.get("prompt_tokens", self.prompt_tokens)),
                                      finish_reason=reason, cached_prompt_tokens=cached, logprobs=logprobs))
            return False
        if ids or text:
            self._put(GenerationDelta(text=text, token_ids=tuple(ids), completion_tokens=self.generated,
                                      prompt_tokens=self.prompt_tokens, logprobs=logprobs))
        return False

    def _ids_and_logprobs(self, text: str, count: int, entries: list[dict[str, Any]]):
        if count == 0:
            return [], ()
        want = self.request.sampling.logprobs
        last = entries[-1] if entries else None
        logprobs: tuple[TokenLogprob, ...] = ()
        if want is not None and last is not None:
            top = tuple((int(t["id"]), float(t["logprob"])) for t in last.get("top_logprobs", [])[:want])
            logprobs = (TokenLogprob(int(last["id"]), float(last["logprob"]), top),)
        if last is None:
            # No ids reported (n_probs 0), or a final chunk whose token has no text: recover them from the bytes.
            return (self.recover(text.encode("utf-8"), count) if text else []), logprobs
        ids = [int(last["id"])]
        if count > 1:
            # Tokens ending mid-character arrive merged with the one completing it: recover their ids.
            # The last entry's `bytes` are the whole merged text; the last token's own bytes end it.
            own = self.tokenizer.token_bytes(ids[0])
            merged = text.encode("utf-8")
            prefix = merged[:len(merged) - len(own)] if own and merged.endswith(own) else merged
            ids = self.recover(prefix, count - 1) + ids
        return ids, logprobs


def _finish_reason(value: Any) -> FinishReason | None:
    if value is None:
        return None
    return FinishReason.STOP if value == "stop" else FinishReason.LENGTH


def _error(error: Any, sampling: SamplingParams) -> Exception:
    if not isinstance(error, dict):
        return EngineInternalError(f"llama.cpp error: {error}")
    message = str(error.get("message") or error)
    kind = error.get("type")
    if kind == "exceed_context_size_error":
        return EngineBadRequest(message, "messages")
    if kind == "invalid_request_error" or int(error.get("code") or 500) == 400:
        field = "response_format" if sampling.json_schema else "tool_choice" if sampling.ebnf else "request"
        return EngineBadRequest(message, field)
    if kind == "unavailable_error":
        return EngineUnavailable(message)
    return EngineInternalError(f"llama.cpp error: {message}")


class LlamaCppEngine:
    """The Engine protocol over xllamacpp.Server. See the module docstring."""

    def __init__(self, config: LlamaCppEngineConfig) -> None:
        self._config = config
        self._server: Any = None
        self._tokenizer: GGUFTokenizer | None = None
        self._model_info: ModelInfo | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._running = 0
        self._waiting = 0
        self._slot_free: asyncio.Condition | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopping = False
        self._bytes_to_id: dict[bytes, int] | None = None
        self._lock = threading.Lock()
        self._streams: set[_Stream] = set()

    # --- Engine protocol ---------------------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        return started(self._model_info, "llama.cpp")

    @property
    def tokenizer(self) -> GGUFTokenizer:
        return started(self._tokenizer, "llama.cpp")

    @property
    def running_requests(self) -> int:
        return self._running

    @property
    def waiting_requests(self) -> int:
        return self._waiting

    @property
    def max_running_requests(self) -> int:
        return self._config.slots

    async def start(self) -> None:
        gguf = self._config.gguf_path
        if gguf.is_dir():
            raise ValueError(f"{gguf} is a directory: the llama.cpp engine serves .gguf files (an HF model "
                             f"directory runs on --engine reference)")
        if not gguf.is_file():
            raise FileNotFoundError(f"model not found: {gguf} (the llama.cpp engine serves a .gguf file)")
        t0 = time.perf_counter()
        self._tokenizer, metadata = await asyncio.to_thread(load_cached, gguf, self._config.cache_dir)
        # Built on a thread of its own whose nice value its threads inherit (llama-server's loop and ggml's pool);
        # an unprivileged process cannot lower a thread's nice value again, so not on a shared pool thread.
        loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llamacpp-load",
                                                       initializer=self._lower_priority)
        try:
            self._server, context = await asyncio.get_running_loop().run_in_executor(loader, self._load, metadata)
        finally:
            loader.shutdown(wait=False)  # a start cancelled meanwhile must not block the loop on the load
        self._slot_free = asyncio.Condition()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self._config.slots,
                                                               thread_name_prefix="llamacpp")
        self._model_info = ModelInfo(
            model_id=self._config.model_id, context_length_tokens=context,
            fingerprint="llamacpp-" + gguf.stem[:40])
        log.info("loaded %s in %.1f s (%d slots, %d threads)", gguf.name, time.perf_counter() - t0,
                 self._config.slots, threads(self._config))
        await self._warm_up()

    def _load(self, metadata: dict[str, Any]) -> tuple[Any, int]:
        import xllamacpp

        context = self._config.context_length or int(metadata.get("context_length") or 4096)
        try:
            server = xllamacpp.Server(server_params(self._config, context))
        except RuntimeError as exc:
            raise RuntimeError(f"llama.cpp could not load {self._config.gguf_path}: {exc}") from exc
        return server, context

    def _lower_priority(self) -> None:
        """Adds `nice` to the calling thread's nice value; the threads it starts inherit it (the service's own
        threads keep theirs)."""
        if self._config.nice:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self._config.nice)

    async def _warm_up(self) -> None:
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
        sampling = SamplingParams(max_tokens=4, temperature=0.0)
        async for _ in self.generate(GenerationRequest("warm-up", prompt, sampling)):
            pass

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if self._server is None or self._stopping:
            raise EngineUnavailable("the engine is not running")
        body = request_body(request)
        context = self.model_info.context_length_tokens
        if not request.prompt_token_ids:
            raise EngineBadRequest("the prompt is empty", "messages")
        if len(request.prompt_token_ids) >= context:
            raise EngineBadRequest(f"the prompt has {len(request.prompt_token_ids)} tokens; the context window is "
                                   f"{context}", "messages")
        body["repeat_last_n"] = context
        body["n_predict"] = min(body["n_predict"], context - len(request.prompt_token_ids))
        queued_at = time.perf_counter()
        await self._acquire_slot()
        queue_time_s: float | None = time.perf_counter() - queued_at  # reported on the first delta
        stream = _Stream(asyncio.get_running_loop(), request, frozenset(request.sampling.stop_token_ids),
                         self.tokenizer, self._recover_ids)
        assert self._executor is not None
        self._streams.add(stream)
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._run, body, stream)
        future.add_done_callback(lambda _: asyncio.ensure_future(self._release_slot()))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if queue_time_s is not None:
                    item, queue_time_s = dataclasses.replace(item, queue_time_s=queue_time_s), None
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            stream.cancelled = True  # the next callback returns True: llama.cpp frees the slot
            self._streams.discard(stream)

    def _run(self, body: dict[str, Any], stream: _Stream) -> None:
        try:
            self._server.handle_completions(body, stream.on_chunk)
        except Exception as exc:  # noqa: BLE001
            log.exception("llama.cpp request failed")
            stream._put(EngineInternalError(f"llama.cpp request failed: {exc!r}"))
            return
        if not (stream.finished or stream.cancelled):
            stream._put(EngineInternalError("llama.cpp ended the stream without a finish reason"))

    async def _acquire_slot(self) -> None:
        assert self._slot_free is not None
        async with self._slot_free:
            if self._running < self._config.slots:
                self._running += 1
                return
            if self._waiting >= self._config.max_queue:
                raise EngineOverloaded(f"{self._waiting} requests are already waiting for a llama.cpp slot")
            self._waiting += 1
            try:
                await self._slot_free.wait_for(lambda: self._running < self._config.slots or self._stopping)
            finally:
                self._waiting -= 1
            if self._stopping:
                raise EngineUnavailable("the engine was shut down")
            self._running += 1

    async def _release_slot(self) -> None:
        assert self._slot_free is not None
        async with self._slot_free:
            self._running -= 1
            self._slot_free.notify()

    def _recover_ids(self, prefix: bytes, count: int) -> list[int]:
        """Splits `prefix` into exactly `count` vocabulary tokens (the ids llama.cpp merged into one chunk)."""
        if count == 1 and self._bytes_to_id is not None:
            token = self._bytes_to_id.get(prefix)  # the common case: one whole token per chunk
            if token is not None:
                return [token]
        with self._lock:
            if self._bytes_to_id is None:
                tok = self.tokenizer
                table: dict[bytes, int] = {}
                for token_id in range(tok.vocab_size):
                    table.setdefault(tok.token_bytes(token_id), token_id)
                self._bytes_to_id = table
        table = self._bytes_to_id

        @functools.lru_cache(maxsize=None)
        def split(start: int, left: int) -> tuple[int, ...] | None:
            if start == len(prefix):
                return () if left == 0 else None
            if left == 0:
                return None
            for end in range(min(len(prefix), start + _MAX_TOKEN_BYTES), start, -1):
                token = table.get(prefix[start:end])
                if token is not None:
                    rest = split(end, left - 1)
                    if rest is not None:
                        return (token,) + rest
            return None

        found = split(0, count)
        if found is None:
            log.warning("could not split %r into %d tokens; re-encoding it", prefix, count)
            return self.tokenizer.encode(prefix.decode("utf-8", errors="replace"))
        return list(found)

    async def shutdown(self) -> None:
        self._stopping = True
        if self._slot_free is not None:
            async with self._slot_free:
                self._slot_free.notify_all()
        for stream in list(self._streams):
            stream.cancelled = True
            stream.queue.put_nowait(EngineUnavailable("the engine was shut down"))
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(_destroy, server)


def _destroy(server: Any) -> None:
    del server  # ~Server terminates llama.cpp's loop and joins its thread
