"""Responses requests translated into the OpenAI chat requests the backend serves.

The Responses request becomes an OpenAI chat request, which is then checked and normalized
exactly as a chat request is (`proxy.dialects.openai_body.chat`: the same caps, ranges, tool and
schema checks, the same backend body):
- `instructions` become the first system message; `developer` and `system` items are system
  messages at their place;
- `input` is one user message (a string) or items: `message` items with `input_text` /
  `output_text` / `refusal` parts, `function_call` items (an assistant's tool calls, merged into
  the assistant turn they follow), `function_call_output` items (tool messages); `reasoning`
  items are accepted and not shown to the model again, as chat templates leave out earlier
  reasoning; images, files and item types with nothing behind them here are refused naming them;
- `tools` of type `function` become chat tools; `tool_choice`, `parallel_tool_calls`,
  `max_output_tokens` (capped like `max_tokens`), `temperature`, `top_p`, `user` map one to one;
  `text.format` becomes `response_format`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from proxy.dialects.openai_body import field_path
from proxy.dialects.responses_types import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputTokensRequest,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    TextPart,
)
from proxy.errors import InvalidRequest

TEXT_PARTS = {"input_text", "output_text", "text"}
MEDIA_PARTS = {"input_image", "input_file", "input_audio"}
M = TypeVar("M", bound=BaseModel)


def chat_payload(
    request: ResponsesRequest | InputTokensRequest, history: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The OpenAI chat request for `request`, after the messages of `history` (an earlier
    response's conversation, for `previous_response_id`)."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    messages.extend(history or ())
    if request.input == []:
        raise InvalidRequest("'input' holds no items; send at least one message.", "input")
    messages.extend(input_messages(request.input))
    payload: dict[str, Any] = {"messages": messages}
    if request.model is not None:
        payload["model"] = request.model
    if request.tools:
        payload["tools"] = [_tool(index, tool) for index, tool in enumerate(request.tools)]
    choice = request.tool_choice
    if choice is not None:
        payload["tool_choice"] = (
            choice
            if isinstance(choice, str)
            else {"type": "function", "function": {"name": choice.name}}
        )
    text_format = request.text.format if request.text is not None else None
    if text_format is not None and text_format.type != "text":
        payload["response_format"] = _response_format(text_format)
    if isinstance(request, ResponsesRequest):
        for ours, theirs in (
            ("max_output_tokens", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("user", "user"),
            ("parallel_tool_calls", "parallel_tool_calls"),
        ):
            value = getattr(request, ours)
            if value is not None:
                payload[theirs] = value
        payload["stream"] = bool(request.stream)
    return payload


def input_messages(given: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """`input` as chat messages."""
    if given is None:
        return []
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    messages: list[dict[str, Any]] = []
    for number, item in enumerate(given):
        where = f"input.{number}"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            message = _checked(MessageItem, item, where)
            role = "system" if message.role == "developer" else message.role
            messages.append({"role": role, "content": _text(message.content, f"{where}.content")})
        elif kind == "function_call":
            call = _checked(FunctionCallItem, item, where)
            piece = {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(piece)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [piece]})
        elif kind == "function_call_output":
            output = _checked(FunctionCallOutputItem, item, where)
            text = _text(output.output, f"{where}.output", tool_output=True)
            messages.append({"role": "tool", "tool_call_id": output.call_id, "content": text})
        elif kind == "reasoning":
            _checked(ReasoningItem, item, where)
        else:
            raise InvalidRequest(
                f"Input items of type {kind!r} are not served here; send messages, "
                "function_call and function_call_output items.",
                f"{where}.type",
            )
    return messages


def _checked(kind: type[M], item: Any, where: str) -> M:
    try:
        return kind.model_validate(item)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join([where, *field_path(error["loc"])])
        if error["type"] == "missing":
            raise InvalidRequest(f"'{field}' is required.", field) from None
        raise InvalidRequest(f"Invalid '{field}': {error['msg']}.", field) from None


def _text(content: str | list[TextPart], where: str, tool_output: bool = False) -> str:
    """The parts' text, one part after another. A tool's output may hold an image (Codex's
    view_image): it is replaced by a note, since a conversation holding one is sent again and
    again, and a refusal would end it."""
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        if part.type in TEXT_PARTS:
            if part.text is None:
                field = f"{where}.{index}.text"
                raise InvalidRequest(f"'{field}' is required.", field)
            texts.append(part.text)
        elif part.type == "refusal":
            texts.append(part.refusal or "")
        elif part.type in MEDIA_PARTS and tool_output:
            texts.append(f"[{part.type[len('input_') :]} left out: the model here reads text only]")
        elif part.type in MEDIA_PARTS:
            raise InvalidRequest(
                "The models here read text only; send the request without image, file or "
                "audio parts.",
                f"{where}.{index}",
            )
        else:
            raise InvalidRequest(
                f"Content parts of type {part.type!r} are not served here; send input_text.",
                f"{where}.{index}.type",
            )
    return "\n\n".join(texts)


def _tool(index: int, tool: Any) -> dict[str, Any]:
    if tool.type != "function":
        raise InvalidRequest(
            f"Tools of type {tool.type!r} are not served here (there is nothing to run them); "
            "send tools of type 'function' and run them yourself.",
            f"tools.{index}.type",
        )
    if tool.name is None:
        raise InvalidRequest("A function tool needs a 'name'.", f"tools.{index}.name")
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    return {"type": "function", "function": function}


def _response_format(text_format: Any) -> dict[str, Any]:
    if text_format.type == "json_object":
        return {"type": "json_object"}
    if text_format.schema_ is None:
        raise InvalidRequest(
            "'text.format.schema' is required for type json_schema.", "text.format.schema"
        )
    schema = {"name": text_format.name or "answer", "schema": text_format.schema_}
    if text_format.strict is not None:
        schema["strict"] = text_format.strict
    return {"type": "json_schema", "json_schema": schema}
