"""Structured-output constraints: OpenAI `response_format` and forced `tool_choice` → a JSON Schema or a grammar.

Both engines take the result (CPU: xgrammar; SGLang: its `json_schema` / `ebnf` sampling params, also xgrammar
by default). A forced tool call is the Qwen2.5/Hermes wrapper around a JSON object whose `name` is one of the
allowed functions and whose `arguments` follow that function's parameter schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from genrpc.service.tool_calls import CLOSE_TAG, OPEN_TAG

# `json_object` means "any JSON object".
ANY_OBJECT_SCHEMA = {"type": "object"}
MAX_PARALLEL_TOOL_CALLS = 4  # a forced turn with parallel_tool_calls may hold 1..4 calls


@dataclass(frozen=True)
class Constraint:
    json_schema: str | None = None
    ebnf: str | None = None


def response_format_constraint(response_format: dict[str, Any] | None) -> Constraint:
    if not response_format or response_format.get("type") in (None, "", "text"):
        return Constraint()
    if response_format["type"] == "json_object":
        return Constraint(json_schema=json.dumps(ANY_OBJECT_SCHEMA))
    schema = (response_format.get("json_schema") or {}).get("schema") or ANY_OBJECT_SCHEMA
    return Constraint(json_schema=json.dumps(schema))


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    return {"type": "object",
            "properties": {"name": {"const": function["name"]},
                           "arguments": function.get("parameters") or ANY_OBJECT_SCHEMA},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_tool_call_grammar(tools: list[dict[str, Any]], *, parallel: bool) -> str:
    """EBNF for one (or, with `parallel`, one or more) `<tool_call>{...}</tool_call>` blocks and nothing else."""
    import xgrammar  # the only heavy import here, needed only for forced tool calls

    schemas = [_call_schema(t) for t in tools]
    call_schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    grammar = xgrammar.Grammar
    one_call = grammar.concat(grammar.from_ebnf(f'root ::= "{OPEN_TAG}\\n"'),
                              grammar.from_json_schema(json.dumps(call_schema), any_whitespace=False),
                              grammar.from_ebnf(f'root ::= "\\n{CLOSE_TAG}"'))
    if not parallel:
        return str(one_call)
    separator = grammar.from_ebnf('root ::= "\\n"')
    sequences = [one_call]
    for _ in range(MAX_PARALLEL_TOOL_CALLS - 1):
        sequences.append(grammar.concat(sequences[-1], separator, one_call))
    return str(grammar.union(*sequences))
