"""The bridge's one JSON encoder: compact separators, non-ASCII unescaped (what Envoy's transcoder prints and
what every bridge response and SSE frame uses), and the protobuf JSON mapping Envoy's transcoder uses
(`preserve_proto_field_names`).

The stdlib encoder, not orjson: orjson formats small floats differently (`1e-05` as `0.00001`), and logprobs
are such floats, so streamed and unary bodies would no longer match byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(obj: Any) -> bytes:
    """`obj` as compact UTF-8 JSON."""
    return _ENCODER.encode(obj).encode()


def quote(text: str) -> str:
    """A string as a JSON string literal, exactly as `dumps` writes it inside a document."""
    return _ENCODER.encode(text)


def message_to_dict(message: Message) -> dict[str, Any]:
    """Envoy's JSON mapping of a message (proto field names, unset fields omitted)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object (raises ValueError with a readable reason otherwise). Duplicate keys are
    refused, as protobuf's JSON parser refuses them."""
    try:
        text = body.decode("utf-8")
        parsed = json.loads(text, object_pairs_hook=_reject_duplicate_keys) if text.strip() else None
    except UnicodeDecodeError as e:
        raise ValueError(f"the body is not UTF-8: {e}") from e
    except RecursionError as e:
        raise ValueError("the body is nested too deeply") from e
    if not isinstance(parsed, dict):
        raise ValueError("the request body must be a JSON object")
    return parsed
