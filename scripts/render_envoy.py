"""Writes envoy/rendered/genrpc-local.yaml: Envoy's config for the default settings, as `genrpc up` renders it
(through genrpc.cli.envoy_yaml), so the config that runs can be read without running code.

The descriptor path is relative (envoy/genrpc.pb): from the repository root, `envoy -c
envoy/rendered/genrpc-local.yaml` runs it. Run `python scripts/render_envoy.py` after changing envoy/,
genrpc/error_table.py or the settings' defaults; `--check` exits 1 when the committed file is stale
(tests/test_envoy_template.py asserts the same).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RENDERED = ROOT / "envoy" / "rendered" / "genrpc-local.yaml"
DESCRIPTOR = "envoy/genrpc.pb"  # relative to the repository root


def rendered() -> str:
    from genrpc.cli import envoy_yaml
    from genrpc.settings import Settings

    # model_construct: the fields' defaults only, never GENRPC_* variables of the environment that runs this
    return envoy_yaml(Settings.model_construct(), descriptor=DESCRIPTOR)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = parser.parse_args()
    text = rendered()
    if args.check:
        if not RENDERED.exists() or RENDERED.read_text() != text:
            print(f"stale: {RENDERED.relative_to(ROOT)} (run python scripts/render_envoy.py)", file=sys.stderr)
            return 1
        return 0
    RENDERED.parent.mkdir(parents=True, exist_ok=True)
    RENDERED.write_text(text)
    print(f"wrote {RENDERED.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
