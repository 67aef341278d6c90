"""The audit row: a finished request as one `llama_requests` row, in the table's column order.

Text in a row may come from a client (a path, a model name, an X-Request-Id). Postgres text holds
neither NUL nor lone UTF-16 surrogates (which JSON's `\\ud800` escapes produce), and a row it
refuses would hold up its whole batch, so every text value is made storable here, bounded in
length, before a row exists.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple

TEXT_LIMIT = 512  # paths, model names and ids beyond this are cut, never refused
ERROR_TEXT_LIMIT = 200


class AuditRow(NamedTuple):
    """One finished request, in `llama_requests` column order (the id is the database's).

    A tuple, so COPY takes it as it is: no per-row conversion on the way to Postgres.
    """

    request_id: str | None
    created_at: datetime
    user_id: int | None
    username: str | None
    key_id: str | None
    method: str | None
    path: str
    model: str | None
    stream: bool | None
    status_code: int
    duration_ms: float
    ttfb_ms: float | None
    queue_ms: float | None
    request_bytes: int
    response_bytes: int
    prompt_tokens: int | None
    completion_tokens: int | None
    client_addr: str | None
    error: str | None
    client_request_id: str | None = None
    backend: str | None = None
    end_user: str | None = None
    cached_tokens: int | None = None  # with a default: older spill files still read
    weight: float | None = None  # the model's weight applied to its tokens (None: 1)


COLUMNS: tuple[str, ...] = AuditRow._fields
# Called with each finished request's row on the event loop: it must only enqueue, never wait.
CompletionHook = Callable[[AuditRow], None]


def storable(value: str | None, limit: int = TEXT_LIMIT) -> str | None:
    """`value` as Postgres text can hold it: no NUL, no lone surrogate, at most `limit` chars."""
    if value is None:
        return None
    value = value[:limit]
    if value.isascii():
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    # Lone surrogates cannot be encoded; "replace" turns each into "?".
    cleaned = value.encode("utf-8", "replace").decode("utf-8")
    return cleaned.replace("\x00", "\ufffd")
