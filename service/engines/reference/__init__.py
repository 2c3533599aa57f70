"""The reference engine: torch + transformers on CPU, bit-identical alone or batched (continuous batching over one shared KV cache)."""

from genrpc.service.engines.reference.config import ReferenceEngineConfig
from genrpc.service.engines.reference.engine import ReferenceEngine
from genrpc.service.engines.reference.model_store import resolve_model_dir

__all__ = ["ReferenceEngine", "ReferenceEngineConfig", "resolve_model_dir"]
