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
    # Exactly the SDPA call `sdpa_attention_forward` makes for a one-token query without a mask (GQA inside SDPA,
    # not causal), minus its per-call Python (env lookups, kwargs checks): that wrapper cost ~0.7 ms per
    # layer x row, a third of a 16-row decode step's non-GEMM time.
    scale = kwargs.get("scaling")
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    sdpa = F.scaled_dot_product_attention
    if len(row_offsets) == 1:
        pad = row_offsets[0]
        out = sdpa(query, key[:, :, pad:], value[:, :, pad:], scale=scale, enable_gqa=gqa)
    else:
        out = torch.cat([sdpa(query[b:b + 1], key[b:b + 1, :, pad:], value[b:b + 1, :, pad:], scale=scale,
                              enable_gqa=gqa)
                         for b, pad in enumerate(row_offsets)])
    # [rows, heads, 1, dim] -> [rows, 1, heads, dim], the layout attention interfaces return.
    return out.transpose(1, 2).contiguous(), None


# MKL's sgemm streams a very wide weight (the 49152 x 576 lm_head) markedly slower than the same bytes cut into
# narrower column blocks (~17 vs ~23 ms at 4 rows on this box). Splitting the output columns does not touch any
# element's reduction over the input features: the logits are bit-identical to the unsplit call at 4/8/12/16 rows.
WIDE_OUT_FEATURES = 8192
OUT_CHUNK = 1024


def block_linear_rows(model: torch.nn.Module) -> None:
    """Routes every nn.Linear of `model` through `_row_blocked_linear` (wide ones in column chunks)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            wide = module.out_features >= WIDE_OUT_FEATURES
            module.forward = types.MethodType(_row_blocked_wide_linear if wide else _row_blocked_linear, module)


def _row_blocked_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[:-1].numel()
    pad = -rows % ROW_BLOCK
    if pad == 0:
        return F.linear(x, self.weight, self.bias)
    flat = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, pad))
    return F.linear(flat, self.weight, self.bias)[:rows].reshape(*x.shape[:-1], -1)


def _row_blocked_wide_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[:-1].numel()
    pad = -rows % ROW_BLOCK
    flat = x.reshape(rows, x.shape[-1])
    if pad:
        flat = F.pad(flat, (0, 0, 0, pad))
    # Views of the live weight (split per call: tied embeddings or a reloaded state dict stay in effect).
    weights = self.weight.split(OUT_CHUNK)
    biases = self.bias.split(OUT_CHUNK) if self.bias is not None else [None] * len(weights)
    out = torch.cat([F.linear(flat, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)
    return out[:rows].reshape(*x.shape[:-1], -1)
