"""GenerationService: OpenAI-shaped protobuf in, Engine calls, OpenAI-shaped protobuf out.

The servicer is typed to the Engine protocol only. It validates, renders prompts, enforces the context
window, builds constraints and runs the choices (service.choices). Its methods only return or yield messages
and raise; service.interceptor maps every failure (service.errors), counts and logs each RPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from genrpc.v1 import chat_pb2, completion_pb2, generation_service_pb2_grpc, model_pb2
from genrpc.service import responses, validation
from genrpc.service.admission import within_capacity
from genrpc.service.client_limits import TokensPerMinute, current_client
from genrpc.service.choices import ChoiceEvent, ChoiceSpec, run_choices
from genrpc.service.constraints import Constraint, forced_tool_call_grammar, response_format_constraint
from genrpc.service.engines.base import Engine, SamplingParams, TokenLogprob
from genrpc.service.errors import ContextLengthExceeded, InvalidArgument, ModelNotFound, NotReady, Overloaded
from genrpc.service.memory import HeapTrimmer
from genrpc.service.metrics import ServiceMetrics, current_request
from genrpc.service.prompts import fit_messages_to_budget, message_images, render_chat
from genrpc.service.responses import NULL, string_value
from genrpc.service.responses_api import ResponsesMixin
from genrpc.service.response_store import ResponseStore
from genrpc.telemetry import Tracing

# With `truncation: auto` and no max_tokens, keep at least this much room for the answer.
TRUNCATION_MIN_COMPLETION_TOKENS = 256


@dataclass
class _ChoiceProgress:
    """What a choice has produced so far (unary responses and per-choice stream bookkeeping)."""

    text: list[str] = field(default_factory=list)
    tool_calls: list = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    started: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class _Prepared:
    """A validated request, rendered: what to run and what the response needs to know."""

    model: str
    specs: list[ChoiceSpec]
    prompt_tokens: int  # counted once per distinct prompt
    decoding: validation.Decoding
    echo_texts: dict[int, str] = field(default_factory=dict)  # choice index -> prompt text (completions echo)
    dropped_messages: int = 0


class GenerationServicer(ResponsesMixin, generation_service_pb2_grpc.GenerationServiceServicer):
    """`capacity` (batch slots + queue) bounds the choices admitted at once: a request beyond it is refused with
    RESOURCE_EXHAUSTED before any parsing or templating (0 = no admission control, the engine's queue decides)."""

    def __init__(self, engine: Engine, metrics: ServiceMetrics, *, default_max_tokens: int = 0,
                 limits: validation.Limits = validation.DEFAULT_LIMITS, capacity: int = 0,
                 stream_interval: int = 0, response_store: ResponseStore | None = None,
                 tokens_per_minute: TokensPerMinute | None = None, tracing: Tracing | None = None):
        self._tracing = tracing or Tracing()  # the interceptor's: its RPC span is current while a request runs
        self._response_store = response_store  # the Responses API's store (service/responses_api.py)
        self._engine = engine
        self._tokens_per_minute = tokens_per_minute  # per-client tpm limits: charged here, checked by the interceptor
        self._stream_interval = stream_interval  # server default; a request's stream_interval overrides it
        self._metrics = metrics
        self._default_max_tokens = default_max_tokens
        self._limits = limits
        self._capacity = capacity
        self._admitted = 0  # choices admitted and not finished (running, queued, or being prepared)
        self._heap = HeapTrimmer(metrics.count_heap_trim)
        self._ready = False
        self._created = int(time.time())

    @property
    def admitted(self) -> int:
        return self._admitted

    # ---- admission -------------------------------------------------------------------------------------

    def _cost(self, request) -> int:
        """Engine requests this RPC will hold (n per prompt), read from the raw message without validating it."""
        has_n = "n" in request.DESCRIPTOR.fields_by_name and request.HasField("n")  # Responses have no n
        n = min(max(request.n, 1), self._limits.max_n) if has_n else 1
        prompts = 1
        if isinstance(request, completion_pb2.CompletionRequest) and request.prompt.HasField("list_value"):
            items = request.prompt.list_value.values
            if items and items[0].HasField("list_value") or items and items[0].HasField("string_value"):
                prompts = len(items)
        return max(1, min(n * prompts, self._capacity))

    @contextlib.contextmanager
    def _admission(self, request):
        """Holds the request's share of capacity for the whole RPC; refuses it at once when the server is full.
        Runs first in every generating RPC: the O(1) decision comes before validation, templating, tokenising."""
        if not self._capacity:
            yield
            return
        cost = self._cost(request)
        if self._admitted + cost > self._capacity:
            raise Overloaded(
                f"The server is at capacity ({self._engine.running_requests} running, "
                f"{self._engine.waiting_requests} queued; limit max_batch_size + max_queue = {self._capacity}). "
                f"Retry after a second.",
                metadata={"limit": "max_queue", "limit_value": str(self._capacity)}, retry_delay_s=1.0)
        self._admitted += cost
        self._heap.admitted(self._admitted)
        try:
            yield
        finally:
            self._admitted -= cost
            if not self._admitted:
                self._heap.idle()

    def mark_ready(self) -> None:
        self._ready = True

    # ---- preparation -----------------------------------------------------------------------------------

    def _check_ready(self) -> None:
        if not self._ready:
            raise NotReady("The model is still loading; retry when the health check reports SERVING.")

    def _check_model(self, model: str) -> None:
        self._check_ready()
        if model != self._engine.model_info.model_id:
            raise ModelNotFound(model)

    def _check_prompt_tokens(self, field_name: str, prompt_tokens: int) -> None:
        limit = self._limits.max_prompt_tokens
        if limit and prompt_tokens > limit:
            raise InvalidArgument(field_name, f"The prompt has {prompt_tokens} tokens; at most {limit} are allowed "
                                              f"(limit max_prompt_tokens).", reason="LIMIT_EXCEEDED",
                                  metadata={"limit": "max_prompt_tokens", "limit_value": str(limit),
                                            "prompt_tokens": str(prompt_tokens)})

    def _max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        context = self._engine.model_info.context_length_tokens
        if requested is None:
            available = context - prompt_tokens
            if available < 1:
                raise ContextLengthExceeded(
                    "messages", f"This model's maximum context length is {context} tokens, but the prompt has "
                                f"{prompt_tokens} tokens, leaving no room for a completion.",
                    metadata={"prompt_tokens": str(prompt_tokens), "context_length_tokens": str(context)})
            ceiling = min(x for x in (self._default_max_tokens, self._limits.max_tokens_limit, available) if x > 0)
            return ceiling
        if prompt_tokens + requested > context:
            raise ContextLengthExceeded(
                "max_tokens", f"This model's maximum context length is {context} tokens. However, you requested "
                              f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} "
                              f"for the completion). Please reduce the prompt or max_tokens, or send "
                              f"'truncation': 'auto'.",
                metadata={"prompt_tokens": str(prompt_tokens), "max_tokens": str(requested),
                          "context_length_tokens": str(context)})
        return requested

    @staticmethod
    def _sampling(decoding: validation.Decoding, max_tokens: int, choice: int, constraint: Constraint) -> SamplingParams:
        # n > 1 with a seed: choice i uses seed + i, so choices differ but the whole response is reproducible.
        seed = None if decoding.seed is None else decoding.seed + choice
        return SamplingParams(
            max_tokens=max_tokens, temperature=decoding.temperature, top_p=decoding.top_p, seed=seed,
            top_k=decoding.top_k, min_p=decoding.min_p, top_a=decoding.top_a,
            frequency_penalty=decoding.frequency_penalty, presence_penalty=decoding.presence_penalty,
            repetition_penalty=decoding.repetition_penalty, logit_bias=decoding.logit_bias,
            logprobs=decoding.logprobs, ignore_eos=decoding.ignore_eos, min_tokens=decoding.min_tokens,
            json_schema=constraint.json_schema, ebnf=constraint.ebnf)

    def _render_chat(self, job: validation.ChatJob) -> tuple[list[int], int, tuple[str, ...]]:
        """Prompt ids, messages dropped by `truncation: auto`, and the images of the messages kept (in the
        order of their placeholders in the prompt)."""
        tools = job.tools if job.tool_choice != "none" else []
        tokenizer = self._engine.tokenizer
        if not job.truncate:
            return render_chat(tokenizer, job.messages, tools), 0, message_images(job.messages)
        context = self._engine.model_info.context_length_tokens
        reserve = job.decoding.max_tokens or min(TRUNCATION_MIN_COMPLETION_TOKENS, context // 4)
        ids, kept, dropped = fit_messages_to_budget(tokenizer, job.messages, tools, context - reserve)
        return ids, dropped, message_images(kept)

    async def _prepare_chat(self, request: chat_pb2.ChatCompletionRequest) -> _Prepared:
        self._check_ready()  # model_info (accepts_images) and the tokenizer exist once the engine started
        validation.check_sizes(request, self._limits, self._engine.model_info.context_length_tokens)
        job = validation.chat_job(request, vocab_size=self._engine.tokenizer.vocab_size,
                                  image_input=self._engine.model_info.accepts_images, limits=self._limits)
        self._check_model(job.model)
        # Prompt tokens count each image as its template placeholder; the engine expands it (and reports the
        # real prompt_tokens) and refuses a prompt that ends up over its context.
        ids, dropped, images = await asyncio.to_thread(self._render_chat, job)
        self._check_prompt_tokens("messages", len(ids))
        max_tokens = self._max_tokens(len(ids), job.decoding.max_tokens)
        if job.tool_choice == "required" or isinstance(job.tool_choice, dict):
            forced = job.tools if job.tool_choice == "required" else [
                t for t in job.tools if t["function"]["name"] == job.tool_choice["function"]["name"]]
            grammar = await asyncio.to_thread(forced_tool_call_grammar, forced, parallel=job.parallel_tool_calls)
            constraint = Constraint(ebnf=grammar)
        else:
            constraint = response_format_constraint(job.response_format)
        parse_tools = bool(job.tools) and job.tool_choice != "none"
        specs = [ChoiceSpec(i, ids, self._sampling(job.decoding, max_tokens, i, constraint), job.decoding.stop,
                            parse_tools, images) for i in range(job.decoding.n)]
        return _Prepared(job.model, specs, len(ids), job.decoding, dropped_messages=dropped)

    async def _prepare_completion(self, request: completion_pb2.CompletionRequest) -> _Prepared:
        self._check_ready()
        validation.check_sizes(request, self._limits, self._engine.model_info.context_length_tokens)
        job = validation.completion_job(request, vocab_size=self._engine.tokenizer.vocab_size, limits=self._limits)
        self._check_model(job.model)
        tokenizer = self._engine.tokenizer
        specs, echo_texts, prompt_tokens = [], {}, 0
        for prompt_index, prompt in enumerate(job.prompts):
            ids = await asyncio.to_thread(tokenizer.encode, prompt) if isinstance(prompt, str) else prompt
            self._check_prompt_tokens(f"prompt[{prompt_index}]", len(ids))
            max_tokens = self._max_tokens(len(ids), job.decoding.max_tokens)
            prompt_tokens += len(ids)
            for j in range(job.decoding.n):
                index = prompt_index * job.decoding.n + j  # OpenAI's order: choices grouped by prompt
                specs.append(ChoiceSpec(index, ids, self._sampling(job.decoding, max_tokens, index, Constraint()),
                                        job.decoding.stop))
                if job.echo:
                    echo_texts[index] = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
        return _Prepared(job.model, specs, prompt_tokens, job.decoding, echo_texts=echo_texts)

    # ---- running the choices ----------------------------------------------------------------------------

    def _request_stream_interval(self, request) -> int:
        """The request's `stream_interval` extension, or the server's default when absent or 0 (a negative one is
        refused by validation)."""
        return request.stream_interval if request.stream_interval > 0 else self._stream_interval

    async def _events(self, prepared: _Prepared, stream_interval: int = 0) -> AsyncIterator[tuple[ChoiceEvent, bool]]:
        """The merged choice events (coalesced, see service.choices), each with whether it is the very last
        finish of the request. Fills in the RPC's RequestRecord (tokens, TTFT, queue time) and observes
        inter-token latency as outputs stream (a coalesced event's interval is shared by its tokens)."""
        record = current_request.get()
        client = current_client.get()  # read now: an in-process caller may close the stream from another task
        if record is not None:
            record.model = prepared.model
            record.prompt_tokens = prepared.prompt_tokens
            record.max_tokens = prepared.decoding.max_tokens
            record.generation_started = time.perf_counter()
        itl = self._metrics.inter_token_latency.labels(self._metrics.model_name)
        last_output: dict[int, tuple[float, int]] = {}  # choice -> (time, completion tokens) of its last output
        unfinished = len(prepared.specs)
        has_images = any(spec.images for spec in prepared.specs)
        # The RPC's span (current OpenTelemetry context) for an engine with tracing of its own; nothing when off.
        trace_context = self._tracing.current_trace_context() if self._tracing.enabled else None
        try:
            async with contextlib.aclosing(run_choices(self._engine, prepared.specs, stream_interval,
                                                       trace_context)) as events:
                async for event in events:
                    now = time.perf_counter()
                    if record is not None:
                        if event.queue_time_s is not None and record.queue_time_s is None:
                            record.queue_time_s = event.queue_time_s
                        if record.ttft_s is None and (event.text or event.tool_calls):
                            record.ttft_s = now - record.started
                    if event.text or event.tool_calls or event.finish_reason:
                        previous = last_output.get(event.index)
                        if previous is not None and event.completion_tokens > previous[1]:
                            itl.observe((now - previous[0]) / (event.completion_tokens - previous[1]))
                        last_output[event.index] = (now, event.completion_tokens)
                        if record is not None:  # so far, also for a stream cancelled before it finished
                            record.completion_tokens = sum(tokens for _, tokens in last_output.values())
                    if event.finish_reason:
                        unfinished -= 1
                        if has_images:  # the engine counted the expanded images; the service only placeholders
                            prepared.prompt_tokens = max(prepared.prompt_tokens, event.prompt_tokens)
                        if record is not None:
                            record.prompt_tokens = prepared.prompt_tokens
                            record.cached_prompt_tokens = max(record.cached_prompt_tokens, event.cached_tokens)
                            record.finish_reasons.append(event.finish_reason)
                    yield event, unfinished == 0
        finally:  # a cancelled request is charged its prompt and the tokens it produced too
            if self._tokens_per_minute:
                self._tokens_per_minute.charge(client, prepared.prompt_tokens
                                               + sum(tokens for _, tokens in last_output.values()))

    def _fingerprint(self) -> str:
        return self._engine.model_info.fingerprint or f"genrpc-{self._engine.model_info.model_id}"

    def _usage(self, prepared: _Prepared, states: dict[int, _ChoiceProgress], cached_tokens: int = 0):
        return responses.usage(prepared.prompt_tokens, sum(s.completion_tokens for s in states.values()),
                               cached_tokens)

    # ---- Chat ------------------------------------------------------------------------------------------

    def _chat_logprobs(self, prepared: _Prepared, items: list[TokenLogprob]):
        if prepared.decoding.logprobs is None:
            return NULL
        return responses.chat_logprobs(self._engine.tokenizer, items)

    @within_capacity
    async def Chat(self, request: chat_pb2.ChatCompletionRequest, context):
        if request.HasField("stream") and not request.stream:
            raise InvalidArgument("stream", "'stream' is false; call CreateChatCompletion for a whole response.")
        stream_interval = self._request_stream_interval(request)
        prepared = await self._prepare_chat(request)
        base = dict(id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion.chunk", created=int(time.time()),
                    model=prepared.model, system_fingerprint=self._fingerprint())
        states = {spec.index: _ChoiceProgress() for spec in prepared.specs}
        dropped = prepared.dropped_messages or None

        def chunk(index: int, delta: chat_pb2.ChatCompletionDelta, finish: str | None = None, logprobs=NULL, **extra):
            return chat_pb2.ChatCompletionChunk(**base, **extra, choices=[chat_pb2.ChatCompletionChunkChoice(
                index=index, delta=delta, logprobs=logprobs,
                finish_reason=string_value(finish) if finish else NULL)])

        async for event, last in self._events(prepared, stream_interval):
            state = states[event.index]
            state.pending_logprobs.extend(event.logprobs)
            if not state.started:  # sent once the engine produced output, so early errors stay clean statuses
                state.started = True
                yield chunk(event.index, chat_pb2.ChatCompletionDelta(role="assistant", content=""),
                            dropped_messages=dropped)
                dropped = None
            if event.text:
                yield chunk(event.index, chat_pb2.ChatCompletionDelta(content=event.text),
                            logprobs=self._chat_logprobs(prepared, state.pending_logprobs))
                state.pending_logprobs = []
            for call in event.tool_calls:
                for call_delta in responses.tool_call_deltas(call):
                    yield chunk(event.index, chat_pb2.ChatCompletionDelta(tool_calls=[call_delta]))
            if event.finish_reason:
                state.completion_tokens = event.completion_tokens
                logprobs = (self._chat_logprobs(prepared, state.pending_logprobs) if state.pending_logprobs
                            else NULL)
                # Over gRPC the request's last chunk carries usage; the bridge moves it to the usage chunk.
                extra = {"usage": self._usage(prepared, states, event.cached_tokens)} if last else {}
                yield chunk(event.index, chat_pb2.ChatCompletionDelta(), event.finish_reason, logprobs, **extra)
                if last and prepared.decoding.include_usage:
                    yield chat_pb2.ChatCompletionChunk(**base, usage=self._usage(prepared, states, event.cached_tokens))

    async def _collect(self, prepared: _Prepared) -> tuple[dict[int, _ChoiceProgress], int]:
        states = {spec.index: _ChoiceProgress() for spec in prepared.specs}
        cached = 0
        async for event, _ in self._events(prepared):
            state = states[event.index]
            state.text.append(event.text)
            state.tool_calls.extend(event.tool_calls)
            state.logprobs.extend(event.logprobs)
            if event.finish_reason:
                state.finish_reason = event.finish_reason
                state.completion_tokens = event.completion_tokens
                cached = max(cached, event.cached_tokens)
        return states, cached

    @within_capacity
    async def CreateChatCompletion(self, request: chat_pb2.ChatCompletionRequest, context):
        if request.stream:
            raise InvalidArgument("stream", "'stream' is true; call the streaming Chat RPC instead.")
        prepared = await self._prepare_chat(request)
        created = int(time.time())
        states, cached = await self._collect(prepared)
        choices = []
        for index, state in sorted(states.items()):
            text = "".join(state.text)
            message = chat_pb2.ChatCompletionMessage(
                role="assistant", refusal=NULL, tool_calls=[responses.tool_call(c) for c in state.tool_calls],
                content=NULL if state.tool_calls and not text else string_value(text))
            choices.append(chat_pb2.ChatCompletionChoice(index=index, message=message, finish_reason=state.finish_reason,
                                                         logprobs=self._chat_logprobs(prepared, state.logprobs)))
        return chat_pb2.ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion", created=created, model=prepared.model,
            system_fingerprint=self._fingerprint(), usage=self._usage(prepared, states, cached), choices=choices,
            dropped_messages=prepared.dropped_messages or None)

    # ---- Generate --------------------------------------------------------------------------------------

    def _completion_logprobs(self, prepared: _Prepared, items: list[TokenLogprob], offset: int):
        if prepared.decoding.logprobs is None:
            return NULL
        return responses.completion_logprobs(self._engine.tokenizer, items, offset)

    @within_capacity
    async def Generate(self, request: completion_pb2.CompletionRequest, context):
        if request.HasField("stream") and not request.stream:
            raise InvalidArgument("stream", "'stream' is false; call CreateCompletion for a whole response.")
        stream_interval = self._request_stream_interval(request)
        prepared = await self._prepare_completion(request)
        base = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()),
                    model=prepared.model, system_fingerprint=self._fingerprint())
        states = {spec.index: _ChoiceProgress() for spec in prepared.specs}
        offsets = dict.fromkeys(states, 0)
        async for event, last in self._events(prepared, stream_interval):
            state = states[event.index]
            text = event.text
            if not state.started:
                state.started = True
                text = prepared.echo_texts.get(event.index, "") + text
            logprobs = self._completion_logprobs(prepared, list(event.logprobs), offsets[event.index])
            offsets[event.index] += len(text)
            if event.finish_reason:
                state.completion_tokens = event.completion_tokens
            usage = self._usage(prepared, states, event.cached_tokens) if last else None
            yield completion_pb2.Completion(**base, usage=usage, choices=[completion_pb2.CompletionChoice(
                index=event.index, text=text, logprobs=logprobs,
                finish_reason=string_value(event.finish_reason) if event.finish_reason else NULL)])
            if last and prepared.decoding.include_usage:
                yield completion_pb2.Completion(**base, usage=usage)

    @within_capacity
    async def CreateCompletion(self, request: completion_pb2.CompletionRequest, context):
        if request.stream:
            raise InvalidArgument("stream", "'stream' is true; call the streaming Generate RPC instead.")
        prepared = await self._prepare_completion(request)
        created = int(time.time())
        states, cached = await self._collect(prepared)
        choices = []
        for index, state in sorted(states.items()):
            echo = prepared.echo_texts.get(index, "")
            choices.append(completion_pb2.CompletionChoice(
                index=index, text=echo + "".join(state.text), finish_reason=string_value(state.finish_reason),
                logprobs=self._completion_logprobs(prepared, state.logprobs, len(echo))))
        return completion_pb2.Completion(
            id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=created, model=prepared.model,
            system_fingerprint=self._fingerprint(), usage=self._usage(prepared, states, cached), choices=choices)

    # ---- models ----------------------------------------------------------------------------------------

    def _model(self) -> model_pb2.Model:
        info = self._engine.model_info
        return model_pb2.Model(id=info.model_id, object="model", created=self._created, owned_by=info.owned_by,
                               context_length_tokens=info.context_length_tokens)

    async def ListModels(self, request, context):
        self._check_ready()
        return model_pb2.ListModelsResponse(object="list", data=[self._model()])

    async def GetModel(self, request, context):
        self._check_model(request.model)
        return self._model()
