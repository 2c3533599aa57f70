"""What the reference engine needs to know, and nothing else (built from Settings by engines.factory)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ReferenceEngineConfig:
    model_id: str  # the id clients send as `model`
    cache_dir: pathlib.Path  # where a GGUF is converted to safetensors once
    model: str = ""  # HF model directory or .gguf file; empty = the bundled SmolLM2-135M
    context_length: int = 0  # 0 = the model's own max_position_embeddings
    max_batch_size: int = 16  # rows decoded together in one step
    max_queue: int = 256  # requests waiting for a slot before EngineOverloaded
    torch_threads: int = 0  # 0 = all cores (torch's setting is process-wide)
    # False gives up bit-identical batched/alone results for ~1.6x faster lone streams.
    batch_invariant: bool = True
