"""The committed stubs and Envoy descriptor set must equal a fresh `make protos` (scripts/gen_protos.py)."""

from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

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
