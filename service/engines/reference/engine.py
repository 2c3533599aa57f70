"""ReferenceEngine: torch + transformers on CPU, continuous batching in one worker thread.

The asyncio side only queues jobs and reads per-request asyncio.Queues; the model runs exclusively on the
worker thread, which loops: drop finished/cancelled rows -> admit waiting jobs (prefill each alone, merge into
the shared cache) -> one decode step for all rows. Deltas cross back with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from genrpc.service.engines.base import (EngineBadRequest, EngineInternalError, EngineOverloaded, EngineUnavailable,
                                         FinishReason, GenerationDelta, GenerationRequest, ModelInfo, SamplingParams,
                                         started)
from genrpc.service.engines.reference import invariance
from genrpc.service.engines.reference.config import ReferenceEngineConfig
from genrpc.service.engines.reference.batch import Job, SharedBatch, finish_reason
from genrpc.service.engines.reference.grammar import GrammarCompilerCache, RowGrammar, is_constrained
from genrpc.service.engines.reference.model_store import resolve_model_dir
from genrpc.service.engines.reference.sampling import Sampler
from genrpc.service.engines.hf_tokenizer import HFTokenizer

log = logging.getLogger(__name__)


class ReferenceEngine:
    """The bit-exact reference engine. See the module docstring and `batch.py` for the batching scheme."""

    def __init__(self, config: ReferenceEngineConfig) -> None:
        self._config = config
        self._model: Any = None
        self._tokenizer: HFTokenizer | None = None
        self._model_info: ModelInfo | None = None
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running = 0  # jobs taken off the queue and not yet dropped from the batch
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch: SharedBatch | None = None
        self._grammars: GrammarCompilerCache | None = None
        # Observability (read by tests and benchmarks).
        self.max_batch_size_seen = 0  # most rows decoded together in one step
        self.decode_steps = 0
        self.admitted_requests = 0  # jobs that got a slot (a job cancelled while queued never counts)

    # --- Engine protocol ---------------------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        return started(self._model_info, "reference")

    @property
    def tokenizer(self) -> HFTokenizer:
        return started(self._tokenizer, "reference")

    @property
    def running_requests(self) -> int:
        return self._running

    @property
    def waiting_requests(self) -> int:
        # Jobs that already have a free slot are admitted at the next step; they are not queued for one.
        return max(0, len(self._waiting) - max(0, self._config.max_batch_size - self._running))

    @property
    def max_running_requests(self) -> int:
        return self._config.max_batch_size

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._worker, name="cpu-engine", daemon=True)
        self._thread.start()
        t0 = time.perf_counter()
        await self._warm_up()
        log.info("warm-up took %.1f s", time.perf_counter() - t0)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        self._validate(request)
        grammar = None
        if is_constrained(request.sampling):
            if self._grammars is None:
                raise EngineUnavailable("the engine has not started")
            # Off the worker thread (and the event loop): one compile never stalls the running batch.
            grammar = await asyncio.to_thread(self._grammars.compile, request.sampling)
        job = self._submit(request, asyncio.get_running_loop(), grammar)
        try:
            while True:
                item = await job.deltas.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._cancel(job)

    async def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._model = self._batch = None

    # --- loading -------------------------------------------------------------------------------------------

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        torch.set_num_threads(self._config.torch_threads or os.cpu_count() or 1)  # process-wide
        model_dir = resolve_model_dir(self._config.model, self._config.cache_dir)
        self._tokenizer = HFTokenizer.from_pretrained(model_dir)
        # fp32: this class of CPU has no native bf16 (bf16 is slower here).
        invariance.register_attention()
        self._model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation=invariance.ATTN_IMPLEMENTATION).eval()
        if self._config.batch_invariant:
            invariance.block_linear_rows(self._model)
        self._batch = SharedBatch(self._model)
        config = self._model.config
        # Cheap: xgrammar and its TokenizerInfo are only loaded by the first constrained request.
        self._grammars = GrammarCompilerCache(self._tokenizer.hf, int(config.vocab_size),
                                              self._tokenizer.eos_token_ids)
        self._model_info = ModelInfo(
            model_id=self._config.model_id,
            context_length_tokens=self._config.context_length or int(config.max_position_embeddings),
            fingerprint="cpu-" + hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:10],
        )
        log.info("loaded %s in %.1f s (%s threads)", model_dir, time.perf_counter() - t0, torch.get_num_threads())

    async def _warm_up(self) -> None:
        """Runs a tiny batch of two through the real path (prefill, merge, decode, drop), then resets stats."""
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
        sampling = SamplingParams(max_tokens=4, temperature=0.0)

        async def one(i: int) -> None:
            async for _ in self.generate(GenerationRequest(f"warm-up-{i}", prompt, sampling)):
                pass

        await asyncio.gather(one(0), one(1))
        self.max_batch_size_seen = self.decode_steps = self.admitted_requests = 0

    # --- the asyncio side ------------------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        """Raises EngineBadRequest (or EngineUnavailable) for a request that cannot run."""
        context = self.model_info.context_length_tokens
        prompt_tokens = len(request.prompt_token_ids)
        if prompt_tokens == 0:
            raise EngineBadRequest("the prompt is empty", field="prompt")
        if prompt_tokens >= context:
            raise EngineBadRequest(f"the prompt has {prompt_tokens} tokens; the context window is {context}",
                                   field="prompt")

    def _submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, grammar: Any = None) -> Job:
        """Queues a validated request (`grammar`: its CompiledGrammar); raises EngineOverloaded or EngineUnavailable."""
        context = self.model_info.context_length_tokens
        eos = self.tokenizer.eos_token_ids
        job = Job(request=request, loop=loop, deltas=asyncio.Queue(), eos_ids=eos,
                  stop_ids=eos | frozenset(request.sampling.stop_token_ids),
                  limit=min(request.sampling.max_tokens, context - len(request.prompt_token_ids)),
                  grammar=grammar)
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineUnavailable("the engine is not running")
            free_slots = max(0, self._config.max_batch_size - self._running)
            if len(self._waiting) >= self._config.max_queue + free_slots:
                raise EngineOverloaded(f"{len(self._waiting)} requests are already waiting for a batch slot")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def _cancel(self, job: Job) -> None:
        """Consumer went away: a queued job is forgotten at once; a running one leaves at the next step."""
        with self._cond:
            if job.done:
                return
            job.cancelled = True
            try:
                self._waiting.remove(job)
            except ValueError:
                pass  # already running: the worker drops it before its next decode step

    # --- the worker thread ----------------------------------------------------------------------------------

    def _worker(self) -> None:
        batch = self._batch
        assert batch is not None
        with torch.inference_mode():
            while True:
                try:
                    self._drop_done(batch)
                    jobs = self._take_jobs(batch)
                    if jobs is None:
                        break
                    for job in jobs:
                        self._admit(batch, job)
                    self._drop_done(batch)
                    if batch.rows:
                        self._step(batch)
                except Exception as exc:  # noqa: BLE001 - never let the thread die with consumers waiting
                    log.exception("CPU engine worker error")
                    self._fail_batch(batch, exc)
        self._fail_everything(batch, EngineUnavailable("the engine was shut down"))

    def _take_jobs(self, batch: SharedBatch) -> list[Job] | None:
        """Pops jobs for the free slots (FIFO); waits while idle; None when shutting down."""
        with self._cond:
            while not self._stopping and not batch.rows and not self._waiting:
                self._cond.wait()
            if self._stopping:
                return None
            free = self._config.max_batch_size - len(batch.rows)
            jobs = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            now = time.monotonic()
            for job in jobs:
                job.queue_time_s = now - job.queued_at
            self._running += len(jobs)
            self.admitted_requests += len(jobs)
            return jobs

    def _admit(self, batch: SharedBatch, job: Job) -> None:
        """Prefills a job alone, emits its first token and merges it into the batch (or frees its slot)."""
        if job.cancelled:  # its consumer left while the jobs taken before it were prefilled: no prefill
            self._release(1)
            return
        try:
            logits, cache = batch.prefill(job)
            vocab = logits.shape[-1]
            row_grammar = None if job.grammar is None else RowGrammar(job.grammar, job.eos_ids, vocab)
            job.sampler = Sampler(job.request.sampling, job.request.prompt_token_ids, vocab, job.stop_ids,
                                  row_grammar)
            job.stream = self.tokenizer.decode_stream()
            self._emit(job, job.sampler.sample(logits), logits)
            if not (job.done or job.cancelled):
                batch.add(job, cache)
                return
        except Exception as exc:  # noqa: BLE001 - the failure belongs to this request only
            log.exception("prefill failed for %s", job.request.request_id)
            self._fail(job, exc)
        self._release(1)

    def _step(self, batch: SharedBatch) -> None:
        self.max_batch_size_seen = max(self.max_batch_size_seen, len(batch.rows))
        self.decode_steps += 1
        try:
            logits = batch.decode_step()
            greedy = logits.argmax(dim=-1).tolist()  # one vectorised argmax serves every plain greedy row
            for i, job in enumerate(batch.rows):
                assert job.sampler is not None
                self._emit(job, greedy[i] if job.sampler.plain_greedy else job.sampler.sample(logits[i]), logits[i])
        except Exception as exc:  # noqa: BLE001 - a broken step fails every row that shared it
            log.exception("decode step failed")
            self._fail_batch(batch, exc)

    def _emit(self, job: Job, token: int, logits: torch.Tensor) -> None:
        """Records a sampled token and sends its delta (the final one carries the finish reason)."""
        assert job.stream is not None and job.sampler is not None
        job.generated += 1
        job.last_token = token
        job.sampler.observe(token)
        reason = finish_reason(job, token)
        # A matched stop token is counted and returned as an id, but its text is not part of the completion.
        text = "" if reason is FinishReason.STOP else (job.stream.step(self.tokenizer.backend, token) or "")
        logprob = job.sampler.logprobs(logits, token)
        job.done = reason is not None
        job.send(GenerationDelta(text=text, token_ids=(token,), completion_tokens=job.generated,
                                 prompt_tokens=job.prompt_tokens, finish_reason=reason,
                                 logprobs=(logprob,) if logprob else (),
                                 queue_time_s=job.queue_time_s if job.generated == 1 else None))

    def _fail(self, job: Job, exc: BaseException) -> None:
        """Ends a job with an engine error (a runtime failure becomes EngineInternalError, wrapped once)."""
        job.done = True
        if not isinstance(exc, EngineUnavailable):
            cause, exc = exc, EngineInternalError(f"generation failed: {type(exc).__name__}: {exc}")
            exc.__cause__ = cause
        job.send(exc)

    def _fail_batch(self, batch: SharedBatch, exc: BaseException) -> None:
        """Fails every row and empties the batch (its cache may be half-updated)."""
        for job in batch.rows:
            if not job.done:
                self._fail(job, exc)
        self._release(len(batch.rows))
        batch.keep([])

    def _drop_done(self, batch: SharedBatch) -> None:
        keep = [i for i, job in enumerate(batch.rows) if not (job.done or job.cancelled)]
        dropped = len(batch.rows) - len(keep)
        if dropped:
            batch.keep(keep)
            self._release(dropped)

    def _release(self, slots: int) -> None:
        with self._cond:
            self._running -= slots

    def _fail_everything(self, batch: SharedBatch, exc: EngineUnavailable) -> None:
        with self._cond:
            jobs = list(self._waiting) + batch.rows
            self._waiting.clear()
        for job in jobs:
            if not job.done:
                self._fail(job, exc)
        self._release(len(batch.rows))
        batch.keep([])
