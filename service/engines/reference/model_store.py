"""Where the CPU engine's model comes from: a local HF directory, or a GGUF file converted once into a cache.

Loading a GGUF through transformers takes ~23 s (gguf-py re-parses the vocabulary metadata), while loading the
same weights back from safetensors takes ~2 s, so a GGUF is converted on first use and cached under
`<cache_dir>/<stem>-<hash of path, size, mtime>/`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import sys
import time
import uuid

from tqdm import tqdm

from genrpc.service.engines.gguf_files import bundled_gguf_path, cache_name

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


def resolve_model_dir(model: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> pathlib.Path:
    """A local HF model directory for `model` (empty: the bundled GGUF), converting (once) if it names a GGUF."""
    source = pathlib.Path(model).expanduser() if model else bundled_gguf_path()
    if source.is_dir():
        return source
    if not source.is_file():
        raise FileNotFoundError(f"model not found: {source}")
    if source.suffix.lower() != ".gguf":
        raise ValueError(f"model must be an HF model directory or a .gguf file, got {source}")
    target = pathlib.Path(cache_dir).expanduser() / cache_name(source)
    if not target.is_dir():
        convert_gguf(source, target)
    return target


def convert_gguf(gguf: pathlib.Path, target: pathlib.Path) -> None:
    """Dequantizes `gguf` into fp32 safetensors + tokenizer + generation config at `target`, atomically.

    Everything is written to a temporary sibling directory that is renamed into place at the end, so a killed
    conversion never leaves a half-written cache behind.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target.parent)
    tmp = target.parent / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}"
    log.info("converting %s into %s (one-off, ~30 s)", gguf, target)
    t0 = time.perf_counter()
    stages = ["reading GGUF tokenizer", "reading GGUF weights", "saving safetensors"]
    try:
        with tqdm(total=len(stages), desc="converting model", unit="stage", file=sys.stderr) as bar:
            bar.set_postfix_str(stages[0])
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str(stages[1])
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # silences per-tensor GGUF notices
            try:
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
            finally:
                transformers.logging.set_verbosity(verbosity)
            bar.update()
            bar.set_postfix_str(stages[2])
            # On CPU the weights are fully dequantized into plain fp32 tensors, but the GGUF quantizer marker
            # makes save_pretrained refuse ("not serializable"): drop the marker before saving.
            model.hf_quantizer = None
            if getattr(model.config, "quantization_config", None) is not None:
                del model.config.quantization_config
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            model.generation_config.save_pretrained(str(tmp))
            bar.update()
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # a concurrent conversion winning the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)


def _remove_stale_tmp_dirs(cache_dir: pathlib.Path) -> None:
    """Deletes leftovers of conversions whose process died (the pid is part of the temp dir's name)."""
    for path in cache_dir.glob(f"{_TMP_PREFIX}*"):
        pid = path.name[len(_TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(PermissionError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
    return True
