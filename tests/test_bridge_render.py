"""The bridge's template renderer prints exactly what the generic mapping (Envoy's: `MessageToDict` with proto
field names, compact JSON, non-ASCII unescaped) prints, over many varied chunks."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2
from hypothesis import given, settings, strategies as st

from genrpc.bridge.openai_api import ChunkRenderer, chunk_to_dict, frame
from genrpc.v1 import chat_pb2, common_pb2, completion_pb2

# valid UTF-8 (protobuf strings cannot hold lone surrogates): quotes, backslashes, controls, non-ASCII, U+2028
text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
common_text = st.sampled_from(["", "a", "Hello", ' "quoted" \\ ', "naïve café ✓ 日本", "\n\t\x00\x1f\x7f\u2028",
                               "😀", "</script>"])
any_text = st.one_of(text, common_text)
int32 = st.integers(-2**31, 2**31 - 1)
number = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-2**53, 2**53),
                   st.sampled_from([1e-05, -1.2e-05, 1e16, -0.0, 0.5]))


@st.composite
def values(draw: Any, *, deep: bool = True) -> struct_pb2.Value:
    kind = draw(st.sampled_from(["unset", "null", "string", "number", "bool"] + (["struct", "list"] if deep
                                                                                  else [])))
    v = struct_pb2.Value()
    if kind == "null":
        v.null_value = struct_pb2.NULL_VALUE
    elif kind == "string":
        v.string_value = draw(any_text)
    elif kind == "number":
        v.number_value = draw(number)
    elif kind == "bool":
        v.bool_value = draw(st.booleans())
    elif kind == "struct":
        for key in draw(st.lists(any_text, max_size=3)):
            v.struct_value.fields[key].CopyFrom(draw(values(deep=False)))
    elif kind == "list":
        for item in draw(st.lists(values(deep=False), max_size=3)):
            v.list_value.values.add().CopyFrom(item)
    return v


def maybe(strategy: Any) -> Any:
    return st.one_of(st.none(), strategy)


def usual_value() -> Any:  # what the service sends: null or a string (finish reasons)
    return st.one_of(st.just(struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
                     st.sampled_from(["stop", "length", "tool_calls"]).map(
                         lambda s: struct_pb2.Value(string_value=s)))


@st.composite
def usages(draw: Any) -> common_pb2.Usage:
    u = common_pb2.Usage(prompt_tokens=draw(maybe(int32)), completion_tokens=draw(maybe(int32)),
                         total_tokens=draw(maybe(int32)))
    if draw(st.booleans()):
        u.prompt_tokens_details.cached_tokens = draw(int32)
    return u


@st.composite
def chat_choices(draw: Any) -> chat_pb2.ChatCompletionChunkChoice:
    c = chat_pb2.ChatCompletionChunkChoice(index=draw(maybe(int32)))
    if draw(st.integers(0, 4)):
        d = c.delta
        if draw(st.booleans()):
            d.role = draw(st.one_of(st.just("assistant"), any_text))
        if draw(st.integers(0, 3)):
            d.content = draw(any_text)
        if draw(st.integers(0, 5)) == 0:
            d.tool_calls.add(index=draw(maybe(int32)), id=draw(maybe(any_text)), type=draw(maybe(any_text)),
                             function=chat_pb2.FunctionCallDelta(name=draw(maybe(any_text)),
                                                                 arguments=draw(maybe(any_text))))
    for name in ("finish_reason", "logprobs"):
        v = draw(maybe(st.one_of(usual_value(), values())))
        if v is not None:
            getattr(c, name).CopyFrom(v)
    return c


@st.composite
def completion_choices(draw: Any) -> completion_pb2.CompletionChoice:
    c = completion_pb2.CompletionChoice(index=draw(maybe(int32)), text=draw(maybe(any_text)))
    for name in ("finish_reason", "logprobs"):
        v = draw(maybe(st.one_of(usual_value(), values())))
        if v is not None:
            getattr(c, name).CopyFrom(v)
    return c


def one_or_more(strategy: Any) -> Any:
    """Mostly one choice (what the template covers), sometimes none (the usage chunk) or several."""
    return st.one_of(st.lists(strategy, min_size=1, max_size=1), st.lists(strategy, max_size=3))


def header(draw: Any) -> dict[str, Any]:
    return dict(id=draw(st.one_of(st.just("chatcmpl-0123abcd"), any_text)),
                object=draw(st.one_of(st.just("chat.completion.chunk"), any_text)),
                created=draw(st.one_of(st.just(1700000000), st.integers(0, 2**32 - 1))),
                model=draw(st.one_of(st.just("m"), any_text)),
                system_fingerprint=draw(maybe(st.one_of(st.just("fp_1"), any_text))))


@st.composite
def chat_chunks(draw: Any) -> chat_pb2.ChatCompletionChunk:
    chunk = chat_pb2.ChatCompletionChunk(**header(draw), dropped_messages=draw(maybe(int32)),
                                         choices=draw(one_or_more(chat_choices())))
    if draw(st.booleans()):
        chunk.usage.CopyFrom(draw(usages()))
    return chunk


@st.composite
def completion_chunks(draw: Any) -> completion_pb2.Completion:
    chunk = completion_pb2.Completion(**header(draw), choices=draw(one_or_more(completion_choices())))
    if draw(st.booleans()):
        chunk.usage.CopyFrom(draw(usages()))
    return chunk


def generic(chunk: Any, include_usage: bool, state: dict[str, bool]) -> bytes:
    """What the bridge printed before the template renderer (MessageToDict + json.dumps for every chunk)."""
    d = chunk_to_dict(chunk)
    if not d["choices"]:
        if not include_usage or state.get("usage_sent"):
            return b""
        state["usage_sent"] = True
    return frame(d)


def check_stream(chat: bool, chunks: list[Any], include_usage: bool) -> int:
    """Feeds one renderer a stream; returns how many chunks took the template path."""
    renderer, state, fast = ChunkRenderer(chat, include_usage), {}, 0
    for chunk in chunks:
        fast += renderer.fast(chunk) is not None
        assert renderer.feed(chunk) == generic(chunk, include_usage, state), chunk
    return fast


@settings(max_examples=200, deadline=None)
@given(st.lists(chat_chunks(), min_size=1, max_size=6), st.booleans())
def test_chat_template_matches_generic_mapping(chunks, include_usage):
    check_stream(True, chunks, include_usage)


@settings(max_examples=200, deadline=None)
@given(st.lists(completion_chunks(), min_size=1, max_size=6), st.booleans())
def test_completion_template_matches_generic_mapping(chunks, include_usage):
    check_stream(False, chunks, include_usage)


NULL = struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)


@given(st.lists(any_text, min_size=1, max_size=20))
def test_service_shaped_streams_take_the_template_path(pieces):
    """The chunks the service sends for plain text (role chunk, text deltas, finish chunk with usage) are all
    rendered from the template; only the usage chunk uses the generic mapping."""
    base = dict(id="chatcmpl-1", object="chat.completion.chunk", created=1700000000, model="m",
                system_fingerprint="fp")
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=len(pieces), total_tokens=3 + len(pieces))

    def chunk(delta: chat_pb2.ChatCompletionDelta, finish: struct_pb2.Value = NULL, **kw: Any):
        return chat_pb2.ChatCompletionChunk(**base, **kw, choices=[chat_pb2.ChatCompletionChunkChoice(
            index=0, delta=delta, logprobs=NULL, finish_reason=finish)])

    stream = [chunk(chat_pb2.ChatCompletionDelta(role="assistant", content=""))]
    stream += [chunk(chat_pb2.ChatCompletionDelta(content=p)) for p in pieces]
    stream += [chunk(chat_pb2.ChatCompletionDelta(), struct_pb2.Value(string_value="stop"), usage=usage),
               chat_pb2.ChatCompletionChunk(**base, usage=usage)]
    assert check_stream(True, stream, include_usage=True) == len(stream) - 1

    cbase = dict(base, object="text_completion")
    cstream = [completion_pb2.Completion(**cbase, choices=[completion_pb2.CompletionChoice(
        index=0, text=p, logprobs=NULL, finish_reason=NULL)]) for p in pieces]
    cstream.append(completion_pb2.Completion(**cbase, usage=usage, choices=[completion_pb2.CompletionChoice(
        index=0, text="", logprobs=NULL, finish_reason=struct_pb2.Value(string_value="length"))]))
    assert check_stream(False, cstream, include_usage=False) == len(cstream)


def test_frame_bytes():
    """One literal frame, so a change in the shared mapping itself shows too."""
    c = chat_pb2.ChatCompletionChunk(id="x", object="chat.completion.chunk", created=1, model="m",
                                     system_fingerprint="fp", choices=[chat_pb2.ChatCompletionChunkChoice(
                                         index=0, delta=chat_pb2.ChatCompletionDelta(content='é"\n'),
                                         finish_reason=NULL, logprobs=NULL)])
    expected = ('data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
                '"delta":{"content":"é\\"\\n"},"finish_reason":null,"logprobs":null}],"system_fingerprint":"fp"}'
                '\n\n').encode()
    assert ChunkRenderer(True, False).fast(c) == expected
