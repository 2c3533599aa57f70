"""Turns OpenAI-shaped protobuf requests into validated domain jobs, or raises InvalidArgument naming the field.

Policy for OpenAI fields (README "Request fields"): fields that do not change the output (`user`,
`metadata`, `store`, `service_tier`, ...) are accepted and ignored; fields that would change the output but
are not supported are refused with INVALID_ARGUMENT naming the field. Nothing is silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2

from genrpc.v1 import chat_pb2, completion_pb2
from genrpc.service.errors import InvalidArgument, UnsupportedParameter

MAX_TOP_LOGPROBS = 20
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Limits:
    """Per-request limits (settings `--max-*`, README "Limits"). Each is checked before any expensive work and a
    request over one is refused naming it. The cheap ones (counts) come first; the prompt's size is bounded in
    characters before it is templated and tokenised (`max_prompt_chars`), then in tokens."""

    max_messages: int = 1024
    max_stop: int = 4
    max_n: int = 16  # n x prompts; each choice takes a batch slot
    max_logit_bias: int = 300
    max_prompt_tokens: int = 0  # 0 = the model's context window
    max_tokens_limit: int = 2048  # ceiling on generated tokens per choice; the default when a request sets none

    # A token is rarely longer than this many characters (BPE vocabularies top out near 16-32 for runs of
    # spaces or repeated characters), so a prompt over max_prompt_tokens x this is refused without tokenising.
    CHARS_PER_TOKEN_BOUND = 32

    def max_prompt_chars(self, context_tokens: int) -> int:
        return self.prompt_token_limit(context_tokens) * self.CHARS_PER_TOKEN_BOUND

    def prompt_token_limit(self, context_tokens: int) -> int:
        return min(self.max_prompt_tokens, context_tokens) if self.max_prompt_tokens > 0 else context_tokens


DEFAULT_LIMITS = Limits()


def _over_limit(field_name: str, message: str, limit_name: str, limit: int) -> InvalidArgument:
    return InvalidArgument(field_name, message, reason="LIMIT_EXCEEDED",
                           metadata={"limit": limit_name, "limit_value": str(limit)})


@dataclass(frozen=True)
class Decoding:
    """Validated decoding options shared by chat and completion requests (max tokens resolved later)."""

    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    top_a: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None = off, else how many alternatives per token
    ignore_eos: bool = False
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    include_usage: bool = False
    n: int = 1


@dataclass(frozen=True)
class ChatJob:
    model: str
    # Hugging Face chat-template shape; a user message with images has a list of parts as content (see
    # _message_text), every other content is a string.
    messages: list[dict[str, Any]]
    decoding: Decoding
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool JSON
    tool_choice: str | dict[str, Any] = "auto"  # none | auto | required | {"type": "function", ...}
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    truncate: bool = False


@dataclass(frozen=True)
class CompletionJob:
    model: str
    prompts: list[str | list[int]]
    decoding: Decoding
    echo: bool = False


def as_json(message: Any, field: str, **options: Any) -> Any:
    """A request message (a google.protobuf.Value, Struct or message holding them) as JSON. A NaN or Infinity in it,
    which a gRPC client can send but JSON cannot hold, is refused naming `field`."""
    try:
        return json_format.MessageToDict(message, **options)
    except (ValueError, json_format.Error) as exc:  # "Fail to serialize Infinity for Value.number_value ..."
        raise InvalidArgument(field, f"'{field}' holds a number JSON cannot represent (NaN or Infinity).") from exc


def canonical_json(message: Any, field: str) -> Any:
    """A request message as JSON with a deterministic key order (see `_canonical`)."""
    return _canonical(as_json(message, field, preserving_proto_field_name=True))


def _canonical(value: Any) -> Any:
    """A deterministic key order for JSON that crossed a google.protobuf.Struct (a map: its order is lost).

    Prompts (tool signatures) and grammars (property order of JSON output) depend on key order, so without
    this the same seeded request could give different outputs in different server processes. Properties
    follow the schema's `required` list (which keeps the declaration order, e.g. every field in strict
    mode), then the rest alphabetically; all other keys are sorted. Integral numbers become integers again.
    """
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # Struct numbers are doubles; schemas need integers (maxLength: 40, not 40.0)
    if not isinstance(value, dict):
        return value
    out = {k: _canonical(value[k]) for k in sorted(value)}
    properties = out.get("properties")
    if isinstance(properties, dict):
        required = [k for k in value.get("required", []) if isinstance(k, str) and k in properties]
        order = list(dict.fromkeys(required)) + sorted(k for k in properties if k not in required)
        out["properties"] = {k: properties[k] for k in order}
    return out


def _has(message: Any, name: str) -> bool:
    return message.HasField(name)


def _refuse_if(condition: bool, name: str, why: str = "is not supported by this server") -> None:
    if condition:
        raise UnsupportedParameter(name, f"'{name}' {why}.")


def _in_range(request: Any, name: str, low: float, high: float, default: float, *, low_open: bool = False) -> float:
    if not _has(request, name):
        return default
    value = getattr(request, name)
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise InvalidArgument(name, f"'{name}' must be {bound} and at most {high:g}, got {value:g}.")
    return value


def _parse_stop(request: Any, limits: Limits) -> tuple[str, ...]:
    if not _has(request, "stop"):
        return ()
    value: struct_pb2.Value = request.stop
    kind = value.WhichOneof("kind")
    if kind == "null_value":
        return ()
    if kind == "string_value":
        stops = [value.string_value]
    elif kind == "list_value" and all(v.WhichOneof("kind") == "string_value" for v in value.list_value.values):
        stops = [v.string_value for v in value.list_value.values]
    else:
        raise InvalidArgument("stop", "'stop' must be a string or an array of strings.")
    if len(stops) > limits.max_stop:
        raise _over_limit("stop", f"'stop' holds {len(stops)} strings; at most {limits.max_stop} are allowed "
                                  f"(limit max_stop).", "max_stop", limits.max_stop)
    if any(s == "" for s in stops):
        raise InvalidArgument("stop", "'stop' strings must not be empty.")
    return tuple(stops)


def _logit_bias(request: Any, vocab_size: int, limits: Limits) -> dict[int, float]:
    if len(request.logit_bias) > limits.max_logit_bias:
        raise _over_limit("logit_bias", f"'logit_bias' has {len(request.logit_bias)} entries; at most "
                                        f"{limits.max_logit_bias} are allowed (limit max_logit_bias).",
                          "max_logit_bias", limits.max_logit_bias)
    bias = {}
    for key, value in request.logit_bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise InvalidArgument("logit_bias", f"'logit_bias' keys must be token ids below {vocab_size}, got '{key}'.")
        if not -100 <= value <= 100:
            raise InvalidArgument("logit_bias", f"'logit_bias' values must be between -100 and 100, got {value:g}.")
        bias[int(key)] = value
    return bias


def _decoding(request: Any, max_tokens: int | None, logprobs: int | None, vocab_size: int,
              limits: Limits) -> Decoding:
    if request.model == "":
        raise InvalidArgument("model", "'model' is required.")
    n = request.n if _has(request, "n") else 1
    if n < 1:
        raise InvalidArgument("n", f"'n' must be at least 1, got {n}.")
    # refused with or without streaming, so the transcoder's path (unary) and the bridge's agree on a body
    if request.stream_interval < 0:
        raise InvalidArgument("stream_interval", f"'stream_interval' must be 0 (the server's default), 1 (a chunk "
                                                 f"per token) or more; got {request.stream_interval}.")
    if n > limits.max_n:
        raise _over_limit("n", f"'n' is {n}; at most {limits.max_n} choices are allowed (limit max_n).",
                          "max_n", limits.max_n)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgument("max_tokens", f"'max_tokens' must be at least 1, got {max_tokens}.")
    if max_tokens is not None and limits.max_tokens_limit and max_tokens > limits.max_tokens_limit:
        raise _over_limit("max_tokens", f"'max_tokens' is {max_tokens}; this server generates at most "
                                        f"{limits.max_tokens_limit} tokens per choice (limit max_tokens_limit).",
                          "max_tokens_limit", limits.max_tokens_limit)
    top_k = request.top_k if _has(request, "top_k") else 0
    if top_k < -1:
        raise InvalidArgument("top_k", f"'top_k' must be -1 or 0 (off) or a positive count, got {top_k}.")
    min_tokens = request.min_tokens if _has(request, "min_tokens") else 0
    if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
        raise InvalidArgument("min_tokens", f"'min_tokens' must be between 0 and max_tokens, got {min_tokens}.")
    return Decoding(
        max_tokens=max_tokens,
        temperature=_in_range(request, "temperature", 0, 2, 1.0),
        top_p=_in_range(request, "top_p", 0, 1, 1.0, low_open=True),
        top_k=max(top_k, 0),
        min_p=_in_range(request, "min_p", 0, 1, 0.0),
        top_a=_in_range(request, "top_a", 0, 1, 0.0),
        frequency_penalty=_in_range(request, "frequency_penalty", -2, 2, 0.0),
        presence_penalty=_in_range(request, "presence_penalty", -2, 2, 0.0),
        repetition_penalty=_in_range(request, "repetition_penalty", 0, 10, 1.0, low_open=True),
        seed=request.seed if _has(request, "seed") else None,
        logit_bias=_logit_bias(request, vocab_size, limits),
        logprobs=logprobs,
        ignore_eos=request.ignore_eos if _has(request, "ignore_eos") else False,
        min_tokens=min_tokens,
        stop=_parse_stop(request, limits),
        include_usage=request.stream_options.include_usage if _has(request, "stream_options") else False,
        n=n,
    )


# ---- chat -----------------------------------------------------------------------------------------------

# Images per chat request when the model accepts images (each one costs the vision encoder and hundreds to
# thousands of prompt tokens once the engine expands its placeholder).
MAX_IMAGES_PER_REQUEST = 8
IMAGE_DETAILS = ("auto", "low", "high")
_DATA_IMAGE = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(?P<payload>.*)", re.DOTALL)


def _image_url(part_name: str, part: dict[str, Any]) -> str:
    """The URL of one `image_url` part: an http(s) URL or a `data:image/...;base64,` URI, else a 400.

    Nothing else goes through: SGLang 0.5.23's loader (srt/utils/common.py `load_image`) would also open
    `file://` URLs, bare paths ending in an image extension and raw base64, i.e. read the server's own disk.
    """
    image_url = part.get("image_url")
    if isinstance(image_url, str):  # some clients send the URL itself; OpenAI's shape is {"url", "detail"}
        image_url = {"url": image_url}
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise InvalidArgument(f"{part_name}.image_url", f"'{part_name}.image_url' must be an object like "
                                                        "{'url': 'https://...'}.")
    detail = image_url.get("detail", "auto")
    if detail not in IMAGE_DETAILS:
        raise InvalidArgument(f"{part_name}.image_url.detail", f"'{part_name}.image_url.detail' must be one of "
                                                               f"{list(IMAGE_DETAILS)}, got {detail!r}.")
    unknown = sorted(set(image_url) - {"url", "detail"})
    if unknown:
        raise InvalidArgument(f"{part_name}.image_url", f"'{part_name}.image_url' has unknown field(s) {unknown}.")
    url = image_url["url"]
    data = _DATA_IMAGE.fullmatch(url)
    if data is not None:
        try:
            ok = bool(data["payload"]) and bool(base64.b64decode(data["payload"], validate=True))
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            raise InvalidArgument(f"{part_name}.image_url.url",
                                  f"'{part_name}.image_url.url' is a data URI whose payload is not valid base64.")
        return url
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme in ("http", "https") and parsed.hostname and not any(c.isspace() for c in url):
        return url
    shown = url if len(url) <= 40 else url[:37] + "..."
    raise InvalidArgument(f"{part_name}.image_url.url",
                          f"'{part_name}.image_url.url' must be an http(s) URL or a 'data:image/<type>;base64,...' "
                          f"URI, got {shown!r}.")


def _message_text(index: int, message: chat_pb2.ChatMessage, image_input: bool,
                  images_before: int = 0) -> str | list[dict[str, Any]] | None:
    """A message's content for the chat template: its text, or (a vision model, a user message with images) Hugging
    Face multimodal parts in the client's order, `{"type": "image", "url": ...}` and `{"type": "text", "text": ...}`
    (service/prompts.py drops the url before templating, so the model's own template places its image tokens).
    `images_before` counts the images of earlier messages, for the per-request cap."""
    name = f"messages[{index}].content"
    if not _has(message, "content"):
        return None
    content = as_json(message.content, name)
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidArgument(name, f"'{name}' must be a string or an array of content parts.")
    parts: list[dict[str, Any]] = []
    images = 0
    for part_index, part in enumerate(content):
        part_name = f"{name}[{part_index}]"
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif part_type in ("image_url", "input_audio", "file"):
            kind = {"image_url": "images", "input_audio": "audio", "file": "files"}[part_type]
            if part_type != "image_url" or not image_input:
                raise UnsupportedParameter(part_name, f"'{part_name}' is {part_type}, but this model does not "
                                                      f"accept {kind}; send text only.")
            if message.role != "user":
                raise InvalidArgument(part_name, f"'{part_name}' is an image in a '{message.role}' message; only "
                                                 "'user' messages may hold images.")
            url = _image_url(part_name, part)
            images += 1
            if images_before + images > MAX_IMAGES_PER_REQUEST:
                raise InvalidArgument(part_name, f"'{part_name}' is image number {images_before + images} of this "
                                                 f"request; at most {MAX_IMAGES_PER_REQUEST} images are allowed.")
            parts.append({"type": "image", "url": url})
        else:
            raise InvalidArgument(part_name, f"'{part_name}' must be a content part like "
                                             "{'type': 'text', 'text': ...}.")
    if not images:
        return "".join(p["text"] for p in parts)
    return parts


def message_image_count(content: Any) -> int:
    """How many images a validated message content holds (0 for a string)."""
    return sum(1 for p in content if p.get("type") == "image") if isinstance(content, list) else 0


def _tool_calls(index: int, message: chat_pb2.ChatMessage) -> list[dict[str, Any]]:
    calls = []
    for call_index, call in enumerate(message.tool_calls):
        name = f"messages[{index}].tool_calls[{call_index}]"
        if not call.function.name:
            raise InvalidArgument(f"{name}.function.name", f"'{name}.function.name' is required.")
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            raise InvalidArgument(f"{name}.function.arguments",
                                  f"'{name}.function.arguments' must be a JSON object encoded as a string.") from None
        calls.append({"id": call.id, "type": "function",
                      "function": {"name": call.function.name, "arguments": arguments}})
    return calls


def _chat_messages(request: chat_pb2.ChatCompletionRequest, image_input: bool) -> list[dict[str, Any]]:
    if not request.messages:
        raise InvalidArgument("messages", "'messages' must hold at least one message.")
    messages = []
    images = 0
    for index, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{index}].role", f"'messages[{index}].role' must be one of "
                                                             f"{sorted(CHAT_ROLES)}, got '{message.role}'.")
        text = _message_text(index, message, image_input, images)
        images += message_image_count(text)
        calls = _tool_calls(index, message) if message.role == "assistant" else []
        if text is None and not calls:
            raise InvalidArgument(f"messages[{index}].content", f"'messages[{index}].content' is required.")
        # `developer` is OpenAI's newer name for `system`; chat templates only know `system`.
        rendered: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                    "content": text or ""}
        if calls:
            rendered["tool_calls"] = calls
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidArgument(f"messages[{index}].tool_call_id",
                                      f"'messages[{index}].tool_call_id' is required for role 'tool'.")
            rendered["tool_call_id"] = message.tool_call_id
        messages.append(rendered)
    return messages


def _tools(request: chat_pb2.ChatCompletionRequest) -> list[dict[str, Any]]:
    tools = []
    for index, tool in enumerate(request.tools):
        if tool.type != "function":
            raise InvalidArgument(f"tools[{index}].type", f"'tools[{index}].type' must be 'function'.")
        if not tool.function.name:
            raise InvalidArgument(f"tools[{index}].function.name", f"'tools[{index}].function.name' is required.")
        tools.append(canonical_json(tool, f"tools[{index}]"))
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise InvalidArgument("tools", "'tools' holds two functions with the same name.")
    return tools


def _tool_choice(request: chat_pb2.ChatCompletionRequest, tools: list[dict[str, Any]]) -> str | dict[str, Any]:
    if not _has(request, "tool_choice"):
        return "auto" if tools else "none"
    choice = as_json(request.tool_choice, "tool_choice")
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise InvalidArgument("tool_choice", "'tool_choice' is 'required' but 'tools' is empty.")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str) or choice.get("type") != "function":
        raise InvalidArgument("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                                             "{'type': 'function', 'function': {'name': ...}}.")
    if name not in {t["function"]["name"] for t in tools}:
        raise InvalidArgument("tool_choice", f"'tool_choice' names function '{name}', which is not in 'tools'.")
    return choice


def _response_format(request: chat_pb2.ChatCompletionRequest) -> dict[str, Any] | None:
    if not _has(request, "response_format"):
        return None
    response_format = canonical_json(request.response_format, "response_format")
    kind = response_format.get("type", "")
    if kind not in ("", "text", "json_object", "json_schema"):
        raise InvalidArgument("response_format.type", "'response_format.type' must be 'text', 'json_object' or "
                                                      f"'json_schema', got '{kind}'.")
    if kind == "json_schema" and not response_format.get("json_schema", {}).get("schema"):
        raise InvalidArgument("response_format.json_schema.schema",
                              "'response_format.json_schema.schema' is required for type 'json_schema'.")
    return response_format if kind in ("json_object", "json_schema") else None


def _check_prompt_chars(field_name: str, chars: int, limits: Limits, context_tokens: int) -> None:
    bound = limits.max_prompt_chars(context_tokens)
    if chars > bound:
        tokens = limits.prompt_token_limit(context_tokens)
        raise _over_limit(field_name, f"'{field_name}' holds {chars} characters, more than any prompt of at most "
                                      f"{tokens} tokens can hold ({bound} characters; limit max_prompt_tokens).",
                          "max_prompt_tokens", tokens)


def check_sizes(request: chat_pb2.ChatCompletionRequest | completion_pb2.CompletionRequest, limits: Limits,
                context_tokens: int) -> None:
    """The cheap size checks, before any parsing, templating or tokenising: message count and prompt characters
    (a 20 MB prompt is refused in microseconds instead of being tokenised for half a minute)."""
    if isinstance(request, chat_pb2.ChatCompletionRequest):
        if len(request.messages) > limits.max_messages:
            raise _over_limit("messages", f"'messages' holds {len(request.messages)} messages; at most "
                                          f"{limits.max_messages} are allowed (limit max_messages).",
                              "max_messages", limits.max_messages)
        # ByteSize is computed in C (upb) without decoding the strings: an upper bound of the text's characters
        _check_prompt_chars("messages", sum(m.ByteSize() for m in request.messages) + sum(
            t.ByteSize() for t in request.tools), limits, context_tokens)
    elif request.HasField("prompt"):
        _check_prompt_chars("prompt", request.prompt.ByteSize(), limits, context_tokens)


def chat_job(request: chat_pb2.ChatCompletionRequest, *, vocab_size: int, image_input: bool = False,
             limits: Limits = DEFAULT_LIMITS) -> ChatJob:
    if _has(request, "max_tokens") and _has(request, "max_completion_tokens") \
            and request.max_tokens != request.max_completion_tokens:
        raise InvalidArgument("max_completion_tokens",
                              "'max_tokens' and 'max_completion_tokens' disagree; set only one of them.")
    max_tokens = (request.max_completion_tokens if _has(request, "max_completion_tokens")
                  else request.max_tokens if _has(request, "max_tokens") else None)
    logprobs = None
    if _has(request, "top_logprobs"):
        if not request.logprobs:
            raise InvalidArgument("top_logprobs", "'top_logprobs' needs 'logprobs' set to true.")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument("top_logprobs", f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}.")
    if request.logprobs:
        logprobs = request.top_logprobs
    decoding = _decoding(request, max_tokens, logprobs, vocab_size, limits)
    _refuse_if(request.reasoning_effort != "", "reasoning_effort", "applies to reasoning models; none is served here")
    _refuse_if(request.verbosity != "", "verbosity",
               "has no effect on the served models, so it is refused rather than ignored; ask for brevity in the "
               "prompt or set max_tokens")
    _refuse_if(any(m != "text" for m in request.modalities), "modalities", "may only be ['text'] here")
    _refuse_if(_has(request, "audio"), "audio", "(audio output) is not supported")
    _refuse_if(_has(request, "prediction"), "prediction", "(predicted outputs) is not supported")
    _refuse_if(_has(request, "web_search_options"), "web_search_options", "(web search) is not supported")
    _refuse_if(len(request.functions) > 0, "functions", "(legacy function calling) is not supported; use 'tools'")
    _refuse_if(_has(request, "function_call"), "function_call", "(legacy) is not supported; use 'tool_choice'")
    if request.truncation not in ("", "disabled", "auto"):
        raise InvalidArgument("truncation", f"'truncation' must be 'auto' or 'disabled', got '{request.truncation}'.")
    tools = _tools(request)
    tool_choice = _tool_choice(request, tools)
    response_format = _response_format(request)
    if response_format and (tool_choice == "required" or isinstance(tool_choice, dict)):
        raise InvalidArgument("response_format", "'response_format' cannot be combined with a forced 'tool_choice'.")
    return ChatJob(model=request.model, messages=_chat_messages(request, image_input), decoding=decoding,
                   tools=tools, tool_choice=tool_choice,
                   parallel_tool_calls=request.parallel_tool_calls if _has(request, "parallel_tool_calls") else True,
                   response_format=response_format, truncate=request.truncation == "auto")


# ---- completions ----------------------------------------------------------------------------------------

def _prompts(request: completion_pb2.CompletionRequest, vocab_size: int) -> list[str | list[int]]:
    prompt = as_json(request.prompt, "prompt") if _has(request, "prompt") else None
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (int, float)) for p in prompt):
        prompts = [prompt]  # one prompt as token ids
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise InvalidArgument("prompt", "'prompt' must be a non-empty string, an array of strings, an array of "
                                        "token ids, or an array of token-id arrays.")
    out: list[str | list[int]] = []
    for index, item in enumerate(prompts):
        if isinstance(item, str) and item:
            out.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, (int, float)) and float(t).is_integer()
                                                     and 0 <= t < vocab_size for t in item):
            out.append([int(t) for t in item])
        else:
            raise InvalidArgument(f"prompt[{index}]", f"'prompt[{index}]' must be a non-empty string or an array "
                                                      f"of token ids below {vocab_size}.")
    return out


def completion_job(request: completion_pb2.CompletionRequest, *, vocab_size: int,
                   limits: Limits = DEFAULT_LIMITS) -> CompletionJob:
    max_tokens = request.max_tokens if _has(request, "max_tokens") else DEFAULT_COMPLETION_MAX_TOKENS
    logprobs = None
    if _has(request, "logprobs"):
        if not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument("logprobs", f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}.")
        logprobs = request.logprobs
    decoding = _decoding(request, max_tokens, logprobs, vocab_size, limits)
    echo = request.echo if _has(request, "echo") else False
    _refuse_if(echo and logprobs is not None, "logprobs", "with 'echo' (prompt logprobs) is not supported")
    _refuse_if(request.suffix != "", "suffix", "(insertion) is not supported by the served models")
    _refuse_if(_has(request, "best_of") and request.best_of != 1, "best_of", "must be 1 on this server; use 'n'")
    prompts = _prompts(request, vocab_size)
    if len(prompts) * decoding.n > limits.max_n:
        raise _over_limit("n", f"{len(prompts)} prompts x n={decoding.n} asks for more than {limits.max_n} choices "
                               f"(limit max_n).", "max_n", limits.max_n)
    return CompletionJob(model=request.model, prompts=prompts, decoding=decoding, echo=echo)
