"""xgrammar EBNF (what the service builds for forced tool calls) -> llama.cpp GBNF.

xgrammar prints a superset of GBNF: lookahead assertions `(= ...)` after a rule body, repetition ranges
with an open end written `{m, -1}`, `\\0` in character classes, and `_` in rule names. Lookaheads only tell xgrammar what may
follow a rule; in the grammars the service builds (JSON values inside fixed text) the rest of the grammar
already allows nothing else, so dropping them leaves the language unchanged. The rest is a spelling change.
"""

from __future__ import annotations

import re

_OPEN_REPEAT = re.compile(r"\{\s*(\d+)\s*,\s*-1\s*\}")
_BOUNDED_REPEAT = re.compile(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}")


def _drop_lookaheads(line: str) -> str:
    """Removes every `(= ...)` group and spells rule names GBNF's way, skipping strings and character classes."""
    out: list[str] = []
    i = 0
    while i < len(line):
        ch = line[i]
        if ch in "\"[":
            end = _end_of_literal(line, i)
            out.append(line[i:end])
            i = end
        elif line.startswith("(=", i):
            depth, j = 0, i
            while j < len(line):
                if line[j] in "\"[":
                    j = _end_of_literal(line, j)
                    continue
                if line[j] == "(":
                    depth += 1
                elif line[j] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            i = j + 1
        else:
            out.append("-" if ch == "_" else ch)  # GBNF rule names are [a-zA-Z0-9-]
            i += 1
    return "".join(out).rstrip()


def _end_of_literal(line: str, start: int) -> int:
    close = '"' if line[start] == '"' else "]"
    i = start + 1
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        if line[i] == close:
            return i + 1
        i += 1
    return len(line)


def gbnf_from_xgrammar(ebnf: str) -> str:
    lines = []
    for line in ebnf.splitlines():
        line = _drop_lookaheads(line)
        line = _OPEN_REPEAT.sub(r"{\1,}", line)
        line = _BOUNDED_REPEAT.sub(r"{\1,\2}", line)
        line = line.replace("\\0", "\\x00")
        lines.append(line)
    return "\n".join(lines) + "\n"
