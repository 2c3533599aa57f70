"""The llama.cpp engine's tokenizer: `tokenizers` + the GGUF's own chat template rendered with jinja2 (no torch).

The vocabulary is exported once from the GGUF into a cache (see export_tokenizer.py); loading it back takes
milliseconds. The chat template is rendered the way transformers renders it (sandboxed jinja2, trim_blocks,
lstrip_blocks, `tojson`, `raise_exception`), so prompts are identical to the reference engine's.
"""

from __future__ import annotations

import datetime
import json
import logging
import pathlib
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream

from genrpc.service.engines.gguf_files import cache_name
from genrpc.service.engines.hf_tokenizer import vocabulary_token_bytes
from genrpc.service.engines.llamacpp.export_tokenizer import METADATA_FILE, NOT_A_CHAT_MODEL_EXIT

log = logging.getLogger(__name__)


class NotAChatModelError(ValueError):
    """The GGUF has no `tokenizer.chat_template`: genrpc serves chat models only."""


_NOT_A_CHAT_MODEL = ("{gguf} has no chat template (GGUF key tokenizer.chat_template): genrpc serves chat models; "
                     "pass an instruct/chat GGUF with --model")


def load_cached(gguf: pathlib.Path, cache_dir: pathlib.Path) -> tuple[GGUFTokenizer, dict[str, Any]]:
    """The tokenizer and metadata of `gguf`, exporting them (in a child process) on first use."""
    target = cache_dir / f"{cache_name(gguf)}-tokenizer"
    if not (target / METADATA_FILE).is_file():
        log.info("exporting the tokenizer of %s into %s (one-off)", gguf, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "genrpc.service.engines.llamacpp.export_tokenizer", str(gguf),
                               str(target)], capture_output=True, text=True)
        if done.returncode == NOT_A_CHAT_MODEL_EXIT:
            raise NotAChatModelError(_NOT_A_CHAT_MODEL.format(gguf=gguf))
        if done.returncode != 0:
            raise RuntimeError(f"cannot read the tokenizer of {gguf}: {done.stderr.strip()[-2000:]}")
    metadata = json.loads((target / METADATA_FILE).read_text())
    if not metadata.get("chat_template"):
        raise NotAChatModelError(_NOT_A_CHAT_MODEL.format(gguf=gguf))
    return GGUFTokenizer(RustTokenizer.from_file(str(target / "tokenizer.json")), metadata), metadata


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class GGUFTokenizer:
    """The `Tokenizer` protocol over a `tokenizers.Tokenizer` and a jinja2 chat template."""

    def __init__(self, backend: RustTokenizer, metadata: dict[str, Any]) -> None:
        self._tok = backend
        self._special = dict(metadata.get("special_tokens") or {})
        self._template_source = metadata["chat_template"]
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(self._template_source)

    @property
    def backend(self) -> RustTokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def supports_tools(self) -> bool:
        return "tools" in self._template_source and "tool_call" in self._template_source

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in token_ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        return vocabulary_token_bytes(self._tok.id_to_token(int(token_id)))

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        text = self._template.render(messages=messages, tools=tools, add_generation_prompt=True, **self._special)
        return self.encode(text)

    def decode_stream(self) -> DecodeStream:
        return DecodeStream(skip_special_tokens=True)
