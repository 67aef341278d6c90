"""OpenAI's `tools` and `tool_choice` made real for any chat template, by grammar.

llama_cpp's template-based chat handlers (the default: the template stored in the GGUF) ignore
`tool_choice: "auto"` and `"required"`, and its `chatml-function-calling` format answers `auto`
with empty text and `required` with a 500 on a small model. So a streamed chat request with tools
is rewritten here before llama_cpp's own handler sees it:

- the tools are described in the system prompt, with one way to call them (Hermes' form, which
  many small models were trained on): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- earlier calls and tool results in the conversation are written in that same form, so any
  template can render them (many cannot render a `tool` role or an assistant without content);
- generation is constrained by a grammar (llama.cpp's GBNF) built from the tools' JSON schemas
  and applied by `backend.grammar.GrammarFilter` (several times cheaper than llama_cpp's own):
  `required` or a named tool allows exactly one well-formed call to one of the tools (or that one)
  with arguments that match its schema; `auto` (OpenAI's default) allows either that call or a
  text answer, told apart by the first character (`<` begins a call, a text answer may not);
  `none` allows text only. The tools stay in the prompt whatever the choice, so the prompt (and
  the prompt cache) is the same for every turn of a conversation.

The text the model writes is turned back into OpenAI's stream (`ToolStream`): a text answer
streams as content; a call is held until it is complete and sent as one `tool_calls` delta with
finish_reason `tool_calls`. A call cut short (by max_tokens) is never sent half-written: the
answer ends with finish_reason `length` and no call.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from llama_cpp import Llama, LogitsProcessorList
from llama_cpp.llama_grammar import SchemaConverter

from backend.grammar import GrammarFilter
from backend.usage import Chunk, with_usage

logger = logging.getLogger(__name__)

# Chat formats that implement tools themselves: their requests are left to them.
OWN_TOOL_FORMATS = frozenset({"chatml-function-calling", "functionary", "functionary-v1",
                              "functionary-v2"})  # fmt: skip
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# Bounds on a call's free parts where the schema sets none, so that a model repeating itself
# inside an argument still closes its call (256 characters are at most ~256 tokens; the proxy
# allows 1024 by default).
STRING_CAP = 256
ARRAY_CAP = 32
# llama.cpp refuses a grammar whose optional repetitions nest much deeper than this (between
# 1000 and 1500 for a string's characters or an array's items, measured), and would say so only
# as generation starts, after the answer began: larger bounds are lowered to it, and a minimum
# above it is refused at once.
REPEAT_MAX = 1000
MAX_TOOLS = 128  # as OpenAI's API allows
MAX_SCHEMA_DEPTH = 64  # a tool's parameters nest no deeper (rendering them recurses)
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
# The keywords by which a schema says what it allows (to the grammar converter); and the types
# of any JSON value, for a schema that says none of them.
_SAYS_WHAT = frozenset(
    {"type", "$ref", "oneOf", "anyOf", "allOf", "const", "enum", "properties",
     "additionalProperties", "items", "prefixItems", "pattern", "format"}
)  # fmt: skip
ANY_VALUE = ("string", "number", "boolean", "object", "array", "null")
# A text answer: anything that does not begin a call.
_TEXT_RULE = "[^<] .*"


class ToolRequestError(ValueError):
    """The request's tools or tool_choice cannot be served; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request with tools is served: its rewritten body, and what may come back."""

    mode: str  # "none", "auto" or "required" (a named tool is "required" of one tool)
    body: dict[str, Any]  # for llama_cpp's own chat handler: no tools, plain messages
    grammar: str | None  # None when the client constrains the answer itself (tool_choice none)

    def llama_call(self, usage: bool) -> Callable[..., Iterator[Chunk]]:
        """The streaming `Llama` call that serves the plan, ending in usage when `usage`;
        called as `call(llama, on_prompt=..., **kwargs)` (see `backend.usage.with_usage`)."""

        def chat(llama: Llama, **kwargs: Any) -> Iterator[Chunk]:
            if self.grammar is not None:
                constrain = GrammarFilter(llama, self.grammar, lazy=self.mode != "required")
                kwargs["logits_processor"] = LogitsProcessorList(
                    [*(kwargs.get("logits_processor") or ()), constrain]
                )
            chunks = cast(Iterator[Chunk], Llama.create_chat_completion(llama, **kwargs))
            return ToolStream(self.mode).convert(chunks)

        if usage:
            return with_usage(chat, "chat.completion.chunk")

        def without_usage(
            llama: Llama, *, on_prompt: Any = None, on_evaluated: Any = None, **kwargs: Any
        ) -> Iterator[Chunk]:
            return chat(llama, **kwargs)

        return without_usage


