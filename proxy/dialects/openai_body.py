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
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError

from proxy.dialects.openai_types import ChatRequest, EmbeddingRequest, TextRequest
from proxy.errors import InvalidJson, InvalidRequest

# Asks llama-gate's backend for a usage event as soon as the prompt is known (before it is even
# processed) besides the usual last one, so a client that leaves early is still charged for it.
PROGRESS_OPTION = "llama_gate_progress"

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Inference:
    """A chat or text completion request as the backend will be sent it."""

    body: dict[str, Any]
    model: str | None
    stream: bool  # what the client asked for: a stream, or one JSON answer
    usage_wanted: bool  # the client asked for the usage event at the end of its stream
    end_user: str | None  # OpenAI's `user`: whom the request is for


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
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    payload = parse_json(raw)
    if not isinstance(payload, dict):
        raise InvalidJson("expected an object, got " + type(payload).__name__)
    return payload


def parse_json(raw: bytes | None) -> Any:
    """The body as JSON of any kind, or `InvalidJson` saying what is wrong with it."""
    if not raw:
        raise InvalidJson("the body is empty")
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
    return payload


def checked(kind: type[M], payload: dict[str, Any]) -> M:
    """`payload` as `kind`, or a 400 naming the first field that is wrong and why."""
    try:
        return kind.model_validate(payload)
    except ValidationError as exc:
        raise _refusal(exc) from None


def _refusal(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False)
    path = _field_path(errors[0]["loc"])
    param = ".".join(path) or None
    if errors[0]["type"] == "missing":
        return InvalidRequest(f"'{param}' is required.", param)
    # A field with several accepted forms fails once per form: say what each wanted.
    reasons = list(dict.fromkeys(e["msg"] for e in errors if _field_path(e["loc"]) == path))
    got = errors[0].get("input")
    shown = json.dumps(got)[:80] if isinstance(got, str | int | float | bool) else None
    detail = f" (got {shown})" if shown is not None else ""
    return InvalidRequest(f"Invalid '{param}': {'; or '.join(reasons[:3])}{detail}.", param)


def _field_path(loc: tuple[int | str, ...]) -> list[str]:
    """The field a validation error is about: its location up to the first union member's tag
    (pydantic names the form it tried, e.g. `str` or `list[str]`, as if it were a field)."""
    path: list[str] = []
    for part in loc:
        text = str(part)
        if isinstance(part, str) and (
            text in {"str", "int", "float", "bool"} or text[:1].isupper() or "[" in text
        ):
            break
        path.append(text)
    return path


def chat(payload: dict[str, Any], max_tokens: int) -> Inference:
    request = checked(ChatRequest, payload)
    body = request.model_dump(exclude_none=True, by_alias=True, exclude={"messages"})
    # Messages keep their nulls (an assistant's `content: null` beside its tool calls).
    messages = request.model_dump(by_alias=True, include={"messages"})["messages"]
    body["messages"] = [_message(m) for m in messages]
    if request.response_format is not None:
        body["response_format"] = _response_format(request)
    return _inference(body, payload, request.stream, request.stream_options, max_tokens)


def text(payload: dict[str, Any], max_tokens: int) -> Inference:
    request = checked(TextRequest, payload)
    body = request.model_dump(exclude_none=True, by_alias=True)
    return _inference(body, payload, request.stream, request.stream_options, max_tokens)


def embeddings(payload: dict[str, Any]) -> dict[str, Any]:
    return checked(EmbeddingRequest, payload).model_dump(exclude_none=True)


def _inference(
    body: dict[str, Any],
    payload: dict[str, Any],
    stream: bool | None,
    options: Any,
    max_tokens: int,
) -> Inference:
    usage_wanted = bool(stream and options is not None and options.include_usage)
    body["max_tokens"] = _capped(payload, max_tokens)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True, PROGRESS_OPTION: True}
    return Inference(body, body.get("model"), bool(stream), usage_wanted, body.get("user"))


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


def _capped(payload: dict[str, Any], cap: int) -> int:
    """The answer length to send: the one asked for, within the cap; the cap when none is.

    llama_cpp.server reads <= 0 and null as "until the context is full": those get the cap too.
    """
    for name in ("max_tokens", "max_completion_tokens"):
        asked = payload.get(name)
        if asked is None:
            continue
        if type(asked) is not int:
            raise InvalidRequest(f"Invalid '{name}': expected a whole number.", name)
        return asked if 0 < asked <= cap else cap
    return cap
