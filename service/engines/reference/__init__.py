"""The reference engine: torch + transformers on CPU, bit-identical alone or batched (continuous batching over one shared KV cache)."""

from genrpc.service.engines.reference.engine import (ReferenceEngine, EngineStoppedError, InvalidGrammarError, QueueFullError,
                                       UnsupportedRequestError)
from genrpc.service.engines.reference.model_store import resolve_model_dir

__all__ = ["ReferenceEngine", "EngineStoppedError", "InvalidGrammarError", "QueueFullError", "UnsupportedRequestError",
           "resolve_model_dir"]
