"""Grammar-constrained decoding for the CPU engine, with xgrammar.

`GrammarCompilerCache` turns a request's `json_schema` / `ebnf` into an xgrammar `CompiledGrammar`. It builds
the `TokenizerInfo` (~0.2 s for SmolLM2's 49k vocabulary, plus ~0.2 s to import xgrammar) lazily on the first
constrained request, so unconstrained starts pay nothing, and keeps one `GrammarCompiler` whose cache makes a
repeated schema free. Compiling runs on a thread of its own (the engine awaits it in `generate()` before
queueing the job), never on the worker thread.

`RowGrammar` is one constrained row's `GrammarMatcher` plus its token bitmask, used on the worker thread:
`mask(logits)` before sampling, `accept(token)` after. Once the grammar is complete, only EOS may follow.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from genrpc.service.engines.base import EngineBadRequest, EngineInternalError, SamplingParams

log = logging.getLogger(__name__)

COMPILER_CACHE_BYTES = 64 << 20
COMPILER_THREADS = 2


def is_constrained(params: SamplingParams) -> bool:
    return params.json_schema is not None or params.ebnf is not None


class GrammarCompilerCache:
    """Lazily-built TokenizerInfo + one cached GrammarCompiler. Thread-safe; `compile` blocks (call off-loop)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._lock = threading.Lock()
        self._compiler: Any = None
        self.tokenizer_info_seconds: float | None = None  # observability: cost of the one-time set-up

    def compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import time

                t0 = time.perf_counter()
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._hf_tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=COMPILER_THREADS,
                                                          cache_limit_bytes=COMPILER_CACHE_BYTES)
                self.tokenizer_info_seconds = time.perf_counter() - t0
                log.info("xgrammar TokenizerInfo + compiler built in %.2f s", self.tokenizer_info_seconds)
            return self._compiler

    def compile(self, params: SamplingParams) -> Any:
        """The CompiledGrammar for a constrained request; raises EngineBadRequest for a bad constraint.

        The field blamed is "response_format" (json_schema) or "tool_choice" (ebnf: the service's forced
        tool calls)."""
        if params.json_schema is not None and params.ebnf is not None:
            raise EngineBadRequest("set either json_schema or ebnf, not both", field="response_format")
        try:
            compiler = self.compiler()
        except Exception as exc:  # noqa: BLE001 - set-up failures are the engine's, not the client's
            raise EngineInternalError(f"xgrammar set-up failed: {type(exc).__name__}: {exc}") from exc
        field = "response_format" if params.json_schema is not None else "tool_choice"
        try:
            if params.json_schema is not None:
                # Compact JSON (no free whitespace): a small model otherwise wanders into endless blanks.
                return compiler.compile_json_schema(params.json_schema, any_whitespace=False)
            return compiler.compile_grammar(params.ebnf)
        except Exception as exc:  # noqa: BLE001 - xgrammar reports every parse/convert failure as RuntimeError
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            kind = "JSON schema" if params.json_schema is not None else "grammar"
            raise EngineBadRequest(f"invalid {kind}: {message}", field=field) from exc


class RowGrammar:
    """One constrained row's matcher and bitmask (worker thread only)."""

    def __init__(self, compiled: Any, eos_ids: frozenset[int], vocab_size: int) -> None:
        import xgrammar

        self._xgr = xgrammar
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._bitmask = xgrammar.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
        self._only_eos = torch.full((vocab_size,), -torch.inf)
        self._only_eos[torch.tensor(sorted(eos_ids), dtype=torch.long)] = 0.0

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Sets the logits of tokens the grammar forbids next to -inf (in place) and returns them."""
        if self._matcher.is_terminated():  # complete and EOS already accepted (ignore_eos): EOS only
            logits += self._only_eos
            return logits
        self._matcher.fill_next_token_bitmask(self._bitmask)
        self._xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), self._bitmask, backend="cpu")
        return logits

    def accept(self, token: int) -> None:
        """Advances the matcher; a token the grammar rejects (only an extra stop id can be) is ignored."""
        if not self._matcher.is_terminated() and not self._matcher.accept_token(token):
            log.debug("grammar rejected token %d", token)
