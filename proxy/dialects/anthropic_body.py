"""Anthropic Messages requests translated into the OpenAI chat requests the backend serves.

- `system` (a string or text blocks) becomes the first message; a `system` turn inside
  `messages` (Claude Code sends them) stays a system message at its place;
- a user turn's `tool_result` blocks become OpenAI `tool` messages (answering the assistant's
  calls, which they follow), its text a user message; an error result says so in its text;
- an assistant turn's `tool_use` blocks become `tool_calls` (the input as JSON arguments); earlier
  `thinking` blocks are left out, as chat templates leave out earlier reasoning;
- `tools`, `tool_choice` (`any` is OpenAI's `required`), `stop_sequences`, `temperature`,
  `top_p`, `top_k` map one to one; `max_tokens` is capped like everywhere;
- images are refused with a 400: the models llama-gate serves read text only.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.dialects.anthropic_types import (
    CountTokensRequest,
    ImageBlock,
    Message,
    MessagesRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from proxy.dialects.openai_body import PROGRESS_OPTION
from proxy.errors import InvalidRequest


def chat_body(request: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    """The OpenAI chat body for the backend, without the generation-only fields."""
    messages: list[dict[str, Any]] = []
    if request.system:
        system = request.system
        text = system if isinstance(system, str) else "\n\n".join(b.text for b in system)
        messages.append({"role": "system", "content": text})
    for number, message in enumerate(request.messages):
        messages.extend(_translated(number, message))
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description or "",
                    "parameters": tool.input_schema,
                },
            }
            for tool in request.tools
        ]
    choice = request.tool_choice
    if choice is not None and (request.tools or choice.type == "none"):
        body["tool_choice"] = _tool_choice(choice.type, choice.name)
    return body


def generation_body(request: MessagesRequest, max_tokens: int) -> dict[str, Any]:
    """The whole backend request for `messages.create`: always a stream, with usage."""
    body = chat_body(request)
    body["max_tokens"] = min(request.max_tokens, max_tokens)
    if request.stop_sequences:
        body["stop"] = request.stop_sequences
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.metadata is not None and request.metadata.user_id is not None:
        body["user"] = request.metadata.user_id
    body["stream"] = True
    body["stream_options"] = {"include_usage": True, PROGRESS_OPTION: True}
    return body


def _tool_choice(kind: str, name: str | None) -> Any:
    if kind == "tool":
        if not name:
            raise InvalidRequest("tool_choice of type 'tool' needs a 'name'.", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    return {"auto": "auto", "any": "required", "none": "none"}[kind]


def _translated(number: int, message: Message) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "system":
        return [{"role": "system", "content": _system_text(number, message.content)}]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for index, block in enumerate(message.content):
        where = f"messages.{number}.content.{index}"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ImageBlock):
            raise InvalidRequest(
                "The models here read text only and cannot see images; send the request "
                "without image blocks.",
                where,
            )
        elif isinstance(block, ToolUseBlock):
            arguments = json.dumps(block.input, ensure_ascii=False)
            call = {"name": block.name, "arguments": arguments}
            calls.append({"id": block.id, "type": "function", "function": call})
        elif isinstance(block, ToolResultBlock):
            results.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": _result_text(block, where)})  # fmt: skip
        # thinking and redacted_thinking: earlier reasoning is not shown to the model again
    if message.role == "assistant":
        content = "".join(texts) or None
        turn: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            turn["tool_calls"] = calls
        return [turn]
    user = [{"role": "user", "content": "\n\n".join(texts)}] if texts else []
    return results + user


def _system_text(number: int, blocks: list[Any]) -> str:
    """A system turn's text: its text blocks (it may hold nothing else)."""
    texts = []
    for index, block in enumerate(blocks):
        if not isinstance(block, TextBlock):
            raise InvalidRequest(
                "A system message may hold text blocks only.", f"messages.{number}.content.{index}"
            )
        texts.append(block.text)
    return "\n\n".join(texts)


def _result_text(block: ToolResultBlock, where: str) -> str:
    if isinstance(block.content, str):
        text = block.content
    else:
        if any(isinstance(part, ImageBlock) for part in block.content):
            raise InvalidRequest("The models here cannot see images in tool results.", where)
        text = "\n\n".join(part.text for part in block.content if isinstance(part, TextBlock))
    return f"Error: {text}" if block.is_error else text
