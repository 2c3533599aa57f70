"""Settings: flag > env > default, and every option documented in the README."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

from genrpc import cli
from genrpc import settings as settings_module
from genrpc.settings import Settings

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def parse(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser()
    settings_module.add_arguments(parser)
    return settings_module.from_args(parser.parse_args(argv))


def test_flag_beats_env_beats_default(monkeypatch):
    assert parse([]).grpc_port == 50051
    monkeypatch.setenv("GENRPC_GRPC_PORT", "6000")
    monkeypatch.setenv("GENRPC_MAX_BATCH_SIZE", "3")
    parsed = parse(["--grpc-port", "7000"])
    assert parsed.grpc_port == 7000 and parsed.max_batch_size == 3


def test_bad_value_is_rejected(monkeypatch):
    monkeypatch.setenv("GENRPC_ENGINE", "tpu")
    try:
        parse([])
    except ValueError as error:
        assert "engine" in str(error)
    else:
        raise AssertionError("an unknown engine was accepted")


def test_every_option_is_in_the_readme():
    for name in Settings.model_fields:
        flag, env = "--" + name.replace("_", "-"), "GENRPC_" + name.upper()
        assert f"`{flag}` | `{env}`" in README, f"{flag} / {env} missing from the README configuration table"


def _bridge_environment(env: dict[str, str]) -> str:
    """GRPC_EXPERIMENTS as it was when `genrpc bridge` first imported grpc."""
    code = ("import os, sys\n"
            "seen = []\n"
            "class ImportSpy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'grpc' and not seen:\n"
            "            seen.append(os.environ.get('GRPC_EXPERIMENTS'))\n"
            "sys.meta_path.insert(0, ImportSpy())\n"
            "from genrpc import cli\n"
            "cli.cmd_bridge = lambda settings, args: print(seen or 'grpc not imported', file=sys.stderr) or 0\n"
            "sys.exit(cli.main(['bridge']))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_the_bridge_uses_grpcs_iomgr_client_unless_told_otherwise():
    """grpc reads GRPC_EXPERIMENTS once, on import: main() must set it before anything imports grpc."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    assert _bridge_environment(env) == f"[{cli.BRIDGE_GRPC_EXPERIMENTS!r}]"
    assert _bridge_environment({**env, "GRPC_EXPERIMENTS": "tcp_rcv_lowat"}) == "['tcp_rcv_lowat']"
