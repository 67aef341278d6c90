"""Conversations as the local-server APIs speak them (JSON-RPC, /stream, /restore_cache), checked
and turned into the OpenAI chat request the backend is sent.

Their messages are OpenAI's chat messages made simpler for clients that run tools: a tool call is
`{"id", "name", "arguments"}` with `arguments` a JSON object (not a string), and a tool's result
is a `tool` message naming the call's id. Tools are `{"name", "description", "parameters"}`, or
OpenAI's `{"type": "function", "function": {...}}`. The backend always gets OpenAI's forms, as a
stream with usage (like every chat request the proxy sends; see `proxy.dialects.openai_body`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    field_validator,
    model_validator,
)

from proxy.dialects.openai_body import PROGRESS_OPTION
from proxy.dialects.openai_types import Temperature
from proxy.tools import Tool, ToolName

Positive = Annotated[int, Field(strict=True, ge=1)]


class Checked(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ToolCall(Checked):
    id: StrictStr
    name: StrictStr
    arguments: dict[str, Any]


class Message(Checked):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it asked for
    tool_call_id: StrictStr | None = None  # tool: the call this is the result of
    name: StrictStr | None = None  # tool: the tool's name (informative)

    @model_validator(mode="after")
    def _roles(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def openai(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.tool_calls:
            message["content"] = self.content or None
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
                }
                for call in self.tool_calls
            ]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        return message


class ToolResult(Checked):
    tool_call_id: StrictStr = Field(validation_alias=AliasChoices("tool_call_id", "id"))
    content: Any  # text, or any JSON value (sent to the model as JSON text)

    @field_validator("content")
    @classmethod
    def _as_text(cls, value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class Conversation(Checked):
    """What /stream and create_message share."""

    message: StrictStr | None = None  # the user's new message
    history: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None  # None: the deployment's (LLAMA_PROXY_TOOLS_FILE)
    max_new_tokens: Positive | None = None
    temperature: Temperature | None = None
    model: StrictStr | None = None


class CreateMessage(Conversation):
    tool_results: list[ToolResult] | None = None
    max_iterations: Positive | None = None
    tool_choice: Literal["auto", "required", "none"] | ToolName | None = None


class StreamRequest(Conversation):
    tool_results: Any = None  # accepted, not processed here


class WarmUp(Checked):
    """POST /restore_cache."""

    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[Tool] | None = None
    model: StrictStr | None = None


def chat_body(
    messages: Sequence[Message],
    tools: Sequence[Tool],
    *,
    tool_choice: str = "auto",
    max_tokens: int,
    temperature: float | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """The backend's chat request: always a stream with usage, as the proxy reads every answer."""
    body: dict[str, Any] = {
        "messages": [message.openai() for message in messages],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True, PROGRESS_OPTION: True},
    }
    if model is not None:
        body["model"] = model
    if temperature is not None:
        body["temperature"] = temperature
    if tools:
        body["tools"] = [tool.openai() for tool in tools]
        body["tool_choice"] = (
            tool_choice
            if tool_choice in ("auto", "required", "none")
            else {"type": "function", "function": {"name": tool_choice}}
        )
    return body


def answer_length(asked: int | None, cap: int) -> int:
    """The tokens an answer may have: what was asked, within the caller's cap."""
    return min(asked, cap) if asked is not None else cap
