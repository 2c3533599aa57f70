"""The production engine: an in-process ``sglang.Engine`` (SGLang 0.5.23) behind genrpc's `Engine` protocol.

How it uses SGLang (all read from SGLang 0.5.23's source, see service/engines/sglang_mapping.py):

- ``start()`` builds ``sglang.Engine(**engine_kwargs(config))`` on the *running* event loop in the main
  thread (the loop the grpc.aio server runs on: SGLang's TokenizerManager creates its receive loop on the
  loop of the first ``generate_request``; a second loop hangs). Construction is synchronous and takes as
  long as the model load (minutes for 7B on 4 GPUs): the loop is blocked meanwhile, so health checks time
  out rather than answer NOT_SERVING; the Kubernetes startupProbe is sized for that. ``sglang`` is imported
  there, so this module imports without sglang installed.
- Requests go in as token ids (the service templated them with the same HF tokenizer) with a fresh uuid4-hex
  ``rid`` (SGLang's abort matches rids by *prefix*, so rids must never be prefixes of each other).
- Vision models: ``model_info.accepts_images`` is SGLang's own verdict (its TokenizerManager built a multimodal
  processor), and a request's images go along as ``image_data`` with the token ids, whose chat-template image
  placeholders SGLang's processor expands (why ids suffice: sglang_mapping.py, "Images").
- Items are incremental segments (``engine_kwargs`` sets ``incremental_streaming_output=True``: no O(n^2)
  cumulative text per request); `StreamNormalizer` turns them into GenerationDelta objects.
- Cancel: the SGLang generator is held in ``contextlib.aclosing`` and, unless the request finished,
  ``tokenizer_manager.abort_request(rid=...)`` is called before it is closed, so the scheduler frees the
  batch slot within one decode step.
- SGLang's first ``generate_request`` installs its own SIGTERM handler on the loop (drain, then kill the
  process tree). genrpc drains itself (NOT_SERVING, grace period, then ``shutdown()``), so ``start()`` puts
  back whatever SIGTERM handler the loop had before the warm-up. SGLang's SIGQUIT handler (a child process
  died: kill the tree) is kept.
- Tracing: with ``enable_trace`` (on when genrpc exports traces over OTLP, engines/factory.py) SGLang exports its own
  request spans to the same OTLP/HTTP endpoint, and each request's ``trace_context`` (the service's span) goes in as
  ``external_trace_header``, so they are children of the service's span in the client's trace (sglang_mapping.py,
  "Tracing").
- Queue time: the first delta's ``queue_time_s`` is SGLang's ``meta_info["queue_time"]`` (measured by its scheduler;
  reported with ``enable_metrics``).
- Metrics: with ``enable_metrics`` SGLang's scheduler/detokenizer processes write Prometheus multiprocess
  files under ``PROMETHEUS_MULTIPROC_DIR``; its TokenizerManager (in this process) registers on
  prometheus_client's default REGISTRY. `prometheus_collectors()` (the optional `ExportsMetrics` hook) exports
  both beside genrpc's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from genrpc.service.engines.base import (EngineBadRequest, EngineError, EngineInternalError, EngineUnavailable,
                                         EngineUnsupported, GenerationDelta, GenerationRequest, ModelInfo,
                                         SamplingParams, Tokenizer, started)
from genrpc.service.engines.sglang_mapping import (
    REQUEST_FIELD,
    SGLangEngineConfig,
    StreamNormalizer,
    config_has_vision,
    engine_environ,
    engine_kwargs,
    generate_kwargs,
    image_kwargs,
    to_sglang_sampling_params,
    trace_kwargs,
)

__all__ = ["SGLANG_VERSION", "SGLangEngine", "SGLangEngineConfig", "sglang_metrics_collector"]

log = logging.getLogger("genrpc.engine.sglang")

SGLANG_VERSION = "0.5.23"
WARMUP_PROMPT = "Hello"
WARMUP_MAX_TOKENS = 4


class SGLangEngine:
    """`Engine` over ``sglang.Engine``. Counts running/waiting requests locally (see `running_requests`)."""

    def __init__(self, config: SGLangEngineConfig, *, engine_factory: Any = None,
                 tokenizer: Tokenizer | None = None):
        """`engine_factory(**kwargs)` and `tokenizer` are for tests (a fake engine); by default
        ``sglang.Engine`` and an `HFTokenizer` loaded from ``config.model``."""
        self._config = config
        self._engine_factory = engine_factory
        self._engine: Any = None
        self._tokenizer = tokenizer
        self._model_info: ModelInfo | None = None
        self._incremental = False
        self._live: dict[str, bool] = {}  # rid -> has produced output (i.e. holds a batch slot)
        self._stopping = False

    # ---- Engine protocol: properties ----

    @property
    def model_info(self) -> ModelInfo:
        return started(self._model_info, "SGLang")

    @property
    def tokenizer(self) -> Tokenizer:
        return started(self._tokenizer, "SGLang")

    @property
    def running_requests(self) -> int:
        """Live requests that have received output (prefill done, decoding). Counted here, not read from
        SGLang: its exact counts live in the scheduler processes (the `sglang:num_running_reqs` gauge)."""
        return sum(1 for started in self._live.values() if started)

    @property
    def waiting_requests(self) -> int:
        """Live requests without output yet: queued in a scheduler or in prefill (see `sglang:num_queue_reqs`
        for SGLang's own queue length)."""
        return sum(1 for started in self._live.values() if not started)

    def prometheus_collectors(self) -> list[Any]:
        """SGLang's own metrics (scheduler, detokenizer, TokenizerManager), when enabled."""
        return [sglang_metrics_collector()] if self._config.enable_metrics else []

    # ---- lifecycle ----

    async def start(self) -> None:
        if not self._config.model:
            raise ValueError("the sglang engine needs --model (an HF model directory, e.g. Qwen2.5-7B-Instruct)")
        kwargs = engine_kwargs(self._config)
        if kwargs.get("enable_metrics"):
            prepare_metrics_dir()
        factory = self._launcher()
        # On the running loop, main thread, synchronously (see module docstring).
        if self._config.attach_to_pid:
            # Another service worker built the engine with tokenizer_worker_num > 1: this process becomes one of
            # its tokenizer workers (generate runs here; prefill and decode stay on the parent's schedulers).
            log.info("attaching to the sglang engine of process %d", self._config.attach_to_pid)
            self._engine = factory.attach_tokenizer_worker(parent_pid=self._config.attach_to_pid)
        else:
            log.info("starting sglang %s: %s", SGLANG_VERSION,
                     {k: v for k, v in kwargs.items() if k != "json_model_override_args"})
            self._engine = factory(**kwargs)
        try:
            server_args = getattr(self._engine, "server_args", None)
            self._incremental = bool(getattr(server_args, "incremental_streaming_output", False))
            if self._tokenizer is None:
                self._tokenizer = await asyncio.to_thread(_load_tokenizer, self._config.model)
            self._model_info = self._build_model_info()
            loop = asyncio.get_running_loop()
            saved = _loop_signal_handler(loop, signal.SIGTERM)
            try:
                await self._warm_up()
            finally:
                _restore_signal_handler(loop, signal.SIGTERM, saved)
        except BaseException:
            await self.shutdown()  # never leave SGLang's GPU processes behind a failed start
            raise
        log.info("sglang engine ready: %s", self._model_info)

    def host(self) -> None:
        """Builds the engine for `--service-workers` and serves nothing itself: with tokenizer_worker_num > 1 this
        process holds SGLang's MultiTokenizerRouter (no TokenizerManager, so no generate), and the serving workers
        attach to it (`attach_to_pid`), as the HTTP workers of `sglang serve` do. Stop it with `shutdown()`."""
        self._engine = self._launcher()(**engine_kwargs(self._config))

    def _launcher(self) -> Any:
        """`sglang.Engine` (or the injected factory), once the environment its processes inherit is set."""
        os.environ.update(engine_environ(self._config))
        if self._engine_factory is not None:
            return self._engine_factory
        import sglang  # heavy and GPU-only: imported here, never at module import

        return sglang.Engine

    async def _warm_up(self) -> None:
        ids = self.tokenizer.encode(WARMUP_PROMPT) or [0]
        request = GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=ids,
                                    sampling=SamplingParams(max_tokens=WARMUP_MAX_TOKENS, temperature=0.0))
        async with contextlib.aclosing(self.generate(request)) as deltas:
            async for delta in deltas:
                if delta.finish_reason is not None:
                    break

    def _build_model_info(self) -> ModelInfo:
        s = self._config
        tm = getattr(self._engine, "tokenizer_manager", None)
        context = int(getattr(tm, "context_len", 0) or s.context_length or 0)
        fingerprint = f"sglang-{SGLANG_VERSION}-tp{s.tp_size}-dp{s.dp_size}"
        if s.rope_scaling:
            fingerprint += "-rope"
        return ModelInfo(model_id=s.model_id, context_length_tokens=context, fingerprint=fingerprint,
                         accepts_images=self._accepts_images(tm))

    def _accepts_images(self, tm: Any) -> bool:
        """SGLang 0.5.23 processes images only when its TokenizerManager has a multimodal processor
        (managers/tokenizer_manager.py ``init_tokenizer_and_processor``: ``model_config.is_multimodal`` and not
        ``--language-model-only``; ``enable_multimodal`` can turn it off). Without that attribute (another
        SGLang version), a ``vision_config`` in the model's config.json decides."""
        if tm is not None and hasattr(tm, "mm_processor"):
            return tm.mm_processor is not None
        return config_has_vision(self._config.model)

    async def shutdown(self) -> None:
        """Aborts everything still running, then stops SGLang's processes (blocking work runs in a thread)."""
        self._stopping = True
        engine, self._engine = self._engine, None
        if engine is None:
            return
        tm = getattr(engine, "tokenizer_manager", None)
        if tm is not None:
            with contextlib.suppress(Exception):
                tm.abort_request(abort_all=True)
        await asyncio.to_thread(engine.shutdown)

    # ---- generation ----

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        engine = self._engine
        if engine is None or self._stopping:
            raise EngineUnavailable("the SGLang engine is not serving")
        images = request.images
        if images and not self.model_info.accepts_images:
            raise EngineUnsupported(f"{self.model_info.model_id} does not accept images", field=REQUEST_FIELD)
        rid = uuid.uuid4().hex  # fresh: SGLang aborts by rid *prefix*
        sampling_params = to_sglang_sampling_params(request.sampling)
        normalizer = StreamNormalizer(incremental=self._incremental,
                                      prompt_tokens=len(request.prompt_token_ids))
        self._live[rid] = False
        try:
            try:
                stream = await engine.async_generate(input_ids=[int(t) for t in request.prompt_token_ids],
                                                     sampling_params=sampling_params, stream=True, rid=rid,
                                                     **generate_kwargs(request.sampling),
                                                     **image_kwargs(images),
                                                     **trace_kwargs(request.trace_context))
            except ValueError as exc:  # SGLang's request validation
                raise EngineBadRequest(str(exc), field=REQUEST_FIELD) from exc
            except Exception as exc:  # noqa: BLE001 - the runtime's own failure, as a typed engine error
                raise EngineInternalError(f"SGLang failed: {type(exc).__name__}: {exc}") from exc
            async with contextlib.aclosing(stream) as items:
                try:
                    while True:
                        try:
                            item = await items.__anext__()
                        except StopAsyncIteration:
                            break
                        except ValueError as exc:  # validation runs on the first __anext__
                            raise EngineBadRequest(str(exc), field=REQUEST_FIELD) from exc
                        except EngineError:
                            raise
                        except Exception as exc:  # noqa: BLE001 - as above
                            raise EngineInternalError(f"SGLang failed: {type(exc).__name__}: {exc}") from exc
                        self._live[rid] = True
                        delta = normalizer.feed(item)  # raises a typed engine error on an abort
                        if delta is None:
                            continue
                        yield delta
                        if delta.finish_reason is not None:
                            return
                    if not normalizer.finished:
                        raise EngineUnavailable("SGLang ended the stream without a finish reason")
                finally:
                    if not normalizer.finished:
                        # Cancelled, closed early, or failed: free the batch slot now.
                        tm = getattr(engine, "tokenizer_manager", None)
                        if tm is not None:
                            with contextlib.suppress(Exception):
                                tm.abort_request(rid=rid)
        finally:
            self._live.pop(rid, None)


