"""The Engine protocol: what the gRPC servicer needs from a model runtime, in domain types.

Engines know nothing of protobuf, OpenAI JSON or SSE. The servicer renders prompts to token ids with the
engine's tokenizer, hands the engine a GenerationRequest, and consumes GenerationDelta objects. Closing the
async iterator (``aclose()``, or cancelling the task that iterates it) must abort the request and free its
batch slot within one decode step.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

_T = TypeVar("_T")


# ---- errors ---------------------------------------------------------------------------------------------
# Every engine raises these (never gRPC codes, HTTP statuses or its runtime's own exceptions);
# genrpc.service.errors maps them to gRPC statuses with isinstance, in one table.


class EngineError(Exception):
    """Base of every error an engine raises. `message` is safe to show to clients."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineOverloaded(EngineError):
    """No capacity now (the engine's queue is full); the client should retry later."""


class EngineUnavailable(EngineError):
    """The engine is not started, is shutting down, or its runtime went away; retrying elsewhere may work."""


class EngineBadRequest(EngineError):
    """The request cannot be served as asked; `field` names the OpenAI field to blame."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class EngineUnsupported(EngineBadRequest):
    """The engine has no equivalent for a field the service accepts (the client gets a 400 naming it)."""


class EngineInternalError(EngineError):
    """The runtime failed in a way that is not the client's fault."""


def started(value: _T | None, engine: str) -> _T:
    """`value` (an engine's model info or tokenizer), which exists once `start()` has run."""
    if value is None:
        raise EngineUnavailable(f"the {engine} engine has not started")
    return value


class FinishReason(str, enum.Enum):
    """Why an engine stopped generating for a request (the service adds its own, e.g. stop strings)."""

    STOP = "stop"  # end-of-sequence token (or, in the service, a stop string)
    LENGTH = "length"  # max_tokens reached, or the context window is full


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters, already validated by the service."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed + same input + same params -> same output
    stop_token_ids: tuple[int, ...] = ()  # extra EOS-like ids (the engine always honours its model's EOS)
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens below min_p * p(top token); 0 = off
    top_a: float = 0.0  # drop tokens below top_a * p(top token)**2; 0 = off
    frequency_penalty: float = 0.0  # OpenAI semantics: subtract penalty * count(token in output)
    presence_penalty: float = 0.0  # OpenAI semantics: subtract penalty if token in output
    repetition_penalty: float = 1.0  # HF/CTRL semantics over prompt + output; 1 = off
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> bias added to logits
    logprobs: int | None = None  # None = off; k >= 0 = report the sampled token and the k most likely
    ignore_eos: bool = False  # keep generating past EOS (until max_tokens)
    min_tokens: int = 0  # EOS is masked until this many tokens were generated
    json_schema: str | None = None  # constrain the output to this JSON Schema (a JSON string)
    ebnf: str | None = None  # constrain the output to this grammar (xgrammar/GBNF-style EBNF)


@dataclass(frozen=True)
class TokenLogprob:
    """Log probability of one generated token and, if asked, of the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: prompt token ids in, tokens out."""

    request_id: str  # uuid4 hex; unique among live requests
    prompt_token_ids: Sequence[int]
    sampling: SamplingParams
    # Images for a vision model (only sent when ModelInfo.accepts_images): http(s) URLs or
    # `data:image/...;base64,` URIs, one per image placeholder the model's chat template put into
    # prompt_token_ids, in the same order. The engine's multimodal processor expands each placeholder to the
    # image's real token count, so the prompt the model sees is longer than prompt_token_ids.
    images: tuple[str, ...] = ()
    # W3C trace context headers (`traceparent`, optionally `tracestate`) naming the service's span for this
    # request, set only when the service traces (empty otherwise). An engine whose runtime has tracing of its own
    # (SGLang) passes them on so the runtime's spans join the client's trace; the others ignore them.
    trace_context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationDelta:
    """What one decode step added to one request.

    ``text`` is the newly decodable text (incremental detokenisation: bytes of a multi-byte character wait
    until the character is complete). The final delta has ``finish_reason`` set and may carry text too.
    """

    text: str
    # The new tokens' ids. The llama.cpp engine reports llama.cpp's ids when the request asks for logprobs or
    # stop_token_ids, and otherwise recovers them from the text, so a token without text (an end-of-generation
    # token) is then counted in completion_tokens but has no id here.
    token_ids: tuple[int, ...]
    completion_tokens: int  # cumulative count of generated tokens
    prompt_tokens: int
    finish_reason: FinishReason | None = None
    cached_prompt_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in token_ids, when SamplingParams.logprobs is set
    # On the first delta only: seconds the request waited for a batch slot before its prefill started
    # (None = the engine does not measure it). Feeds genrpc_request_queue_time_seconds and the queue span.
    queue_time_s: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the service reports about the served model."""

    model_id: str
    context_length_tokens: int
    owned_by: str = "genrpc"
    # Used in `system_fingerprint` so clients can tell engine configurations apart.
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Whether `GenerationRequest.images` is honoured (a vision model on an engine that passes images on).
    # When False the service refuses `image_url` content parts with a 400.
    accepts_images: bool = False


@runtime_checkable
class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the service uses for templating, counting and logprobs."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model can produce (logit_bias keys and token prompts must be below it)."""
        ...

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders `tools` and tool messages itself."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (for logprobs' `token`/`bytes`)."""
        ...

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Renders a conversation (Hugging Face message dicts) with the generation prompt."""
        ...


@runtime_checkable
class Engine(Protocol):
    """A model runtime. One instance serves many concurrent requests."""

    @property
    def model_info(self) -> ModelInfo: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def running_requests(self) -> int:
        """Requests holding a batch slot right now (queued ones excluded)."""
        ...

    @property
    def waiting_requests(self) -> int:
        """Requests accepted but waiting for a batch slot."""
        ...

    async def start(self) -> None:
        """Loads the model and warms it up; the service reports SERVING only after this returns."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Streams deltas until one carries a finish_reason. Closing the iterator aborts the request."""
        ...

    async def shutdown(self) -> None:
        """Aborts everything still running and releases the model."""
        ...


@runtime_checkable
class ReportsCapacity(Protocol):
    """Optional beside `Engine`: an engine with a fixed number of batch slots reports it (slot utilisation is
    running_requests / max_running_requests)."""

    @property
    def max_running_requests(self) -> int: ...


@runtime_checkable
class ExportsMetrics(Protocol):
    """Optional beside `Engine`: an engine whose runtime keeps Prometheus metrics of its own (e.g. SGLang's
    scheduler) exposes them here, and the server registers them next to genrpc's on one /metrics."""

    def prometheus_collectors(self) -> Sequence[Any]:
        """prometheus_client collectors (objects with `collect()`), registered once before start()."""
        ...
