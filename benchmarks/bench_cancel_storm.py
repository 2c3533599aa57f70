"""Cancel storm, longer run: `genrpc up` on free loopback ports, then ROUNDS rounds of STREAMS streams (half SSE
through Envoy, half native gRPC through Envoy), each cancelled at a random point (tests/_cancel_storm.py). Prints
per round the time from the last cancel until the service reports nothing running or waiting, and the service's
RSS across rounds.

    .venv/bin/python benchmarks/bench_cancel_storm.py                    # synthetic engine, 1,000 x 10 rounds
    .venv/bin/python benchmarks/bench_cancel_storm.py --engine reference --streams 100 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the storm and stack helpers

from _cancel_storm import storm_round  # noqa: E402
from _stack_up import StackUp  # noqa: E402

from genrpc.settings import DEFAULT_MODEL_ID  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="synthetic", choices=["synthetic", "reference", "llamacpp"])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--synthetic-tokens-per-s", type=float, default=20)
    args = parser.parse_args()
    settings: dict[str, object] = {"engine": args.engine, "max_queue": 4 * args.streams}
    if args.engine == "synthetic":
        settings["synthetic_tokens_per_s"] = args.synthetic_tokens_per_s
    else:
        settings["max_batch_size"] = min(args.streams, 64)
    with tempfile.TemporaryDirectory() as workdir:
        stack = StackUp(Path(workdir), os.getpid() % 10000 + 900, **settings)
        try:
            rss = [stack.service_rss_bytes()]
            drains = []
            for round_number in range(args.rounds):
                result = await storm_round(stack.envoy, DEFAULT_MODEL_ID, args.streams, stack.running_and_waiting,
                                           seed=round_number, drain_limit_s=120,
                                           max_tokens=100_000 if args.engine == "synthetic" else 1000)
                rss.append(stack.service_rss_bytes())
                drains.append(result.drain_s)
                print(f"round {round_number + 1:2d}: opened {result.opened}/{args.streams}, refused "
                      f"{result.refused}, drained {result.drain_s * 1000:6.0f} ms after the last cancel, "
                      f"service RSS {rss[-1] / 2**20:.1f} MiB", flush=True)
        finally:
            stack.stop()
    print(f"engine {args.engine}, {args.streams} streams x {args.rounds} rounds: drain median "
          f"{statistics.median(drains) * 1000:.0f} ms, max {max(drains) * 1000:.0f} ms; service RSS "
          f"{rss[0] / 2**20:.1f} MiB before, {rss[1] / 2**20:.1f} after round 1, {rss[-1] / 2**20:.1f} at the end "
          f"({(rss[-1] / rss[1] - 1) * 100:+.1f}% after round 1, {(rss[-1] / rss[0] - 1) * 100:+.1f}% overall)")


if __name__ == "__main__":
    asyncio.run(main())
