"""Rewrites a backend's error body into OpenAI's shape, keeping bodies already in it.

llama_cpp.server answers some errors as FastAPI does (`{"detail": "..."}`, or a list of
validation problems for 422); OpenAI client libraries only read `{"error": {...}}`.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from proxy.errors import INVALID_REQUEST, SERVER_ERROR, error_body

_SNIPPET = 300


def openai_error_body(status: int, raw: bytes) -> dict[str, Any]:
    type_ = INVALID_REQUEST if status < 500 else SERVER_ERROR
    try:
        payload: Any = json.loads(raw)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return {
                "error": {
                    "message": error["message"],
                    "type": error.get("type") or type_,
                    "param": error.get("param"),
                    "code": error.get("code"),
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
