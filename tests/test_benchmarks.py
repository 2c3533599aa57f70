"""The benchmarks still run: each script at its smallest size, against the real processes it starts.

They measure speed and are run by hand (`make bench`, `make bench-front`); this only keeps them from rotting when the
code they drive changes (an import moved, a setting renamed). No figure is asserted.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_bench_engines_prints_every_side() -> None:
    out = run("bench_engines.py", "--concurrency", "1", "--tokens", "8", "--rounds", "1")
    for title in ("llama.cpp's own server in process", "genrpc llama.cpp engine", "whole genrpc stack:",
                  "llama.cpp's own HTTP server", "whole genrpc stack against llama-server"):
        assert title in out
    # one row per table for 1 stream: streams, TTFT, decode, aggregate (and ratios after the first table)
    rows = re.findall(r"^\s+1\s+[\d.]+\s+[\d.]+\s+[\d.]+", out, re.M)
    assert len(rows) == 5, out
    assert re.search(r"service RSS after the run: \d+ MB", out)


def test_bench_front_prints_a_row_per_path() -> None:
    out = run("bench_front.py", "--duration", "0.5", "--concurrency", "2", "--pacing", "paced")
    for path in ("grpc ", "grpc-envoy", "sse ", "sse-bridge", "unary", "grpc-floor"):
        assert re.search(rf"^{path}\s*paced\s+2\s+\d+", out, re.M), out
    assert re.search(r"^  paced      2 streams: +\d+ / +\d+ µs = +[\d.]+x$", out, re.M), out


def test_bench_overload_reports_refusals() -> None:
    # two sides: the service deciding alone (0), and Envoy refusing past 1 request (all paths together) itself
    out = run("bench_overload.py", "--slots", "2", "--queue", "2", "--factor", "3", "--max-tokens", "4",
              "--probes", "2", "--sides", "0,1")
    assert len(re.findall(r"refused 429/RESOURCE_EXHAUSTED: [1-9]", out)) == 2, out
    assert out.count("5xx / other errors: 0") == 2, out
    assert re.search(r"^\s+\w+ by Envoy  : [1-9]", out, re.M), out
    assert re.search(r"^  sse   0: .*x\)   1: .*x\)$", out, re.M), out