def plan(data: Mapping[str, Any], chat_format: str | None) -> ToolPlan | None:
    """The plan for a chat request body, or None when it has nothing of tools (or its format
    has tool support of its own); `ToolRequestError` when its tools cannot be served."""
    if chat_format in OWN_TOOL_FORMATS:
        return None
    tools = data.get("tools")
    messages = data.get("messages") or []
    kept = {k: v for k, v in data.items() if k not in {"tools", "tool_choice",
                                                        "parallel_tool_calls"}}  # fmt: skip
    if not tools:
        if not any(_about_tools(message) for message in messages):
            return None
        # Calls and results in the history, no tools now: written so the template can take them.
        return ToolPlan("none", {**kept, "messages": render_messages(messages, [])}, None)
    functions = _functions(tools)
    mode, chosen = _choice(data.get("tool_choice"), functions)
    constrained = data.get("response_format") is not None or data.get("grammar") is not None
    if constrained and mode != "none":
        raise ToolRequestError(
            "tools cannot be combined with response_format or grammar unless tool_choice is "
            "'none'; send one or the other.",
            "tools",
        )
    kept["messages"] = render_messages(messages, functions)
    rules = None if constrained else grammar(functions if chosen is None else [chosen], mode)
    return ToolPlan(mode, kept, rules)


def _about_tools(message: Any) -> bool:
    return isinstance(message, dict) and bool(
        message.get("tool_calls") or message.get("role") in ("tool", "function")
    )


def _functions(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise ToolRequestError("'tools' must be a list of function tools.", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolRequestError(
            f"'tools' holds {len(tools)} tools; at most {MAX_TOOLS} are allowed.", "tools"
        )
    functions: list[dict[str, Any]] = []
    names: set[str] = set()
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise ToolRequestError(
                f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ...}}}}.",
                f"tools[{index}]",
            )
        if name in names:
            raise ToolRequestError(f"Two tools are named {name!r}.", f"tools[{index}]")
        names.add(name)
        parameters = function.get("parameters")  # type: ignore[union-attr]
        param = f"tools[{index}].function.parameters"
        if parameters is not None and not isinstance(parameters, dict):
            raise ToolRequestError(f"'{param}' must be a JSON schema object.", param)
        if _depth(parameters) > MAX_SCHEMA_DEPTH:
            raise ToolRequestError(
                f"'{param}' is nested deeper than {MAX_SCHEMA_DEPTH} levels; flatten it.", param
            )
        # OpenAI: no parameters means a function that takes none.
        none: dict[str, Any] = {"type": "object", "properties": {}}
        functions.append({**function, "parameters": parameters or none})  # type: ignore[dict-item]
    return functions


