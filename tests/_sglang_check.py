"""Runs SGLang 0.5.23's own checks on what genrpc produces, inside the throwaway venv `.venv-sglang-check` (built
by `make test` from tests/sglang-check-requirements.txt; genrpc's own venv never gets sglang).

    .venv-sglang-check/bin/python tests/_sglang_check.py < cases.json > results.json

Input: {"sampling": {id: {"params": {...}, "vocab_size": N}}, "server_args": {id: {...}}}. For each sampling case
it runs `SamplingParams(**params)`, `.normalize(tokenizer)` and `.verify(vocab_size)`; for each server_args case
`ServerArgs(**kwargs)`. Output: {id: {"ok": true, "fields": {...}}} or {id: {"ok": false, "error": "...",
"type": "ValueError"}}. Optional: "engine_methods", "class_fields" and "function_strings" (read from SGLang's source
with ast, for modules that do not import here) and "trace" (SGLang's own request tracing, see `run_trace`).

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
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method:
                    return [a.arg for a in item.args.args + item.args.kwonlyargs]
    return None


def class_fields(module: str, class_name: str) -> list[str] | None:
    """Annotated fields of a class in an SGLang module (e.g. ``GenerateReqInput`` in ``srt/managers/io_struct.py``),
    read with ast: io_struct imports the model configs (torchvision ...), which this venv does not have."""
    import ast

    path = pathlib.Path(importlib.util.find_spec("sglang").origin).parent / module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return [item.target.id for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)]
    return None


def function_string_constants(module: str, class_name: str, function: str) -> list[str] | None:
    """The string constants in `class_name.function` of an SGLang module (e.g. the meta_info keys a method fills)."""
    import ast

    path = pathlib.Path(importlib.util.find_spec("sglang").origin).parent / module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == function:
                    return sorted({n.value for n in ast.walk(item)
                                   if isinstance(n, ast.Constant) and isinstance(n.value, str)})
    return None


def run_trace(case: dict) -> dict:
    """SGLang's own tracing as its processes run it with `server_args` (genrpc's engine kwargs) and `environ`
    (genrpc's engine_environ): ``process_tracing_init`` (entrypoints/engine.py), then per request what
    tokenizer_manager.py ``_init_req_state`` -> req_time_stats.py ``init_trace_ctx`` / ``set_created_time`` /
    ``set_finished_time`` do with ``GenerateReqInput.external_trace_header`` (genrpc's async_generate kwarg):
    ``TraceReqContext(...).trace_req_start()`` ... ``trace_req_finish()``. The spans go to the endpoint (flushed)."""
    import os

    from sglang.srt.observability import trace as sglang_trace

    os.environ.update(case["environ"])
    args = case["server_args"]
    if not args.get("enable_trace"):
        return {"ok": False, "error": "enable_trace is off"}
    sglang_trace.process_tracing_init(args["otlp_traces_endpoint"], args.get("otlp_service_name"),
                                      trace_modules=args.get("trace_modules", "request"))
    requests = {}
    for rid, generate_kwargs in case["requests"].items():
        ctx = sglang_trace.TraceReqContext(rid=rid, bootstrap_room=None, role="unified", module_name="request",
                                           external_trace_header=generate_kwargs.get("external_trace_header"))
        ctx.trace_req_start()
        root = ctx.root_span
        requests[rid] = {"tracing_enable": ctx.tracing_enable,
                         "trace_id": format(root.get_span_context().trace_id, "032x"),
                         "span_id": format(root.get_span_context().span_id, "016x"),
                         "parent_span_id": format(root.parent.span_id, "016x") if root.parent else None}
        ctx.trace_req_finish()
    from opentelemetry import trace as otel_trace
    flushed = otel_trace.get_tracer_provider().force_flush(10_000)
    return {"ok": True, "flushed": flushed, "requests": requests}


def main() -> int:
    cases = json.load(sys.stdin)
    install_sglangs_triton_stub()
    import sglang
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.server_args import ServerArgs

    results = {"sglang_version": sglang.__version__,
               "engine_api": {m: engine_method_params(m) for m in cases.get("engine_methods", [])},
               "class_fields": {f"{module}:{name}": class_fields(module, name)
                                for module, name in cases.get("class_fields", [])},
               "function_strings": {f"{module}:{name}.{fn}": function_string_constants(module, name, fn)
                                    for module, name, fn in cases.get("function_strings", [])}}
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
    if "trace" in cases:  # last: it installs SGLang's global tracer provider in this process
        try:
            results["trace"] = run_trace(cases["trace"])
        except Exception as exc:  # noqa: BLE001
            results["trace"] = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
