"""`@within_capacity`: every generating RPC holds its request's share of capacity for as long as it runs.

The decision is O(1) and comes first, before validation, templating and tokenising, so a full server refuses at
the cost of one round trip (GenerationServicer._admission keeps the count and raises Overloaded).
"""

from __future__ import annotations

import contextlib
import functools
import inspect


def within_capacity(method):
    """Wraps a servicer method `(self, request, context)`, streaming or unary, in `self._admission(request)`."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            with self._admission(request):
                async with contextlib.aclosing(method(self, request, context)) as messages:
                    async for message in messages:
                        yield message
        stream.holds_capacity = True
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        with self._admission(request):
            return await method(self, request, context)
    unary.holds_capacity = True  # Envoy's generating routes list these methods (envoy.config.GENERATING_METHODS)
    return unary
