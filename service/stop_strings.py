"""Stop strings over a stream of text deltas.

Text that could still be the start of a stop string is held back until the next delta decides it, so a
stop string split across tokens is never streamed to the client.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._held = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit now; sets `matched` when a stop string completes."""
        if not self._stops or self.matched:
            return text if not self.matched else ""
        buffer = self._held + text
        first = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            self.matched = True
            self._held = ""
            return buffer[:first]
        keep = partial_suffix_length(buffer, self._stops)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """Releases held-back text at the end of generation (it never completed a stop string)."""
        held, self._held = self._held, ""
        return held


def partial_suffix_length(buffer: str, patterns: tuple[str, ...]) -> int:
    """Length of the longest suffix of `buffer` that is a proper prefix of one of `patterns`: the text to hold
    back because the next delta may complete a pattern (stop strings here, `<tool_call>` in tool_calls)."""
    best = 0
    for pattern in patterns:
        for length in range(min(len(pattern) - 1, len(buffer)), best, -1):
            if buffer.endswith(pattern[:length]):
                best = length
                break
    return best
