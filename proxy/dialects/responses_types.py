"""OpenAI's Responses request as types: what `POST /v1/responses` accepts.

What a local model can serve is checked here (a wrong type or range is a 400 naming the field);
what it cannot use but clients send anyway (`include`, `truncation`, `service_tier`,
`prompt_cache_key`, `safety_identifier`, `reasoning.summary`, ...) and unknown fields are
accepted and ignored. Tools other than `function` (web search, file search, computer use, ...)
are refused naming the tool: there is nothing here to run them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

Temperature = Annotated[float, Field(strict=True, ge=0, le=2, allow_inf_nan=False)]
Probability = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(strict=True, ge=1)]
FunctionName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Checked(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextPart(_Checked):
    """`input_text` (what a user or system says), `output_text` (what the model said before),
    `refusal`; images and files are refused by the translation, naming the part."""

    type: StrictStr
    text: StrictStr | None = None
    refusal: StrictStr | None = None


class MessageItem(_Checked):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[TextPart]


class FunctionCallItem(_Checked):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr


class FunctionCallOutputItem(_Checked):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | list[TextPart]


class ReasoningItem(_Checked):
    """Earlier reasoning passed back: accepted, and not shown to the model again (as chat
    templates leave out earlier reasoning)."""

    type: Literal["reasoning"]


class Tool(_Checked):
    type: StrictStr
    name: FunctionName | None = None
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedChoice(_Checked):
    type: Literal["function"]
    name: StrictStr


class Format(_Checked):
    type: Literal["text", "json_schema", "json_object"]
    name: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = None


class Text(_Checked):
    format: Format | None = None


class Reasoning(_Checked):
    effort: StrictStr | None = None  # accepted: a local model reasons as it was trained to


class ResponsesRequest(_Checked):
    model: StrictStr | None = None
    input: StrictStr | list[dict[str, Any]]  # each item checked by its type (responses_body)
    instructions: StrictStr | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    text: Text | None = None
    reasoning: Reasoning | None = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
    stream: StrictBool | None = None
    store: StrictBool | None = None
    previous_response_id: StrictStr | None = None


class InputTokensRequest(_Checked):
    """What `POST /v1/responses/input_tokens` takes: the request, less what generation needs."""

    model: StrictStr | None = None
    input: StrictStr | list[dict[str, Any]] | None = None
    instructions: StrictStr | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    text: Text | None = None
    previous_response_id: StrictStr | None = None
