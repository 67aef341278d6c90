"""Stored Responses API answers: kept for `previous_response_id`, read back, deleted, pruned."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from proxy.db.connect import Connection

# -- stored Responses API answers ---------------------------------------------------------------


async def store_response(
    con: Connection,
    response_id: str,
    user_id: int,
    expires_at: datetime,
    previous_id: str | None,
    input_items: str,
    messages: str,
    response: str,
) -> None:
    """Keep a response (the three documents as JSON text)."""
    await con.execute(
        "INSERT INTO llama_responses (id, user_id, expires_at, previous_id, input_items, "
        "messages, response) VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7::jsonb)",
        response_id, user_id, expires_at, previous_id, input_items, messages, response,
    )  # fmt: skip


async def response_conversation(
    con: Connection, response_id: str, user_id: int, now: datetime
) -> tuple[str | None, list[str]] | None:
    """The chat messages (JSON text, one list per turn, oldest first) of the user's unexpired
    response `response_id` and the ones it continued, with the id of the response the oldest
    of them continued (None: the chain is whole; else that one is gone); None if
    `response_id` is not theirs or is gone."""
    rows = await con.fetch(
        """
        WITH RECURSIVE chain AS (
            SELECT id, previous_id, messages, 0 AS depth FROM llama_responses
             WHERE id = $1 AND user_id = $2 AND expires_at > $3
            UNION ALL
            SELECT r.id, r.previous_id, r.messages, chain.depth + 1 FROM llama_responses r
              JOIN chain ON r.id = chain.previous_id
             WHERE r.user_id = $2 AND r.expires_at > $3 AND chain.depth < 10000
        )
        SELECT previous_id, messages::text AS messages FROM chain ORDER BY depth DESC
        """,
        response_id, user_id, now,
    )  # fmt: skip
    if not rows:
        return None
    return rows[0]["previous_id"], [row["messages"] for row in rows]


async def stored_response(
    con: Connection, response_id: str, user_id: int, now: datetime
) -> asyncpg.Record | None:
    """The user's unexpired response (`response` and `input_items` as JSON text), or None."""
    return await con.fetchrow(
        "SELECT response::text AS response, input_items::text AS input_items "
        "FROM llama_responses WHERE id = $1 AND user_id = $2 AND expires_at > $3",
        response_id, user_id, now,
    )  # fmt: skip


async def delete_response(con: Connection, response_id: str, user_id: int, now: datetime) -> bool:
    result: Any = await con.execute(
        "DELETE FROM llama_responses WHERE id = $1 AND user_id = $2 AND expires_at > $3",
        response_id, user_id, now,
    )  # fmt: skip
    return str(result).endswith(" 1")


async def prune_responses(con: Connection, now: datetime) -> int:
    """Delete the responses whose retention is over."""
    result: Any = await con.execute("DELETE FROM llama_responses WHERE expires_at <= $1", now)
    return int(str(result).rsplit(" ", 1)[-1])
