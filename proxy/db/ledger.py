"""The ledger: audit rows written in batches and pruned, read back newest first (the dashboard's
Requests page and its CSV export), and requests without a valid key counted per address."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from proxy.db.connect import Connection

# Rows COPY encodes between two passes of the event loop: asyncpg encodes a list of rows in one
# go (1000 audit rows held the loop ~2 ms in a one-off probe, every stream waiting); 200 at a
# time it is ~0.6 ms.
COPY_TURN_ROWS = 200


async def prune_requests_batch(con: Connection, before: datetime, batch_size: int) -> int:
    """Delete up to `batch_size` of the oldest audit rows older than `before`; return how many.

    Small batches, each its own statement, so the table is never locked for long.
    """
    result: Any = await con.execute(
        """WITH doomed AS (
               SELECT id FROM llama_requests WHERE created_at < $1 ORDER BY id LIMIT $2
           )
           DELETE FROM llama_requests r USING doomed WHERE r.id = doomed.id""",
        before,
        batch_size,
    )
    return int(str(result).rsplit(" ", 1)[-1])


async def write_audit_batch(
    con: Connection,
    batch_id: uuid.UUID,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    timeout: float | None = None,  # noqa: ASYNC109 - asyncpg's own per-call timeout
) -> bool:
    """COPY one batch of audit rows, exactly once: False when this batch id was written before."""
    async with con.transaction():
        fresh = await con.fetchval(
            """INSERT INTO llama_audit_batches (batch_id, row_count) VALUES ($1, $2)
               ON CONFLICT (batch_id) DO NOTHING RETURNING true""",
            batch_id,
            len(rows),
            timeout=timeout,
        )
        if fresh:
            await con.copy_records_to_table(
                "llama_requests", records=_in_turns(rows), columns=list(columns), timeout=timeout
            )
    return bool(fresh)


async def _in_turns(rows: Sequence[Sequence[object]]) -> AsyncIterator[Sequence[object]]:
    """`rows`, with a pass of the event loop after every `COPY_TURN_ROWS` of them."""
    for index, row in enumerate(rows):
        if index and index % COPY_TURN_ROWS == 0:
            await asyncio.sleep(0)
        yield row


async def prune_audit_batches(con: Connection, before: datetime) -> int:
    """Forget batch ids older than `before` (they only guard replays of recent batches)."""
    result: Any = await con.execute("DELETE FROM llama_audit_batches WHERE written_at < $1", before)
    return int(str(result).rsplit(" ", 1)[-1])


# -- the audit log, newest first: the dashboard's Requests page and its CSV export ----------

REQUEST_LOG_COLUMNS = (
    "id",
    "created_at",
    "username",
    "key_id",
    "method",
    "path",
    "model",
    "stream",
    "status_code",
    "duration_ms",
    "ttfb_ms",
    "queue_ms",
    "prompt_tokens",
    "completion_tokens",
    "request_bytes",
    "response_bytes",
    "backend",
    "request_id",
    "client_request_id",
    "client_addr",
    "error",
    "cached_tokens",
)


@dataclass(frozen=True)
class RequestFilter:
    """Which audit rows to show; None leaves that condition out."""

    username: str | None = None
    user_id: int | None = None  # a user's own rows (their page): by id, not by a reusable name
    status_from: int | None = None  # inclusive
    status_to: int | None = None  # inclusive
    path: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive


async def request_log(
    con: Connection,
    where: RequestFilter,
    before: tuple[datetime, int] | None,
    limit: int,
    columns: Sequence[str] = REQUEST_LOG_COLUMNS,
) -> list[asyncpg.Record]:
    """Up to `limit` rows matching `where`, newest first, older than the `before` cursor
    (a row's `created_at` and `id`: keyset pagination, as cheap on the last page as the first).

    Only the conditions given become SQL, so each page is one range scan of an index on
    `created_at` (or on `username, created_at`) that stops after `limit` rows.
    """
    unknown = set(columns) - set(REQUEST_LOG_COLUMNS)
    if unknown:
        raise ValueError(f"not a request log column: {sorted(unknown)}")
    conditions: list[str] = []
    args: list[object] = []

    def add(condition: str, *values: object) -> None:
        args.extend(values)
        numbers = [f"${len(args) - len(values) + i + 1}" for i in range(len(values))]
        conditions.append(condition.format(*numbers))

    if where.username is not None:
        add("username = {}", where.username)
    if where.user_id is not None:
        add("user_id = {}", where.user_id)
    if where.status_from is not None:
        add("status_code >= {}", where.status_from)
    if where.status_to is not None:
        add("status_code <= {}", where.status_to)
    if where.path is not None:
        add("path = {}", where.path)
    if where.since is not None:
        add("created_at >= {}", where.since)
    if where.until is not None:
        add("created_at < {}", where.until)
    if before is not None:
        add("(created_at, id) < ({}, {})", *before)
    args.append(limit)
    return await con.fetch(
        f"""SELECT {", ".join(columns)} FROM llama_requests
            {"WHERE " + " AND ".join(conditions) if conditions else ""}
            ORDER BY created_at DESC, id DESC LIMIT ${len(args)}""",
        *args,
    )


# -- requests without a valid key, counted per client address and minute -----------------------


async def add_unauthenticated(
    con: Connection,
    counts: Sequence[tuple[datetime, str, int, int, str, str]],
) -> None:
    """Add counts (minute, client address, requests, bytes, statuses JSON, paths JSON) to
    `llama_unauthenticated`, one row per address and minute however many proxies add to it."""
    await con.executemany(
        """INSERT INTO llama_unauthenticated AS t
               (minute, client_addr, requests, request_bytes, statuses, paths)
           VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)
           ON CONFLICT (minute, client_addr) DO UPDATE SET
               requests = t.requests + excluded.requests,
               request_bytes = t.request_bytes + excluded.request_bytes,
               statuses = llama_gate_add_counts(t.statuses, excluded.statuses),
               paths = llama_gate_add_counts(t.paths, excluded.paths)""",
        counts,
    )


async def prune_unauthenticated(con: Connection, before: datetime) -> int:
    result: Any = await con.execute("DELETE FROM llama_unauthenticated WHERE minute < $1", before)
    return int(str(result).rsplit(" ", 1)[-1])
