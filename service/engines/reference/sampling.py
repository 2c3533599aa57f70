"""Per-request logits processing and sampling for the CPU engine (runs on the worker thread)."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import torch

from genrpc.service.engines.base import SamplingParams, TokenLogprob
from genrpc.service.engines.reference.grammar import RowGrammar


class Sampler:
    """One request's decoding rules: biases, penalties, EOS masking, truncation and its own torch.Generator.

    The generator is per request, so a seeded request draws the same random numbers whatever else shares its
    batch. `plain_greedy` rows skip all of this: the engine argmaxes them in one vectorised call.
    A constrained row (`grammar`) masks the tokens its grammar forbids after biases and penalties, before
    temperature and truncation (and before greedy's argmax).
    """

    def __init__(self, params: SamplingParams, prompt: Sequence[int], vocab_size: int,
                 stop_ids: frozenset[int], grammar: RowGrammar | None = None) -> None:
        self.p = params
        self.grammar = grammar
        self.greedy = params.temperature <= 0.0
        self._stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long)
        self._bias_ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long)
        self._bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        self._counts = torch.zeros(vocab_size, dtype=torch.float32)  # generated-token counts (OpenAI penalties)
        self._seen = torch.zeros(vocab_size, dtype=torch.bool)  # prompt + output (repetition penalty)
        if params.repetition_penalty != 1.0:
            self._seen[torch.tensor(list(prompt), dtype=torch.long)] = True
        self._generated = 0
        self.plain_greedy = self.greedy and not (
            params.logit_bias or params.frequency_penalty or params.presence_penalty
            or params.repetition_penalty != 1.0 or params.min_tokens or grammar is not None)
        self.generator: torch.Generator | None = None
        if not self.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """Picks the next token from one row of raw logits, shape [vocab]."""
        raw = logits
        logits = self._process(logits.float())
        if self.grammar is not None:
            logits = self._constrain(logits, raw)
        if self.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.p.temperature, dim=-1)
        probs = self._truncate(probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def observe(self, token: int) -> None:
        """Records an emitted token (penalties and min_tokens depend on the output so far)."""
        self._generated += 1
        if self.grammar is not None:
            self.grammar.accept(token)
        self._counts[token] += 1
        self._seen[token] = True

    def logprobs(self, logits: torch.Tensor, token: int) -> TokenLogprob | None:
        """The model's own log-probabilities (before penalties, temperature and truncation), if requested."""
        if self.p.logprobs is None:
            return None
        logp = torch.log_softmax(logits.float(), dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if self.p.logprobs > 0:
            values, ids = logp.topk(self.p.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token_id=token, logprob=float(logp[token]), top=top)

    def _constrain(self, logits: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        assert self.grammar is not None
        logits = self.grammar.mask(logits)
        # min_tokens masks EOS, and a complete grammar allows only EOS: the grammar wins.
        if self._generated < self.p.min_tokens and not bool(torch.isfinite(logits).any()):
            logits = self.grammar.mask(raw.float().clone())
        return logits

    def _process(self, logits: torch.Tensor) -> torch.Tensor:
        if self.plain_greedy:
            return logits
        logits = logits.clone()
        if self.p.logit_bias:
            logits[self._bias_ids] += self._bias_values
        if self.p.repetition_penalty != 1.0:
            seen = logits[self._seen]
            logits[self._seen] = torch.where(seen > 0, seen / self.p.repetition_penalty,
                                             seen * self.p.repetition_penalty)
        if self.p.frequency_penalty or self.p.presence_penalty:
            logits -= self.p.frequency_penalty * self._counts + self.p.presence_penalty * (self._counts > 0)
        if self._generated < self.p.min_tokens:
            logits[self._stop_ids] = -math.inf
        return logits

    def _truncate(self, probs: torch.Tensor) -> torch.Tensor:
        """top_k, top_p, min_p and top_a; the most likely token always survives. Returns unnormalised weights."""
        p = self.p
        top = probs.max()
        if p.min_p > 0 or p.top_a > 0:
            floor = torch.maximum(p.min_p * top, p.top_a * top * top)
            probs = torch.where(probs >= floor, probs, 0.0)
        if p.top_k > 0 and p.top_k < probs.numel():
            kth = probs.topk(p.top_k).values[-1]
            probs = torch.where(probs >= kth, probs, 0.0)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(-1) / sorted_probs.sum()
            # Keep the smallest prefix whose mass reaches top_p.
            drop = (cumulative - sorted_probs / sorted_probs.sum()) >= p.top_p
            drop[0] = False
            probs = probs.scatter(0, order[drop], 0.0)
        return probs
