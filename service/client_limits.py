"""Tokens per minute per client (the `tpm=N` of the API keys file), enforced by the service because only the
service knows how many tokens a request used. Envoy enforces the requests-per-second side (`rps=N`).

The client is the `x-client-id` metadata Envoy's api_key_auth sets from the key (it overwrites any value a
client sends). A sliding window: a request is refused (RESOURCE_EXHAUSTED, 429 over REST) while the client's
prompt + completion tokens of the last 60 s reach its limit; tokens are charged when a request finishes, so
requests already running are never cut and one request may overshoot the limit once.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections import deque
from collections.abc import Callable, Mapping

import grpc

from genrpc.service.errors import ServiceError

CLIENT_ID_METADATA = "x-client-id"
WINDOW_S = 60.0

# the client id of the RPC being handled (set by the interceptor, read when its tokens are charged)
current_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("genrpc_client", default=None)


class TokenRateLimited(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMIT_EXCEEDED"


class TokensPerMinute:
    def __init__(self, limits: Mapping[str, int], clock: Callable[[], float] = time.monotonic):
        self._limits = {client: tpm for client, tpm in limits.items() if tpm > 0}
        self._clock = clock
        self._spent: dict[str, deque[tuple[float, int]]] = {client: deque() for client in self._limits}

    def __bool__(self) -> bool:
        return bool(self._limits)

    def _used(self, client: str, now: float) -> int:
        spent = self._spent[client]
        while spent and spent[0][0] <= now - WINDOW_S:
            spent.popleft()
        return sum(tokens for _, tokens in spent)

    def check(self, client: str | None) -> None:
        """Raises TokenRateLimited when `client` has used its tokens of the last minute."""
        if client not in self._limits:
            return
        now = self._clock()
        limit = self._limits[client]
        used = self._used(client, now)
        if used >= limit:
            spent = self._spent[client]
            # the oldest charges leave the window first: wait until enough of them have
            over, wait_s = used - limit, WINDOW_S
            for at, tokens in spent:
                over -= tokens
                if over < 0:
                    wait_s = at + WINDOW_S - now
                    break
            retry_after = max(1, math.ceil(wait_s))
            raise TokenRateLimited(
                f"Rate limit reached for client {client}: {limit} tokens per minute (tpm in the API keys file), "
                f"{used} used in the last 60 s. Retry after {retry_after} s.",
                metadata={"limit": "tokens_per_minute", "tpm": str(limit), "retry_after_s": str(retry_after)})

    def charge(self, client: str | None, tokens: int) -> None:
        if client in self._limits and tokens > 0:
            self._spent[client].append((self._clock(), tokens))
