"""A scripted Engine for unit tests of the servicer (never the default, never the only proof of a feature).

Its tokenizer maps each character to one token, and it "generates" a fixed reply one character per step,
so tests can predict text, token counts and finish reasons exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from genrpc.service.engines.base import FinishReason, GenerationDelta, GenerationRequest, ModelInfo


class CharTokenizer:
    vocab_size = 0x110000
    supports_tools = False

    def __init__(self) -> None:
        self.templated: list[list[dict]] = []  # the messages of every apply_chat_template call

    @staticmethod
    def _content(content) -> str:
        """A string, or Hugging Face multimodal parts: an image renders as `<image>` (a vision template's
        placeholder), text as itself."""
        if isinstance(content, str):
            return content
        return "".join("<image>" if p["type"] == "image" else p["text"] for p in content)

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids) -> str:
        return "".join(chr(t) for t in token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return chr(token_id).encode()

    def apply_chat_template(self, messages, tools=None) -> list[int]:
        self.templated.append(messages)
        return self.encode("".join(f"<{m['role']}>{self._content(m['content'])}" for m in messages) + "<assistant>")


class ScriptedEngine:
    def __init__(self, reply: str = "Hello world!", context_length: int = 256, step_delay_s: float = 0.0,
                 accepts_images: bool = False, queue_time_s: float | None = None):
        self.reply = reply
        self.queue_time_s = queue_time_s  # reported on each request's first delta, as a real engine measures it
        self.step_delay_s = step_delay_s
        self._info = ModelInfo(model_id="scripted", context_length_tokens=context_length,
                               accepts_images=accepts_images)
        self._tokenizer = CharTokenizer()
        self.running = 0
        self.started = False
        self.requests: list[GenerationRequest] = []
        self.closed_early: list[str] = []

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> CharTokenizer:
        return self._tokenizer

    @property
    def running_requests(self) -> int:
        return self.running

    @property
    def waiting_requests(self) -> int:
        return 0

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        self.requests.append(request)
        self.running += 1
        finished = False
        try:
            limit = request.sampling.max_tokens
            for i, char in enumerate(self.reply[:limit]):
                if self.step_delay_s:
                    await asyncio.sleep(self.step_delay_s)
                last = i + 1 == min(limit, len(self.reply))
                reason = None
                if last:
                    reason = FinishReason.STOP if len(self.reply) <= limit else FinishReason.LENGTH
                    finished = True
                yield GenerationDelta(text=char, token_ids=(ord(char),), completion_tokens=i + 1,
                                      prompt_tokens=len(request.prompt_token_ids), finish_reason=reason,
                                      queue_time_s=self.queue_time_s if i == 0 else None)
        finally:
            self.running -= 1
            if not finished:
                self.closed_early.append(request.request_id)
