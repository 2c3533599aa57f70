"""The reference engine: torch + transformers on CPU, bit-identical alone or batched (continuous batching over one
shared KV cache). Import `reference.engine` for the engine; this package itself imports nothing, so the engine
factory can read `reference.config` without importing torch."""
