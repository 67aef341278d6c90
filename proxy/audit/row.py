"""The audit row: a finished request as one `llama_requests` row, in the table's column order."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from proxy.pipeline.records import RequestRecord


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


COLUMNS: tuple[str, ...] = AuditRow._fields
ERROR_TEXT_LIMIT = 200


def _text(value: str | None) -> str | None:
    """Postgres text cannot hold NUL, which a client can put in a path or a model name."""
    return value.replace("\x00", "\ufffd") if value and "\x00" in value else value


def row_from(record: RequestRecord) -> AuditRow:
    return AuditRow(
        request_id=record.request_id,
        created_at=record.started_at,
        user_id=record.user_id,
        username=record.username,
        key_id=record.key_id,
        method=_text(record.method),
        path=_text(record.path) or "",
        model=_text(record.model),
        stream=record.stream,
        status_code=record.status,
        duration_ms=record.duration_ms if record.duration_ms is not None else record.elapsed_ms(),
        ttfb_ms=record.ttfb_ms,
        queue_ms=record.queue_ms,
        request_bytes=record.bytes_in,
        response_bytes=record.bytes_out,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        client_addr=record.client_addr,
        error=_text(record.error[:ERROR_TEXT_LIMIT]) if record.error else None,
    )
