"""A Hugging Face tokenizer behind the engine-neutral `Tokenizer` protocol (shared by the CPU and SGLang engines)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream


class HFTokenizer:
    """Wraps a transformers fast tokenizer: encoding, chat templating, EOS ids and (incremental) decoding."""

    def __init__(self, hf_tokenizer: Any, extra_eos_token_ids: Iterable[int] = ()) -> None:
        self._tok = hf_tokenizer
        eos: set[int] = set(extra_eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @classmethod
    def from_pretrained(cls, model_dir: str | pathlib.Path) -> HFTokenizer:
        """Loads the tokenizer of a local HF model dir; EOS ids also come from its generation_config.json."""
        from transformers import AutoTokenizer, GenerationConfig

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        try:
            eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        return cls(tok, _as_ids(eos))

    @property
    def hf(self) -> Any:
        """The wrapped transformers tokenizer."""
        return self._tok

    @property
    def backend(self) -> RustTokenizer:
        """The `tokenizers.Tokenizer` that `DecodeStream.step` needs."""
        return self._tok.backend_tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def supports_tools(self) -> bool:
        template = self._tok.chat_template or ""
        return "tools" in template and "tool_call" in template

    def token_bytes(self, token_id: int) -> bytes:
        return vocabulary_token_bytes(self._tok.convert_ids_to_tokens(int(token_id)))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        out = self._tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding (dict-like) rather than a bare list of ids.
        if hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(i) for i in out]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self) -> DecodeStream:
        """A fresh incremental detokeniser: holds back partial UTF-8 sequences, keeps leading spaces."""
        return DecodeStream(skip_special_tokens=True)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte → the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    return {chr(code): b for b, code in mapping.items()}


_BYTE_DECODER = _byte_decoder()


def vocabulary_token_bytes(token: str | None) -> bytes:
    """The bytes a vocabulary entry stands for, whichever way the tokenizer spells bytes."""
    if token is None:
        return b""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # SentencePiece byte fallback
        return bytes([int(token[3:5], 16)])
    if all(ch in _BYTE_DECODER for ch in token):  # byte-level BPE (GPT-2, Qwen, SmolLM2)
        return bytes(_BYTE_DECODER[ch] for ch in token)
    return token.replace("\u2581", " ").encode()


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]
