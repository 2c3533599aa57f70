"""Batch invariance: a request's logits must not depend on what else shares its decode step.

Measured on this CPU (MKL sgemm, AVX-512): `F.linear` gives a row bit-identical results for every row count
that is a multiple of 4, but a different summation order for other counts (M=1 takes a GEMV path), ~1e-4 apart
in the logits. Attention over a left-padded row likewise reduces over a different length than the same row
alone. Either drift can flip a near-tie argmax, so greedy output would differ between "alone" and "batched".
The two fixes below make a row's numbers bit-identical in both cases:

- every nn.Linear pads its input rows with zeros to a multiple of 4 (free at batch sizes 4/8/16, and a batch
  of 2 even gets faster; a lone stream decodes ~35 % slower: 9 instead of 14.5 tok/s on a busy 2-core box),
- decode-step attention runs per row over that row's own unpadded keys (`row_offsets` = its padding columns),
  the exact computation it gets when alone. Prefill always runs alone (batch 1), with plain SDPA.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ROW_BLOCK = 4
ATTN_IMPLEMENTATION = "genrpc_rowwise"


def register_attention() -> None:
    """Makes `attn_implementation="genrpc_rowwise"` loadable (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, rowwise_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def rowwise_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, row_offsets: list[int] | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA, except that a decode step (row_offsets given) attends row by row over each row's real keys."""
    if row_offsets is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = [
        sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1, :, pad:], value[b:b + 1, :, pad:], None,
                               **kwargs)[0]
        for b, pad in enumerate(row_offsets)
    ]
    return torch.cat(rows), None


def block_linear_rows(model: torch.nn.Module) -> None:
    """Routes every nn.Linear of `model` through `_row_blocked_linear`."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_row_blocked_linear, module)


def _row_blocked_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[:-1].numel()
    pad = -rows % ROW_BLOCK
    if pad == 0:
        return F.linear(x, self.weight, self.bias)
    flat = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, pad))
    return F.linear(flat, self.weight, self.bias)[:rows].reshape(*x.shape[:-1], -1)
