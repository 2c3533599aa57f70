"""One-off, in a child process: a GGUF's tokenizer as `tokenizer.json` plus the metadata the engine needs.

Run as ``python -m genrpc.service.engines.llamacpp.export_tokenizer GGUF TARGET_DIR``. It imports transformers
(whose GGUF tokenizer converter builds the `tokenizers` pipeline from the GGUF vocabulary, ~20 s for a 49k
vocabulary) and reads the GGUF metadata with `gguf` (~2 s); the service process then loads the result in
milliseconds and never imports transformers or torch. Written to a temporary sibling, renamed into place.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import uuid

METADATA_FILE = "genrpc-gguf.json"
NOT_A_CHAT_MODEL_EXIT = 3  # the GGUF has no tokenizer.chat_template


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value.tolist()[0]


def export(gguf_path: pathlib.Path, target: pathlib.Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    reader = GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    metadata = {
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "context_length": _field(reader, f"{arch}.context_length"),
        "architecture": arch,
        "name": _field(reader, "general.name"),
    }
    if not metadata["chat_template"]:
        raise SystemExit(NOT_A_CHAT_MODEL_EXIT)  # checked before the slow part
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    metadata["special_tokens"] = {name: str(getattr(tok, name)) for name in ("bos_token", "eos_token", "unk_token",
                                                                            "pad_token")
                                  if getattr(tok, name, None) is not None}
    tmp = target.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}"
    tmp.mkdir(parents=True)
    try:
        tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / METADATA_FILE).write_text(json.dumps(metadata))
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # a concurrent export winning the rename is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    export(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
