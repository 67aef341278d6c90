"""Rewrites a backend's error body into OpenAI's shape, keeping bodies already in it.

llama_cpp.server answers some errors as FastAPI does (`{"detail": "..."}`, or a list of
validation problems for 422); OpenAI client libraries only read `{"error": {...}}`.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from proxy.errors import (
    INVALID_REQUEST,
    SERVER_ERROR,
    ApiError,
    ContextLengthExceeded,
    InvalidRequest,
    error_body,
)

_SNIPPET = 300
_NUMBERS = frozenset({"prompt_tokens", "n_ctx"})  # llama-gate's backend's, for the proxy's words


def openai_error_body(status: int, raw: bytes) -> dict[str, Any]:
    type_ = INVALID_REQUEST if status < 500 else SERVER_ERROR
    try:
        payload: Any = json.loads(raw)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            numbers = {k: v for k, v in error.items() if k in _NUMBERS and type(v) is int}
            return {
                "error": {
                    "message": error["message"],
                    "type": error.get("type") or type_,
                    "param": error.get("param"),
                    "code": error.get("code"),
                    **numbers,
                }
            }
        if "detail" in payload:
            detail = payload["detail"]
            return error_body(_detail_message(detail), type_, None, _detail_param(detail))
        if isinstance(error, str):
            return error_body(error, type_, None)
    text = raw.decode("utf-8", "replace").strip()[:_SNIPPET]
    reason = _reason(status)
    message = f"The model server answered {status} {reason}" + (f": {text}" if text else ".")
    return error_body(message, type_, None)


def _detail_message(detail: Any) -> str:
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI's validation errors: [{"loc": [...], "msg": ...}]
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                msg = str(item.get("msg", item))
                parts.append(f"{where}: {msg}" if where else msg)
            else:
                parts.append(str(item))
        return "; ".join(parts) or "The request was invalid."
    return json.dumps(detail)[:_SNIPPET]


def _detail_param(detail: Any) -> str | None:
    """The field FastAPI's first validation problem is about (`body.messages.0` -> messages.0)."""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        where = [str(p) for p in detail[0].get("loc", []) if p != "body"]
        return ".".join(where) or None
    return None


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


# What the proxy says when llama-gate's backend refuses a request, by the backend's code: its
# own words are never passed on (another backend's may hold file paths or stack frames).
_REFUSALS = {
    "invalid_grammar": "'{param}' gives a grammar the model server cannot parse; simplify it.",
    "template_error": (
        "The model's chat template cannot render these messages (a content part it does not "
        "take, such as an image, or a role it does not know); send plain text messages."
    ),
    "invalid_text": "'{param}' holds a lone UTF-16 surrogate, which is not text; send valid "
    "Unicode.",
    "invalid_logit_bias": "'logit_bias' keys must be token ids of the model's vocabulary.",
    "empty_prompt": "'{param}' is empty; send some text.",
    "invalid_prompt": "'{param}' must be text (token-id prompts are not served here).",
    "invalid_tools": (
        "The tools cannot be served as sent: check '{param}' (at most 128 tools with unique "
        "names, parameter schemas nested at most 64 levels, no remote $ref, no minLength or "
        "minItems above 1000)."
    ),
    "logprobs_unavailable": (
        "logprobs are not available while the model server's prompt cache is on; ask without "
        "logprobs, or ask your administrator to run it with LLAMA_PROMPT_CACHE=off."
    ),
}


def backend_refusal(status: int, error: dict[str, Any]) -> ApiError:
    """The proxy's own error for a backend's 4xx (`error` in OpenAI's shape)."""
    param = error.get("param") if isinstance(error.get("param"), str) else None
    code = error.get("code") if isinstance(error.get("code"), str) else None
    if code == "context_length_exceeded":
        prompt, n_ctx = error.get("prompt_tokens"), error.get("n_ctx")
        if type(prompt) is int and type(n_ctx) is int:
            return ContextLengthExceeded(prompt, n_ctx, param=param)
    if code == "model_not_found" or status == 404:
        return InvalidRequest(
            "The model server does not serve the model asked for; GET /v1/models lists the "
            "models there are.",
            "model",
        )
    said = _REFUSALS.get(code or "")
    if said is not None:
        return InvalidRequest(said.format(param=param or "the request"), param)
    where = f": check '{param}'" if param else ""
    return InvalidRequest(f"The model server cannot serve this request as sent{where}.", param)
