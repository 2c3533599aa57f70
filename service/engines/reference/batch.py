"""One running batch over a shared DynamicCache. Used only by the worker thread.

Layout: row r of the cache holds `pad_r` padding columns on the left, then its real tokens. A newcomer is
prefilled alone (batch 1, no padding: exactly what it would compute if it ran alone) and then merged in by
left-padding whichever side is shorter. In a decode step each row attends only to its own real keys (the
padding columns are sliced off per row, see invariance.py) and gets its own `position_ids`, so padding never
shows in a row's numbers. Finished or cancelled rows leave with `batch_select_indices`; leading columns that
became padding for every remaining row are trimmed.
"""

from __future__ import annotations

import asyncio
import time
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers.decoders import DecodeStream
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from genrpc.service.engines.base import FinishReason, GenerationRequest
from genrpc.service.engines.reference.sampling import Sampler


@dataclass(eq=False)
class Job:
    """A request from submission to its final delta."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop  # the consumer's
    deltas: asyncio.Queue[Any]  # GenerationDelta or an exception to raise in the consumer
    stop_ids: frozenset[int]  # model EOS ids + the request's stop_token_ids
    eos_ids: frozenset[int]  # the model's own (what `ignore_eos` ignores)
    limit: int  # completion tokens allowed: min(max_tokens, context window - prompt)
    grammar: Any = None  # xgrammar CompiledGrammar of a json_schema/ebnf request (compiled before queueing)
    cancelled: bool = False  # set by the consumer's thread; read by the worker between steps
    queued_at: float = field(default_factory=time.monotonic)
    queue_time_s: float | None = None  # set when the worker takes the job off the queue
    done: bool = False
    # Filled in at prefill:
    sampler: Sampler | None = None
    stream: DecodeStream | None = None
    length: int = 0  # real tokens in this row's KV cache = position of the next input token
    last_token: int = 0
    generated: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def send(self, item: Any) -> None:
        """Hands a delta or an exception to the consumer (called on the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.deltas.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancelled = True


class SharedBatch:
    """The rows being decoded together and their shared KV cache (+ the padding mask)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.rows: list[Job] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long)  # 1 = real token, 0 = left padding

    def prefill(self, job: Job) -> tuple[torch.Tensor, DynamicCache]:
        """Runs a newcomer's prompt alone; returns its last-position logits [vocab] and its batch-1 cache."""
        cache = DynamicCache(config=self._model.config)
        ids = torch.tensor([list(job.request.prompt_token_ids)], dtype=torch.long)
        out = self._model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        job.length = ids.shape[1]
        return out.logits[0, -1], cache

    def add(self, job: Job, cache: DynamicCache) -> None:
        """Merges a prefilled row into the batch, left-padding the shorter side to a common length."""
        new_len = cache.get_seq_length()
        new_mask = torch.ones(1, new_len, dtype=torch.long)
        if self._cache is None:
            # The batch's cache from now on: merges, row drops and trims change its layers in place.
            for layer in cache.layers:
                layer.update = types.MethodType(_append_in_place, layer)
            self._cache, self._mask, self.rows = cache, new_mask, [job]
            return
        old_len = self._mask.shape[1]
        width = max(old_len, new_len)
        for layer in self._cache.layers:
            _check_layer(layer)
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
        self._mask = torch.cat([F.pad(self._mask, (width - old_len, 0)), F.pad(new_mask, (width - new_len, 0))])
        self.rows.append(job)

    def keep(self, indices: list[int]) -> None:
        """Keeps only the given rows (in order), then trims columns that are padding for every row left."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.rows, self._cache, self._mask = [], None, torch.zeros(0, 0, dtype=torch.long)
            return
        assert self._cache is not None
        index = torch.tensor(indices, dtype=torch.long)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self.rows = [self.rows[i] for i in indices]
        first_real = int(self._mask.any(dim=0).int().argmax())
        if first_real > 0:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first_real:].contiguous()
                layer.values = layer.values[:, :, first_real:].contiguous()
            self._mask = self._mask[:, first_real:]

    def decode_step(self) -> torch.Tensor:
        """Feeds every row its last token; returns next-token logits [rows, vocab]."""
        ids = torch.tensor([[job.last_token] for job in self.rows], dtype=torch.long)
        positions = torch.tensor([[job.length] for job in self.rows], dtype=torch.long)
        pads = (self._mask == 0).sum(dim=1).tolist()
        self._mask = F.pad(self._mask, (0, 1), value=1)
        assert self._cache is not None
        # No attention_mask: `rowwise_attention` slices each row's padding off itself (see invariance.py).
        out = self._model(input_ids=ids, position_ids=positions, past_key_values=self._cache, use_cache=True,
                          row_offsets=pads)
        for job in self.rows:
            job.length += 1
        return out.logits[:, -1]


def finish_reason(job: Job, token: int) -> FinishReason | None:
    if token in job.stop_ids and not (job.request.sampling.ignore_eos and token in job.eos_ids):
        return FinishReason.STOP
    if job.generated >= job.limit:
        return FinishReason.LENGTH
    return None


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pads [batch, heads, seq, dim] on the left of `seq` up to `width`."""
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def _check_layer(layer: Any) -> None:
    # Sliding-window or quantized layers keep extra state that a plain concatenation would corrupt.
    if type(layer) is not DynamicLayer:
        raise NotImplementedError(f"the CPU engine cannot batch cache layers of type {type(layer).__name__}")


KV_HEADROOM = 64  # spare cache columns allocated at a time


def _append_in_place(self: DynamicLayer, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`DynamicLayer.update` without its per-step `torch.cat`, which copied (and freshly allocated) the whole
    cache of every layer on every decode step. `keys`/`values` stay views of buffers with spare columns; whenever
    something replaced them (a merge, `batch_select_indices`, a trim) the buffers are rebuilt from them first.
    Only the storage changes: each row's keys and values are the same numbers at the same columns."""
    keys, values = self.keys, self.values
    length, new = keys.shape[-2], key_states.shape[-2]
    kbuf, vbuf = getattr(self, "_kbuf", None), getattr(self, "_vbuf", None)
    if (kbuf is None or vbuf is None or length + new > kbuf.shape[-2] or kbuf.shape[:2] != keys.shape[:2]
            or keys.data_ptr() != kbuf.data_ptr() or values.data_ptr() != vbuf.data_ptr()
            or keys.stride() != kbuf.stride() or values.stride() != vbuf.stride()):
        batch, heads, _, dim = keys.shape
        capacity = length + new + KV_HEADROOM
        kbuf = keys.new_empty(batch, heads, capacity, dim)
        vbuf = values.new_empty(batch, heads, capacity, values.shape[-1])
        kbuf[:, :, :length] = keys
        vbuf[:, :, :length] = values
        self._kbuf, self._vbuf = kbuf, vbuf
    kbuf[:, :, length:length + new] = key_states
    vbuf[:, :, length:length + new] = value_states
    self.keys, self.values = kbuf[:, :, :length + new], vbuf[:, :, :length + new]
    return self.keys, self.values
