"""The committed stubs and Envoy descriptor set must equal a fresh `make protos` (scripts/gen_protos.py)."""

from __future__ import annotations

import filecmp
import importlib.util
import pathlib
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_outputs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--python-out", str(tmp_path / "py"),
                    "--descriptor-out", str(tmp_path / "genrpc.pb")], check=True)
    fresh = sorted(p.relative_to(tmp_path / "py") for p in (tmp_path / "py").rglob("*.py*"))
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "genrpc" / "v1").glob("*_pb2*.py*"))
    assert fresh == committed, "stub files differ: run `make protos`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / "py" / p, ROOT / p, shallow=False)]
    assert not stale, f"stale generated stubs (run `make protos`): {stale}"
    assert (tmp_path / "genrpc.pb").read_bytes() == (ROOT / "envoy" / "genrpc.pb").read_bytes(), \
        "stale envoy/genrpc.pb: run `make protos`"


def test_descriptor_set_has_error_details_and_http_bindings():
    descriptors = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "envoy" / "genrpc.pb").read_bytes())
    names = {f.name for f in descriptors.file}
    assert {"google/rpc/error_details.proto", "google/rpc/status.proto", "google/api/annotations.proto",
            "genrpc/v1/generation_service.proto"} <= names


def test_every_field_and_rpc_is_documented():
    """Every message field, enum value and RPC carries a leading comment (the contract is the docs)."""
    undocumented = []
    for proto in (ROOT / "protos" / "genrpc" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "//", "syntax", "package", "import"))
            is_rpc = stripped.startswith("rpc ")
            if (is_field or is_rpc) and not lines[number - 1].strip().startswith("//") \
                    and "post:" not in stripped and "get:" not in stripped and "body:" not in stripped:
                undocumented.append(f"{proto.name}:{number + 1}: {stripped}")
    assert not undocumented, "\n".join(undocumented)


def _request_fields_script():
    spec = importlib.util.spec_from_file_location("gen_request_fields", ROOT / "scripts" / "gen_request_fields.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up there
    spec.loader.exec_module(module)
    return module


def test_readme_request_fields_match_the_protos():
    """README's "Request fields" tables are exactly what the protos' verdict comments generate."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_request_fields.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_request_field_has_a_verdict_and_the_readme_shows_it():
    gen = _request_fields_script()
    readme = (ROOT / "README.md").read_text()
    for proto, message, _ in gen.REQUESTS:
        fields = gen.request_fields((ROOT / "protos" / "genrpc" / "v1" / proto).read_text(), message, proto)
        declared = set(getattr(__import__("genrpc.v1." + proto.replace(".proto", "_pb2"), fromlist=["x"]),
                               message).DESCRIPTOR.fields_by_name)
        assert {f.name for f in fields} == declared  # the parser saw every field
        for f in fields:
            row = f"| `{f.name}` | " + " | ".join(f.verdicts[e] for e in gen.ENGINES) + " |"
            assert row in readme, row
    # The truth the table states is checked against behaviour in test_servicer, test_sglang_adapter and
    # test_llamacpp_engine; here: the engine-specific verdicts.
    chat = gen.request_fields((ROOT / "protos" / "genrpc" / "v1" / "chat.proto").read_text(), "ChatCompletionRequest")
    verdicts = {f.name: f.verdicts for f in chat}
    assert verdicts["top_a"] == {"llamacpp": "refused", "reference": "honoured", "sglang": "refused"}
    assert verdicts["min_tokens"] == {"llamacpp": "refused", "reference": "honoured", "sglang": "honoured"}


def test_a_field_without_a_verdict_is_an_error():
    gen = _request_fields_script()
    proto = "message R {\n  // x is a thing.\n  int32 x = 1;\n}\n"
    with pytest.raises(ValueError, match="verdict"):
        gen.request_fields(proto, "R")
    with pytest.raises(ValueError, match="unknown engine"):
        gen.request_fields(proto.replace("thing.", "thing.\n  // [honoured; vllm: refused]"), "R")
    assert gen.request_fields(proto.replace("thing.", "thing.\n  // [refused]"), "R")[0].verdicts == \
        dict.fromkeys(gen.ENGINES, "refused")
