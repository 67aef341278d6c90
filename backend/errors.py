"""The backend's own errors: one-line operator errors, and the OpenAI error shape for HTTP."""

from __future__ import annotations

from typing import Any


class BackendError(Exception):
    """A setting or a file the backend needs is wrong; the message is one line for the operator."""


def openai_error(
    message: str, *, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The body OpenAI's API answers errors with, so OpenAI clients raise the matching exception."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
