"""JSON-RPC `create_message`: one turn of a tool loop whose tools the client runs.

The server keeps no state: the client sends the conversation (`history`) back with each call, plus
the new user `message` or the `tool_results` of the calls the model asked for, and gets the
updated conversation back. `iteration_count` is the number of model turns since the last user
message, this one included; so a client can never loop forever, the server asks the model for a
final answer without tools (`tool_choice: "none"`) and returns `final_text`
- when this turn reaches `max_iterations` (5 unless asked, at most LLAMA_PROXY_MAX_TOOL_ITERATIONS),
- or when the model asks for a call it already has a result for since the last user message (the
  same tool with the same arguments): that call is dropped and the model asked again, at once,
  within the same JSON-RPC call;
- or when it asks for a call whose arguments are not a JSON object (the client could not run it).
`loop_guard` in the result says which rule, if any, ended the loop.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.dialects.collect import ChatAnswer
from proxy.dialects.conversation import (
    CreateMessage,
    Message,
    ToolCall,
    ToolResult,
    answer_length,
    chat_body,
)
from proxy.errors import InvalidRequest
from proxy.pipeline.endpoint import Context
from proxy.tools import Tool
from proxy.upstream.forward import UpstreamCall

log = logging.getLogger(__name__)

DEFAULT_ITERATIONS = 5


@dataclass(frozen=True)
class Turn:
    """One create_message call, checked: the conversation so far and how the model is asked."""

    conversation: list[Message]  # the history, then the new tool results and user message
    iteration: int  # this model turn's number since the last user message
    limit: int  # max_iterations in force
    tools: tuple[Tool, ...]
    tool_choice: str  # auto, required, none, or a tool's name
    max_tokens: int
    temperature: float | None
    model: str | None
    strict: bool = False  # the client asked for max_new_tokens itself, within its cap

    @property
    def last(self) -> bool:
        """This turn reaches max_iterations: the model answers without tools."""
        return self.iteration >= self.limit

    def request(self, final: bool) -> UpstreamCall:
        body = chat_body(
            self.conversation,
            self.tools,
            tool_choice="none" if final else self.tool_choice,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            model=self.model,
        )
        return UpstreamCall("POST", "/v1/chat/completions", body)


def begin(
    params: CreateMessage,
    *,
    declared: Sequence[Tool],
    max_tokens: int,
    iteration_cap: int,
    default_model: str | None,
) -> Turn:
    """The turn `params` ask for, or `InvalidRequest` naming the parameter that is wrong."""
    if params.message is None and not params.tool_results:
        raise InvalidRequest("'message' is required unless 'tool_results' are given.", "message")
    conversation = list(params.history)
    conversation += _results(conversation, params.tool_results or [])
    if params.message is not None:
        conversation.append(Message(role="user", content=params.message))
    tools = tuple(declared if params.tools is None else params.tools)
    choice = params.tool_choice or "auto"
    if choice not in ("auto", "none") and not tools:
        raise InvalidRequest(f"'tool_choice' is {choice!r} but there are no tools.", "tool_choice")
    if choice not in ("auto", "required", "none") and choice not in {t.name for t in tools}:
        known = ", ".join(tool.name for tool in tools)
        raise InvalidRequest(f"'tool_choice' names no tool; the tools are: {known}.", "tool_choice")
    since = _since_user(conversation)
    return Turn(
        conversation=conversation,
        iteration=1 + sum(1 for m in since if m.role == "assistant"),
        limit=min(params.max_iterations or DEFAULT_ITERATIONS, iteration_cap),
        tools=tools,
        tool_choice=choice if tools else "none",
        max_tokens=answer_length(params.max_new_tokens, max_tokens),
        temperature=params.temperature,
        model=params.model or default_model,
        strict=params.max_new_tokens is not None and params.max_new_tokens <= max_tokens,
    )


def _since_user(conversation: Sequence[Message]) -> Sequence[Message]:
    users = [i for i, message in enumerate(conversation) if message.role == "user"]
    return conversation[users[-1] + 1 :] if users else conversation


def _results(conversation: Sequence[Message], results: Sequence[ToolResult]) -> list[Message]:
    """The results as tool messages, each answering a call of the history still without one."""
    since = _since_user(conversation)
    calls = {call.id: call for m in since for call in m.tool_calls or ()}
    answered = {m.tool_call_id for m in since if m.role == "tool"}
    messages = []
    for index, result in enumerate(results):
        param = f"tool_results.{index}.tool_call_id"
        call = calls.get(result.tool_call_id)
        if call is None:
            raise InvalidRequest(
                f"'{param}' ({result.tool_call_id!r}) names no tool call in the history since "
                "the last user message; send the history this server returned with the call.",
                param,
            )
        if result.tool_call_id in answered:
            raise InvalidRequest(f"'{param}': that call already has a result.", param)
        answered.add(result.tool_call_id)
        messages.append(
            Message(role="tool", tool_call_id=call.id, name=call.name, content=result.content)
        )
    return messages


@dataclass(frozen=True)
class Reading:
    """What the model answered: text, the calls it asked for, and why it stopped."""

    text: str
    calls: list[ToolCall]
    finish_reason: str | None
    usage: dict[str, Any]
    unusable: bool  # a call whose arguments are no JSON object
    model: str | None


def read(document: dict[str, Any]) -> Reading:
    choices = document.get("choices") or [{}]
    choice: dict[str, Any] = choices[0] if isinstance(choices[0], dict) else {}
    message: dict[str, Any] = choice.get("message") or {}
    calls, unusable = [], False
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict) or not function.get("name"):
            unusable = True
            continue
        call_id = call.get("id") or f"call_{secrets.token_hex(12)}"
        calls.append(ToolCall(id=call_id, name=function["name"], arguments=arguments))
    usage = document.get("usage")
    text = message.get("content")
    return Reading(
        text if isinstance(text, str) else "",
        calls,
        choice.get("finish_reason"),
        usage if isinstance(usage, dict) else {},
        unusable,
        document.get("model") if isinstance(document.get("model"), str) else None,
    )


def repeated(conversation: Sequence[Message], calls: Sequence[ToolCall]) -> bool:
    """Whether one of `calls` was made, and has its result, since the last user message."""
    since = _since_user(conversation)
    answered = {m.tool_call_id for m in since if m.role == "tool"}
    done = {_same(call) for m in since for call in m.tool_calls or () if call.id in answered}
    return any(_same(call) in done for call in calls)


def _same(call: ToolCall) -> tuple[str, str]:
    return call.name, json.dumps(call.arguments, sort_keys=True)


async def create_message(context: Context, turn: Turn) -> dict[str, Any]:
    """Ask the model (twice when a loop guard stops a call) and return the JSON-RPC result."""
    guard = "max_iterations" if turn.last else None
    readings = [await _ask(context, turn.request(final=turn.last))]
    reading = readings[0]
    calls_allowed = not turn.last and turn.tool_choice != "none"
    if reading.calls and calls_allowed and guard is None:
        if reading.unusable:
            guard = "unusable_tool_call"
        elif repeated(turn.conversation, reading.calls):
            guard = "repeated_tool_call"
    elif reading.unusable and calls_allowed:
        guard = "unusable_tool_call"
    if guard in ("repeated_tool_call", "unusable_tool_call"):
        left = context.answer_left()
        if left is not None and left < 1:
            # The call's answer tokens (its cap covers every model turn) are spent: it ends.
            reading = Reading("", [], "length", {}, False, reading.model)
        else:
            log.info("request %s: %s; asking for a final answer", context.request_id, guard)
            reading = await _ask(context, turn.request(final=True))
            readings.append(reading)
    calling = bool(reading.calls) and calls_allowed and guard is None
    asked = _fresh_ids(turn.conversation, reading.calls) if calling else []
    answer = Message(
        role="assistant",
        content=reading.text or (None if calling else ""),
        tool_calls=asked or None,
    )
    history = [*turn.conversation, answer]
    return {
        "type": "tool_calls" if calling else "final_text",
        "content": reading.text,
        "tool_calls": [call.model_dump() for call in asked],
        "history": [message.model_dump(exclude_none=True) for message in history],
        "iteration_count": turn.iteration,
        "finish_reason": reading.finish_reason,
        "loop_guard": guard,
        "model": turn.model or reading.model,
        "usage": _total(reading.usage for reading in readings),
    }


def _fresh_ids(conversation: Sequence[Message], calls: Sequence[ToolCall]) -> list[ToolCall]:
    """`calls`, each with an id no other call of the conversation has (results name them)."""
    used = {call.id for message in conversation for call in message.tool_calls or ()}
    fresh = []
    for call in calls:
        if call.id in used:
            call = call.model_copy(update={"id": f"call_{secrets.token_hex(12)}"})
        used.add(call.id)
        fresh.append(call)
    return fresh


async def _ask(context: Context, call: UpstreamCall) -> Reading:
    answer = ChatAnswer()
    await context.send(call, answer)
    return read(answer.document)


def _total(usages: Any) -> dict[str, Any]:
    """The usage of every answer of the call, added up, in OpenAI's shape."""
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    cached = 0
    for usage in usages:
        for key in total:
            value = usage.get(key)
            total[key] += value if type(value) is int else 0
        details = usage.get("prompt_tokens_details")
        reused = details.get("cached_tokens") if isinstance(details, dict) else None
        cached += reused if type(reused) is int else 0
    return {**total, "prompt_tokens_details": {"cached_tokens": cached}}
