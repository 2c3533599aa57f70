"""The default engine: torch + transformers on CPU with continuous batching over one shared KV cache."""

from service.engines.cpu.engine import (CpuEngine, EngineStoppedError, InvalidGrammarError, QueueFullError,
                                       UnsupportedRequestError)
from service.engines.cpu.model_store import resolve_model_dir

__all__ = ["CpuEngine", "EngineStoppedError", "InvalidGrammarError", "QueueFullError", "UnsupportedRequestError",
           "resolve_model_dir"]
