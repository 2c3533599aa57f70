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
from google.protobuf.descriptor import Descriptor, FieldDescriptor
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


# ---- Envoy's transcoder's leniencies, so both REST paths accept and refuse the same bodies -------------------
# Envoy's transcoder parses JSON with protobuf's C++ stream converter (DataPiece): a bool field also takes the
# strings "true"/"t"/"yes"/"y"/"1" and "false"/"f"/"no"/"n"/"0" (any case; absl's SimpleAtob), and a number field
# never takes a JSON bool, and a message field takes only an object. Python's json_format takes only JSON bools
# (or "true"/"false") for a bool, reads true as 1 for a number and [] as an empty message. `align_with_transcoder` rewrites a body so ParseDict gives the transcoder's verdict.

_TRUE_STRINGS = {"true", "t", "yes", "y", "1"}
_FALSE_STRINGS = {"false", "f", "no", "n", "0"}
_NUMBER_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_INT32,
                 FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
                 FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED32,
                 FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64}
_OPAQUE = {"google.protobuf.Value", "google.protobuf.Struct", "google.protobuf.ListValue"}


def _message_name(field: FieldDescriptor) -> str:
    return field.message_type.full_name if field.message_type is not None else ""


def _align_scalar(field: FieldDescriptor, value: Any) -> Any:
    if _message_name(field) == "google.protobuf.ListValue" and isinstance(value, dict):
        if "" in value:  # ... once it has refused an empty key at its top
            raise ValueError(f"Invalid empty field name in {field.name}")
        return []  # the transcoder reads any other object as an empty list
    if field.type == FieldDescriptor.TYPE_BOOL and isinstance(value, str):
        lowered = value.lower()
        if lowered in _TRUE_STRINGS:
            return True
        if lowered in _FALSE_STRINGS:
            return False
        raise ValueError(f"Invalid value for bool field {field.name}: {value!r}")
    if field.type in _NUMBER_TYPES and isinstance(value, bool):
        raise ValueError(f"Invalid value for number field {field.name}: {value!r}")
    if field.message_type is not None and not field.message_type.full_name.startswith("google.protobuf."):
        if not isinstance(value, dict):  # json_format reads [] as an empty message; the transcoder refuses it
            raise ValueError(f"Invalid value for message field {field.name}: expected an object")
        align_with_transcoder(value, field.message_type)
    return value


def _flat(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, list):
            yield from _flat(item)
        else:
            yield item


def align_with_transcoder(body: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    """`body` (changed in place) as Envoy's transcoder reads it; raises ValueError where the transcoder refuses."""
    if descriptor.full_name in _OPAQUE:
        return body
    fields = {f.json_name: f for f in descriptor.fields} | {f.name: f for f in descriptor.fields}
    for key, value in body.items():
        if key == "":  # the transcoder refuses an empty field name (an unknown name is dropped)
            raise ValueError(f"Invalid empty field name in {descriptor.name}")
        field = fields.get(key)
        if field is None or value is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if isinstance(value, dict):
                value_field = field.message_type.fields_by_name["value"]
                for map_key, item in value.items():
                    # a null map value is its type's default to the transcoder (protobuf's C++ JSON parser), an
                    # error to json_format
                    value[map_key] = value_field.default_value if item is None else _align_scalar(value_field, item)
        elif field.is_repeated:
            # the transcoder (protobuf's C++ ProtoWriter) skips a null element and reads a list nested in a
            # repeated field as its elements; a null or a list is a google.protobuf.Value of its own
            if isinstance(value, list) and _message_name(field) != "google.protobuf.Value":
                body[key] = [_align_scalar(field, item) for item in _flat(value) if item is not None]
        else:
            body[key] = _align_scalar(field, value)
    return body