def _depth(value: Any) -> int:
    """How deep lists and objects nest in `value`, counted without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        children = item.values() if isinstance(item, dict) else item
        if not isinstance(item, dict | list):
            continue
        for child in children:
            if isinstance(child, dict | list):
                deepest = max(deepest, level)
                if level > MAX_SCHEMA_DEPTH:
                    return level
                pending.append((child, level + 1))
    return deepest


def _choice(choice: Any, functions: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any] | None]:
    if choice is None or choice == "auto":
        return "auto", None
    if choice in ("none", "required"):
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    chosen = next((f for f in functions if f["name"] == name), None)
    if chosen is None:
        raise ToolRequestError(
            f"tool_choice names {name!r}, which is not one of the tools: "
            + ", ".join(f["name"] for f in functions),
            "tool_choice",
        )
    return "required", chosen


def grammar(functions: Sequence[dict[str, Any]], mode: str) -> str:
    """The GBNF for `mode`: a call to one of `functions`, text, or either."""
    if mode == "none":
        return f"root ::= {_TEXT_RULE}"
    converter = SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={"name": 0, "arguments": 1}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    alternatives = []
    for index, function in enumerate(functions):
        try:
            # Each tool's own `#/...` references resolve within its own schema.
            arguments = converter.resolve_refs(
                bounded(generable(function["parameters"], root=True)), f"tool-{index}"
            )
        except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise _unusable(index, exc) from None
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    try:
        rule = converter.visit({"anyOf": alternatives}, "call")  # type: ignore[no-untyped-call]
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise _unusable(None, exc) from None
    call = f'"{CALL_OPEN}\\n" {rule} "\\n{CALL_CLOSE}"'
    root = call if mode == "required" else f"{call} | {_TEXT_RULE}"
    rules = converter.format_grammar()  # type: ignore[no-untyped-call]
    return f"{rules}\nroot ::= {root}"


def generable(schema: Any, root: bool = False) -> Any:
    """A copy of `schema` in which each subschema that says nothing of what it allows (what
    pydantic writes for `Any`, `{"title": "Args"}`, or `{}`) allows any JSON value, as JSON
    Schema means: the grammar converter refuses the first and reads `{}` as "an object". The
    arguments themselves (`root`) are always an object."""
    if not isinstance(schema, dict):
        return schema
    copy = dict(schema)
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            copy[key] = {name: generable(value) for name, value in schema[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            copy[key] = generable(schema[key])
    for key in ("anyOf", "oneOf", "allOf", "prefixItems", "items"):
        if isinstance(schema.get(key), list):
            copy[key] = [generable(value) for value in schema[key]]
    if not _SAYS_WHAT & set(schema):
        copy["type"] = "object" if root else list(ANY_VALUE)
    return copy


def bounded(schema: Any) -> Any:
    """A copy of `schema` whose strings and arrays without a bound get `STRING_CAP` and
    `ARRAY_CAP` (the prompt still shows the client's schema; only generation is bounded)."""
    if isinstance(schema, list):
        return [bounded(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copy = {key: bounded(value) for key, value in schema.items()}
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    free_text = not {"maxLength", "enum", "const", "pattern", "format"} & set(schema)
    if "string" in kinds and free_text:
        copy["maxLength"] = STRING_CAP
    if "array" in kinds and "maxItems" not in schema:
        copy["maxItems"] = ARRAY_CAP
    for least, most in (("minLength", "maxLength"), ("minItems", "maxItems")):
        if _count(schema.get(least)) > REPEAT_MAX:
            raise ValueError(f"{least} above {REPEAT_MAX} cannot be generated")
        if _count(copy.get(most)) > REPEAT_MAX:
            copy[most] = REPEAT_MAX
    return copy


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _unusable(index: int | None, exc: BaseException) -> ToolRequestError:
    param = "tools" if index is None else f"tools[{index}].function.parameters"
    return ToolRequestError(
        f"'{param}' is a JSON schema this server cannot constrain generation to ({exc}); "
        "simplify it (no remote $ref).",
        param,
    )


def system_prompt(functions: Sequence[dict[str, Any]]) -> str:
    """What the model is told about the tools: the same text whatever the tool_choice."""
    described = "\n".join(
        json.dumps(
            {k: function[k] for k in ("name", "description", "parameters") if k in function},
            ensure_ascii=False,
        )
        for function in functions
    )
    return (
        f"You can call these tools:\n<tools>\n{described}\n</tools>\n"
        f"To call a tool, reply with only:\n{CALL_OPEN}\n"
        '{"name": <tool name>, "arguments": <the arguments as a JSON object>}\n'
        f"{CALL_CLOSE}\n"
        "Tool results come back to you as "
        f"{RESULT_OPEN}...{RESULT_CLOSE}. Otherwise, answer in plain text."
    )


def render_messages(
    messages: Sequence[Any], functions: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation as any chat template can render it: the tools in the system prompt,
    calls and results written out as text, results as user turns."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            rendered.append(message)  # llama_cpp's own validation answers it
            continue
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = [_written_call(call) for call in message["tool_calls"]]
            text = "\n".join(filter(None, [_text(message.get("content")), *calls]))
            rendered.append({"role": "assistant", "content": text})
        elif role in ("tool", "function"):
            result = f"{RESULT_OPEN}\n{_text(message.get('content'))}\n{RESULT_CLOSE}"
            previous = rendered[-1] if rendered else None
            if previous is not None and previous.get("tool_results"):
                previous["content"] += "\n" + result  # several results: one user turn
            else:
                rendered.append({"role": "user", "content": result, "tool_results": True})
        else:
            rendered.append({**message, "content": _text(message.get("content"))})
    for message in rendered:
        if isinstance(message, dict):
            message.pop("tool_results", None)
    if not functions:
        return rendered
    tools = system_prompt(functions)
    first = rendered[0] if rendered else None
    if isinstance(first, dict) and first.get("role") == "system":
        rendered[0] = {**first, "content": f"{first['content']}\n\n{tools}".lstrip()}
    else:
        rendered.insert(0, {"role": "system", "content": tools})
    return rendered


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _written_call(call: Any) -> str:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return ""
    arguments = function.get("arguments")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        parsed = arguments  # written as it came
    written = json.dumps({"name": function.get("name"), "arguments": parsed}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{written}\n{CALL_CLOSE}"


def read_call(text: str) -> dict[str, Any] | None:
    """The call `text` holds, `{"name", "arguments"}`, or None when it holds no whole call."""
    inner = text.strip()
    if not (inner.startswith(CALL_OPEN) and inner.endswith(CALL_CLOSE)):
        return None
    try:
        call = json.loads(inner[len(CALL_OPEN) : -len(CALL_CLOSE)])
    except ValueError:
        return None
    if not (
        isinstance(call, dict)
        and isinstance(call.get("name"), str)
        and isinstance(call.get("arguments"), dict)
    ):
        return None
    return call


class ToolStream:
    """Turns the chunks of a grammar-constrained chat stream into OpenAI's, tool calls included."""

    def __init__(self, mode: str) -> None:
        # "text": pass content on; "call": hold it; "open": the first character decides.
        self._state = {"none": "text", "required": "call"}.get(mode, "open")
        self._held = ""

    def convert(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            choices = chunk.get("choices") or []
            if self._state == "text" or not choices:
                yield chunk
                continue
            choice = choices[0]
            delta = choice.get("delta") or {}
            self._held += delta.get("content") or ""
            if self._state == "open" and self._held:
                self._state = "call" if self._held.startswith("<") else "text"
                if self._state == "text":
                    text = {**delta, "content": self._held}
                    yield _with_choice(chunk, {**choice, "delta": text})
                    continue
            finish = choice.get("finish_reason")
            if finish is not None:
                yield from self._end(chunk, choice, finish)
            elif "role" in delta:
                yield _with_choice(chunk, {**choice, "delta": {"role": delta["role"]}})

    def _end(self, chunk: Chunk, choice: dict[str, Any], finish: str) -> Iterator[Chunk]:
        call = read_call(self._held)
        if call is None:
            # Cut short (by max_tokens, or a stop sequence): no half-written call goes out.
            if self._held:
                logger.info("a tool call ended unfinished (%s); no call is sent", finish)
            yield _with_choice(chunk, {**choice, "delta": {}, "finish_reason": finish})
            return
        written = {
            "index": 0,
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
        }
        delta = {"content": None, "tool_calls": [written]}
        yield _with_choice(chunk, {**choice, "delta": delta, "finish_reason": None})
        yield _with_choice(chunk, {**choice, "delta": {}, "finish_reason": "tool_calls"})


def _with_choice(chunk: Chunk, choice: dict[str, Any]) -> Chunk:
    return {**chunk, "choices": [choice]}
