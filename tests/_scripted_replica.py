"""One service replica for tests/test_scaleout.py: the real `genrpc.service.server.serve` (gRPC server,
grpc.health.v1, Prometheus metrics, SIGTERM drain) with the scripted engine in place of a model, so three replicas
fit on a shared 2-core machine. Settings come from GENRPC_* variables as for `genrpc serve`.

Usage: python tests/_scripted_replica.py STEP_DELAY_S
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from scripted_engine import ScriptedEngine  # noqa: E402

from genrpc.service import server  # noqa: E402
from genrpc.settings import Settings  # noqa: E402

REPLY = "replica reply. " * 20  # 300 characters: one per step, long enough for streams that outlive a drain


def main() -> None:
    step_delay_s = float(sys.argv[1])
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server.build_engine = lambda settings: ScriptedEngine(reply=REPLY, context_length=4096, step_delay_s=step_delay_s)
    asyncio.run(server.serve(Settings()))


if __name__ == "__main__":
    main()
