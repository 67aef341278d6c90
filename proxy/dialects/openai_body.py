"""OpenAI request bodies: parsed, checked and normalized before anything is spent on them.

What the proxy reads from a body is what the backend is sent: the proxy forwards its own
normalized copy (`proxy.dialects.openai_types` says what is checked), never the client's bytes,
so the two can never disagree about a field. On every inference request:

- the answer's length: `max_tokens`, or `max_completion_tokens` (OpenAI's newer name, which
  llama_cpp.server ignores), whichever the client sends, capped by the caller's cap and sent to
  the backend as `max_tokens`; missing, zero or negative means the cap;
- streaming: the backend is always asked to stream, with usage, so that tokens are counted
  exactly, the time to the first token is known, and a client that leaves stops the generation
  at once (llama_cpp.server notices a departure only while it streams). A client that did not ask
  for a stream gets the answer assembled into one JSON document (`proxy.dialects.openai_replies`);
- structured output: OpenAI's `response_format: {"type": "json_schema", "json_schema": {...}}`
  becomes llama_cpp's schema-constrained JSON (`{"type": "json_object", "schema": ...}`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import msgspec
from pydantic import BaseModel, ValidationError

from proxy.dialects.openai_types import (
    REFUSED,
    ChatRequest,
    EmbeddingRequest,
    ImagePart,
    TextRequest,
)
from proxy.errors import InvalidJson, InvalidRequest

# Asks llama-gate's backend for a usage event as soon as the prompt is known (before it is even
# processed) besides the usual last one, so a client that leaves early is still charged for it.
PROGRESS_OPTION = "llama_gate_progress"

M = TypeVar("M", bound=BaseModel)
# A JSON escape of a UTF-16 surrogate: the only way one gets into a body (UTF-8 cannot hold it).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Inference:
    """A chat or text completion request as the backend will be sent it."""

    body: dict[str, Any]
    model: str | None
    stream: bool  # what the client asked for: a stream, or one JSON answer
    usage_wanted: bool  # the client asked for the usage event at the end of its stream
    end_user: str | None  # OpenAI's `user`: whom the request is for
    strict: bool  # the client asked for its max_tokens itself, within its cap


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    """A JSON number as a float; one too large for a float (1e400) would be echoed back as
    `Infinity`, which is not JSON, so it is refused like NaN and Infinity are."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is not a JSON number this server can hold")
    return value


def parse_object(raw: bytes | None) -> dict[str, Any]:
    """The body as a JSON object of text, or a 400 saying what is wrong with it."""
    payload, unsure = parse_json(raw)
    if not isinstance(payload, dict):
        raise InvalidJson("expected an object, got " + type(payload).__name__)
    if unsure:
        refuse_lone_surrogates(payload)
    return payload


def may_hold_surrogates(raw: bytes) -> bool:
    """Whether a JSON body escapes a UTF-16 surrogate anywhere (a pair is text, a lone one not)."""
    return _SURROGATE_ESCAPE.search(raw) is not None


