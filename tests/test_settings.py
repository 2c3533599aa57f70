"""Settings: flag > env > default, and every option documented in the README."""

from __future__ import annotations

import argparse
import pathlib

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