def _load_tokenizer(model: str) -> Tokenizer:
    from genrpc.service.engines.hf_tokenizer import HFTokenizer

    return HFTokenizer.from_pretrained(model)


# ---- signal handler bookkeeping (asyncio's unix loops keep them in `_signal_handlers`) ----

def _loop_signal_handler(loop: asyncio.AbstractEventLoop, sig: int) -> Any:
    handlers = getattr(loop, "_signal_handlers", None)
    return handlers.get(sig) if isinstance(handlers, dict) else None


def _restore_signal_handler(loop: asyncio.AbstractEventLoop, sig: int, saved: Any) -> None:
    if saved is None or _loop_signal_handler(loop, sig) is saved:
        return
    with contextlib.suppress(Exception):
        loop.add_signal_handler(sig, saved._callback, *saved._args)
        log.info("restored genrpc's handler for signal %d (SGLang had replaced it)", sig)


# ---- metrics ----

def prepare_metrics_dir() -> str:
    """Makes sure ``PROMETHEUS_MULTIPROC_DIR`` names an existing directory before SGLang forks its
    processes (SGLang writes its multiprocess files there). Returns the directory."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="genrpc-sglang-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    os.makedirs(path, exist_ok=True)
    return path


class _SGLangCollector:
    """Yields SGLang's metrics (names starting with `prefixes`) from the multiprocess files and, when this
    process runs prometheus_client in single-process mode, from its default REGISTRY (the
    TokenizerManager's metrics). genrpc's own metrics are filtered out, so nothing is exported twice."""

    def __init__(self, path: str | None, prefixes: Iterable[str]):
        self._path = path
        self._prefixes = tuple(prefixes)

    def _ours(self, name: str) -> bool:
        return name.startswith(self._prefixes)

    def collect(self) -> Iterable[Any]:
        from prometheus_client import REGISTRY, multiprocess, values

        path = self._path or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        seen: set[str] = set()
        if path and os.path.isdir(path):
            for metric in multiprocess.MultiProcessCollector(None, path=path).collect():
                if self._ours(metric.name):
                    seen.add(metric.name)
                    yield metric
        # In single-process mode (prometheus_client imported before the env var was set) the
        # TokenizerManager's metrics are plain in-process values on the default registry.
        if getattr(values.ValueClass, "__name__", "") != "MmapedValue":
            for metric in REGISTRY.collect():
                if self._ours(metric.name) and metric.name not in seen:
                    yield metric


def sglang_metrics_collector(path: str | None = None, prefixes: Iterable[str] = ("sglang:", "sglang_")) -> Any:
    """A prometheus_client collector of SGLang's metrics (register it on any CollectorRegistry)."""
    return _SGLangCollector(path, prefixes)
