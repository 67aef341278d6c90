"""Anthropic's Messages request as types: what `/v1/messages` accepts.

Fields the Messages API has and a local model cannot use (`cache_control`, `citations`,
`container`, `service_tier`, `output_config`, `context_management`, ...) and unknown fields are
accepted and ignored, as unknown `anthropic-beta` flags are: clients built for Claude (Claude Code
first) send them all the time. Nothing ignored reaches the backend: it is sent only what the
translation (`proxy.dialects.anthropic_body`) builds from the fields below.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Temperature = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
Probability = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(strict=True, ge=1)]
TopK = Annotated[int, Field(strict=True, ge=0, le=1 << 20)]
# Anthropic's rule for tool names; it also keeps them out of the way of grammars and prompts.
ToolName = Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")]
StopSequence = Annotated[StrictStr, Field(max_length=1000)]


class _Checked(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextBlock(_Checked):
    type: Literal["text"]
    text: StrictStr


class ImageSource(_Checked):
    type: StrictStr
    media_type: StrictStr | None = None
    data: StrictStr | None = None
    url: StrictStr | None = None


class ImageBlock(_Checked):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(_Checked):
    type: Literal["tool_use"]
    id: StrictStr
    name: StrictStr
    input: dict[str, Any]


class ToolResultBlock(_Checked):
    type: Literal["tool_result"]
    tool_use_id: StrictStr
    content: StrictStr | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] = ""
    is_error: StrictBool | None = None


class ThinkingBlock(_Checked):
    type: Literal["thinking"]
    thinking: StrictStr
    signature: StrictStr | None = None


class RedactedThinkingBlock(_Checked):
    type: Literal["redacted_thinking"]
    data: StrictStr | None = None


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(_Checked):
    # `system` inside `messages`: Claude Code sends one mid-conversation (Anthropic's
    # mid-conversation-system beta); it stays at its place, as a system turn.
    role: Literal["user", "assistant", "system"]
    content: StrictStr | list[Block]


class Tool(_Checked):
    name: ToolName
    description: StrictStr | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Checked):
    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None
    disable_parallel_tool_use: StrictBool | None = None


class Metadata(_Checked):
    user_id: StrictStr | None = None


class Thinking(_Checked):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = None


class MessagesRequest(_Checked):
    model: StrictStr
    max_tokens: MaxTokens
    messages: Annotated[list[Message], Field(min_length=1)]
    system: StrictStr | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: Annotated[list[StopSequence], Field(max_length=16)] | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    metadata: Metadata | None = None
    stream: StrictBool | None = None
    thinking: Thinking | None = None


class CountTokensRequest(_Checked):
    """What `count_tokens` takes: the request, less what only generation needs."""

    model: StrictStr
    messages: Annotated[list[Message], Field(min_length=1)]
    system: StrictStr | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
