"""Chat prompts: messages (+ tools) → token ids through the model's own chat template, and `truncation: auto`.

A template that cannot render tools (SmolLM2's plain ChatML, for one) gets them the way Qwen2.5's template
renders them: a `# Tools` system section, assistant calls as `<tool_call>` blocks, and tool results as
`<tool_response>` blocks in a user turn. So every model sees tools in the format the service parses back.

Images (vision models only, see service/validation.py `_message_text`): a user message's content is then a list
of Hugging Face multimodal parts, `{"type": "image", "url": ...}` / `{"type": "text", "text": ...}`. The template
gets `{"type": "image"}` (no url) and writes the model's own image placeholder for it (Qwen2-VL/2.5-VL:
`<|vision_start|><|image_pad|><|vision_end|>`); `message_images` lists the urls in the same order, which is the
order the engine must receive them in.
"""

from __future__ import annotations

import json
from typing import Any

from genrpc.service.engines.base import Tokenizer
from genrpc.service.tool_calls import CLOSE_TAG, OPEN_TAG

_TOOLS_SECTION = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{signatures}
</tools>

For each function call, return a json object with function name and arguments within {open}{close} XML tags:
{open}
{{"name": <function-name>, "arguments": <args-json-object>}}
{close}"""


def _inline_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    section = _TOOLS_SECTION.format(signatures="\n".join(json.dumps(t, ensure_ascii=False) for t in tools),
                                    open=OPEN_TAG, close=CLOSE_TAG) if tools else ""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            blocks = [f"{OPEN_TAG}\n{json.dumps(c['function'], ensure_ascii=False)}\n{CLOSE_TAG}"
                      for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [message["content"], *blocks]))})
        elif message["role"] == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + response  # consecutive results share one user turn, as in Qwen2.5
            else:
                out.append({"role": "user", "content": response, "_tool_responses": True})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    if section:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in out]


def message_images(messages: list[dict[str, Any]]) -> tuple[str, ...]:
    """The image urls of a conversation, in the order the chat template places their placeholders."""
    return tuple(part["url"] for m in messages if isinstance(m.get("content"), list)
                 for part in m["content"] if part.get("type") == "image")


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Multimodal parts as chat templates expect them: `{"type": "image"}` without the (maybe huge) url."""
    if not any(isinstance(m.get("content"), list) for m in messages):
        return messages
    return [{**m, "content": [{"type": "image"} if p.get("type") == "image" else p for p in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[int]:
    messages = _template_messages(messages)
    needs_inlining = any(m["role"] == "tool" or m.get("tool_calls") for m in messages) or tools
    if needs_inlining and not tokenizer.supports_tools:
        return tokenizer.apply_chat_template(_inline_tools(messages, tools))
    return tokenizer.apply_chat_template(messages, tools=tools or None)


def fit_messages_to_budget(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                           budget_tokens: int) -> tuple[list[int], list[dict[str, Any]], int]:
    """Drops the oldest non-system messages until the prompt fits `budget_tokens` (the last message always
    stays). Returns the prompt ids, the messages kept (their images are the request's images) and how many
    messages were dropped; the prompt may still be too long.

    Image tokens are counted as the template's placeholders only: the engine expands each image later, so with
    images the budget is approximate (the engine refuses a prompt that ends up over its context)."""
    kept = list(messages)
    dropped = 0
    ids = render_chat(tokenizer, kept, tools)
    while len(ids) > budget_tokens:
        droppable = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
        if not droppable:
            break
        del kept[droppable[0]]
        dropped += 1
        # A tool result whose call was dropped means nothing on its own.
        while len(kept) > 1 and kept[droppable[0]]["role"] == "tool" and droppable[0] < len(kept) - 1:
            del kept[droppable[0]]
            dropped += 1
        ids = render_chat(tokenizer, kept, tools)
    return ids, kept, dropped
