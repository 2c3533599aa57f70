"""Regenerates everything derived from protos/: Python stubs (genrpc/v1/) and Envoy's descriptor set
(envoy/genrpc.pb, package data of genrpc.envoy; `make protos` then runs scripts/render_envoy.py).

Run through `make protos`. tests/test_protos.py regenerates into a temporary folder and fails when the
committed outputs differ.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_PROTOS = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / "genrpc").rglob("*.proto"))
# Envoy's transcoder needs the error-detail types in its descriptor set, or convert_grpc_status silently
# fails to render details.
EXTRA_DESCRIPTOR_PROTOS = ["google/rpc/status.proto", "google/rpc/error_details.proto"]
GOOGLEAPIS_INCLUDE = pathlib.Path(importlib.util.find_spec("google.api.annotations_pb2").origin).parent.parent.parent
GRPC_TOOLS_INCLUDE = pathlib.Path(grpc_tools.__file__).parent / "_proto"


def _protoc(*args: str) -> None:
    argv = ["protoc", f"-I{PROTO_ROOT}", f"-I{GOOGLEAPIS_INCLUDE}", f"-I{GRPC_TOOLS_INCLUDE}", *args]
    if protoc.main(argv) != 0:
        sys.exit(f"protoc failed: {' '.join(argv)}")


def generate(python_out: pathlib.Path, descriptor_out: pathlib.Path) -> None:
    python_out.mkdir(parents=True, exist_ok=True)
    descriptor_out.parent.mkdir(parents=True, exist_ok=True)
    _protoc(f"--python_out={python_out}", f"--pyi_out={python_out}", f"--grpc_python_out={python_out}",
            *PACKAGE_PROTOS)
    _protoc("--include_imports", f"--descriptor_set_out={descriptor_out}", *PACKAGE_PROTOS,
            *EXTRA_DESCRIPTOR_PROTOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python-out", type=pathlib.Path, default=ROOT,
                        help="folder that receives genrpc/v1/*_pb2*.py")
    parser.add_argument("--descriptor-out", type=pathlib.Path, default=ROOT / "envoy" / "genrpc.pb",
                        help="Envoy's descriptor set (the package data genrpc.envoy ships)")
    args = parser.parse_args()
    generate(args.python_out, args.descriptor_out)


if __name__ == "__main__":
    main()
