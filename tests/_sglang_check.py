"""Runs SGLang 0.5.23's own checks on what genrpc produces, inside the throwaway venv `.venv-sglang-check` (built
by `make test` from tests/sglang-check-requirements.txt; genrpc's own venv never gets sglang).

    .venv-sglang-check/bin/python tests/_sglang_check.py < cases.json > results.json

Input: {"sampling": {id: {"params": {...}, "vocab_size": N}}, "server_args": {id: {...}}}. For each sampling case
it runs `SamplingParams(**params)`, `.normalize(tokenizer)` and `.verify(vocab_size)`; for each server_args case
`ServerArgs(**kwargs)`. Output: {id: {"ok": true, "fields": {...}}} or {id: {"ok": false, "error": "...",
"type": "ValueError"}}.

triton (~1 GB, GPU kernels only) is not installed: SGLang's own stub for platforms without it
(sglang/_platform_stubs.py, used on macOS) is registered before sglang is imported. Nothing checked here runs a
kernel: SamplingParams and ServerArgs are plain Python.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import sys


def install_sglangs_triton_stub() -> None:
    if importlib.util.find_spec("triton") is not None:
        return
    sglang_dir = pathlib.Path(importlib.util.find_spec("sglang").origin).parent
    # loaded by path: importing sglang._platform_stubs would run sglang/__init__, which imports triton
    spec = importlib.util.spec_from_file_location("_sglang_platform_stubs", sglang_dir / "_platform_stubs.py")
    stubs = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = stubs
    spec.loader.exec_module(stubs)
    sys.meta_path.insert(0, stubs._TritonFinder())
    stubs._make_mock("triton").__version__ = "3.0.0"


def fields_of(obj) -> dict:
    """A msgspec Struct's fields (SamplingParams and ServerArgs are Structs in 0.5.23), a dataclass's, or vars()."""
    names = getattr(type(obj), "__struct_fields__", None)
    if names is None:
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else list(vars(obj))
    return {name: jsonable(getattr(obj, name)) for name in names}


def jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def engine_method_params(method: str) -> list[str] | None:
    """Parameters of `sglang.Engine.<method>`, read from SGLang's source with ast: the module itself does not import
    here (it needs uvloop, zmq and the GPU stack)."""
    import ast

    path = pathlib.Path(importlib.util.find_spec("sglang").origin).parent / "srt" / "entrypoints" / "engine.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "Engine":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return [a.arg for a in item.args.args + item.args.kwonlyargs]
    return None


def main() -> int:
    cases = json.load(sys.stdin)
    install_sglangs_triton_stub()
    import sglang
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.server_args import ServerArgs

    results = {"sglang_version": sglang.__version__,
               "engine_api": {m: engine_method_params(m) for m in cases.get("engine_methods", [])}}
    for case_id, case in cases.get("sampling", {}).items():
        try:
            sp = SamplingParams(**case["params"])
            sp.normalize(object())  # any non-None tokenizer: genrpc passes no stop strings to SGLang
            sp.verify(case["vocab_size"])
            results[case_id] = {"ok": True, "fields": fields_of(sp)}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[case_id] = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
    for case_id, kwargs in cases.get("server_args", {}).items():
        try:
            args = ServerArgs(**kwargs)
            results[case_id] = {"ok": True, "fields": fields_of(args)}
        except Exception as exc:  # noqa: BLE001
            results[case_id] = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
