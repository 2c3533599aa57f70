"""The default CPU engine: llama.cpp's own server (slots, continuous batching, sampler) in process via `xllamacpp`."""

from genrpc.service.engines.llamacpp.engine import LlamaCppEngine, LlamaCppEngineConfig

__all__ = ["LlamaCppEngine", "LlamaCppEngineConfig"]