def refuse_lone_surrogates(payload: Any, prefix: str = "") -> None:
    """A 400 naming the first string (or key) in `payload` that holds a lone surrogate: no
    tokenizer, template or database takes one, and Python's codecs fail on it."""
    pending: list[tuple[str, Any]] = [(prefix, payload)]
    while pending:
        where, value = pending.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                name = where or "body"
                raise InvalidRequest(
                    f"'{name}' holds a lone UTF-16 surrogate, which is not text; send valid "
                    "Unicode.",
                    name,
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                inner = f"{where}.{key}" if where else str(key)
                if _LONE_SURROGATE.search(key):
                    pending.append((where or "body", key))
                else:
                    pending.append((inner, item))
        elif isinstance(value, list):
            pending.extend((f"{where}.{i}" if where else str(i), v) for i, v in enumerate(value))


def parse_json(raw: bytes | None) -> tuple[Any, bool]:
    """The body as JSON of any kind, or `InvalidJson` saying what is wrong with it; and whether
    a string in it may still hold a lone UTF-16 surrogate (see `refuse_lone_surrogates`).

    msgspec reads what is plainly well-formed UTF-8 JSON of finite numbers, several times
    faster than the standard library (an 8 MiB text in 4 ms, where orjson took 12-24 ms), reads
    integers exactly however long (`proxy.upstream.forward` writes them back with msgspec too),
    and refuses lone surrogates itself. Whatever it refuses is read again by the standard
    library, whose errors say where and what is wrong, and which reads lone surrogates so that
    the field holding one can be named."""
    if not raw:
        raise InvalidJson("the body is empty")
    try:
        return msgspec.json.decode(raw), False
    except (msgspec.DecodeError, RecursionError):  # ValidationError too: 1e400, 4300+ digits
        pass
    try:
        payload: Any = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except UnicodeDecodeError:
        raise InvalidJson("it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidJson("it is nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, or a number Python will not convert (4300+ digits)
        raise InvalidJson(
            str(exc) if "JSON number" in str(exc) else "a number in it is too long"
        ) from None
    return payload, may_hold_surrogates(raw)


def checked(kind: type[M], payload: dict[str, Any]) -> M:
    """`payload` as `kind`, or a 400 naming the first field that is wrong and why."""
    try:
        return kind.model_validate(payload)
    except ValidationError as exc:
        raise _refusal(exc) from None


def _refusal(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False)
    path = field_path(errors[0]["loc"])
    param = ".".join(path) or None
    if errors[0]["type"] == "missing":
        return InvalidRequest(f"'{param}' is required.", param)
    # A field with several accepted forms fails once per form: say what each wanted.
    reasons = list(dict.fromkeys(e["msg"] for e in errors if field_path(e["loc"]) == path))
    got = errors[0].get("input")
    shown = json.dumps(got)[:80] if isinstance(got, str | int | float | bool) else None
    detail = f" (got {shown})" if shown is not None else ""
    return InvalidRequest(f"Invalid '{param}': {'; or '.join(reasons[:3])}{detail}.", param)


def field_path(loc: tuple[int | str, ...]) -> list[str]:
    """The field a validation error is about: its location up to the first union member's tag
    (pydantic names the form it tried, e.g. `str` or `list[str]`, as if it were a field)."""
    path: list[str] = []
    for part in loc:
        text = str(part)
        if isinstance(part, str) and (
            text in {"str", "int", "float", "bool"}
            or text[:1].isupper()
            or "[" in text
            or text.startswith("constrained-")  # a constrained str, int or float
        ):
            break
        path.append(text)
    return path


def _refuse_unoffered(payload: dict[str, Any]) -> None:
    for name, reason in REFUSED.items():
        if payload.get(name) is not None:
            raise InvalidRequest(reason, name)


def chat(payload: dict[str, Any], max_tokens: int) -> Inference:
    """A chat completion request as the backend is sent it; the messages are text only."""
    _refuse_unoffered(payload)
    request = checked(ChatRequest, payload)
    for number, message in enumerate(request.messages):
        parts = message.content if isinstance(message.content, list) else ()
        for index, part in enumerate(parts):
            if isinstance(part, ImagePart):
                raise InvalidRequest(
                    "The models here read text only and cannot see images; send the request "
                    "without image_url parts.",
                    f"messages.{number}.content.{index}",
                )
    body = request.model_dump(exclude_none=True, by_alias=True, exclude={"messages"})
    # Messages keep their nulls (an assistant's `content: null` beside its tool calls).
    messages = request.model_dump(by_alias=True, include={"messages"})["messages"]
    body["messages"] = [_message(m) for m in messages]
    if request.response_format is not None:
        body["response_format"] = _response_format(request)
    return _inference(body, payload, request.stream, request.stream_options, max_tokens)


def text(payload: dict[str, Any], max_tokens: int) -> Inference:
    _refuse_unoffered(payload)
    request = checked(TextRequest, payload)
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str):
        raise InvalidRequest(
            "'prompt' must be one text: token ids and batches of prompts are not served; send "
            "one request per prompt.",
            "prompt",
        )
    if not prompt:
        raise InvalidRequest("'prompt' is empty; send some text.", "prompt")
    body = request.model_dump(exclude_none=True, by_alias=True)
    body["prompt"] = prompt
    return _inference(body, payload, request.stream, request.stream_options, max_tokens)


def embeddings(payload: dict[str, Any]) -> dict[str, Any]:
    body = checked(EmbeddingRequest, payload).model_dump(exclude_none=True)
    given = body["input"]
    inputs = given if isinstance(given, list) else [given]
    if not inputs:
        raise InvalidRequest("'input' is empty; send a text or a list of texts.", "input")
    for index, item in enumerate(inputs):
        param = f"input.{index}" if isinstance(given, list) else "input"
        if not isinstance(item, str):
            raise InvalidRequest(
                "'input' must be a text or a list of texts: token ids are not served.", param
            )
        if not item:
            raise InvalidRequest(f"'{param}' is empty; send some text.", param)
    return body


def _inference(
    body: dict[str, Any],
    payload: dict[str, Any],
    stream: bool | None,
    options: Any,
    max_tokens: int,
) -> Inference:
    usage_wanted = bool(stream and options is not None and options.include_usage)
    body["max_tokens"], strict = _capped(payload, max_tokens)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True, PROGRESS_OPTION: True}
    if "seed" in body:
        body["seed"] %= 1 << 32  # llama.cpp's seeds are 32 bits; OpenAI's are any integer
    return Inference(body, body.get("model"), bool(stream), usage_wanted, body.get("user"), strict)


def _message(message: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in message.items() if v is not None or k == "content"}
    if kept["role"] == "developer":
        kept["role"] = "system"
    return kept


def _response_format(request: ChatRequest) -> dict[str, Any]:
    wanted = request.response_format
    assert wanted is not None
    if wanted.type == "json_schema":
        schema = wanted.json_schema.schema_ if wanted.json_schema is not None else None
        if schema is None:
            raise InvalidRequest(
                "'response_format.json_schema.schema' is required for type json_schema.",
                "response_format.json_schema.schema",
            )
        return {"type": "json_object", "schema": schema}
    if wanted.type == "json_object" and wanted.schema_ is not None:
        return {"type": "json_object", "schema": wanted.schema_}
    return {"type": wanted.type}


def _capped(payload: dict[str, Any], cap: int) -> tuple[int, bool]:
    """The answer length to send: the one asked for, within the cap; the cap when none is (or
    null). True when the client asked for that number itself (within its cap)."""
    for name in ("max_tokens", "max_completion_tokens"):
        asked = payload.get(name)
        if asked is None:
            continue
        if type(asked) is not int:
            raise InvalidRequest(f"Invalid '{name}': expected a whole number.", name)
        if asked < 1:
            raise InvalidRequest(
                f"Invalid '{name}': it must be at least 1 (got {asked}); leave it out for as "
                "many as your cap allows.",
                name,
            )
        return (asked, True) if asked <= cap else (cap, False)
    return cap, False
