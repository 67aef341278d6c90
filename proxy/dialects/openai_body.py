"""OpenAI request bodies: parsed, checked and normalized before anything is spent on them.

What the proxy reads from a body is what the backend is sent: the proxy forwards its own
normalized copy, never the client's bytes, so the two can never disagree about a field. Two fields
are rewritten on every inference request:

- the answer's length: `max_tokens`, or `max_completion_tokens` (OpenAI's newer name, which
  llama_cpp.server ignores), whichever the client sends, capped by the caller's cap and sent to
  the backend as `max_tokens`; missing or out-of-range values get the cap;
- streaming: the backend is always asked to stream, with usage, so that tokens are counted
  exactly, the time to the first token is known, and a client that leaves stops the generation
  at once (llama_cpp.server notices a departure only while it streams). A client that did not ask
  for a stream gets the answer assembled into one JSON document (`proxy.dialects.openai_replies`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from proxy.errors import InvalidJson, InvalidRequest

# Asks llama-gate's backend for a usage event as soon as the prompt is known (before it is even
# processed) besides the usual last one, so a client that leaves early is still charged for it.
PROGRESS_OPTION = "llama_gate_progress"


@dataclass(frozen=True)
class Inference:
    """A chat or text completion request as the backend will be sent it."""

    body: dict[str, Any]
    model: str | None
    stream: bool  # what the client asked for: a stream, or one JSON answer
    usage_wanted: bool  # the client asked for the usage event at the end of its stream


def parse_object(raw: bytes | None) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw:
        raise InvalidJson("the body is empty")
    try:
        payload: Any = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidJson("it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (RecursionError, ValueError):
        # ValueError: a number Python refuses to convert (thousands of digits).
        raise InvalidJson("it is nested too deeply or holds a number too long") from None
    if not isinstance(payload, dict):
        raise InvalidJson("expected an object, got " + type(payload).__name__)
    return payload


def model_of(payload: dict[str, Any]) -> str | None:
    model = payload.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        raise InvalidRequest(
            "'model' must be a string naming a model (see GET /v1/models).", "model"
        )
    return model


def inference(payload: dict[str, Any], max_tokens: int) -> Inference:
    """Check and normalize a chat or text completion body for the backend."""
    model = model_of(payload)
    stream = _flag(payload, "stream")
    options = payload.get("stream_options")
    usage_wanted = stream and isinstance(options, dict) and options.get("include_usage") is True
    body = dict(payload)
    body["max_tokens"] = _capped(payload, max_tokens)
    body.pop("max_completion_tokens", None)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True, PROGRESS_OPTION: True}
    return Inference(body, model, stream, usage_wanted)


def _flag(payload: dict[str, Any], name: str) -> bool:
    value = payload.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false.", name)
    return value


def _capped(payload: dict[str, Any], cap: int) -> int:
    """The answer length to send: the one asked for, within the cap; the cap when none fits.

    llama_cpp.server reads <= 0 and null as "until the context is full" and turns "100000" or
    1e5 into a number, so anything but a whole number within the cap is sent as the cap.
    """
    asked = payload.get("max_tokens")
    if asked is None:
        asked = payload.get("max_completion_tokens")
    if type(asked) is int and 0 < asked <= cap:
        return asked
    return cap
