"""Runtime SQL, hand-written for asyncpg: users, keys, the ledger, admin tokens, usage reports and
stored responses. The rest is beside it in `proxy.db` (`limits`, `cluster`), the one place SQL is
written at run time; the schema itself lives in alembic."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class DuplicateUser(Exception):
    """A user with that name (compared case-insensitively) already exists."""


@dataclass(frozen=True)
class KeyRecord:
    """What the proxy needs to authenticate one key id."""

    key_id: str
    secret_hash: str
    user_id: int
    username: str
    user_enabled: bool
    expires_at: datetime | None
    revoked_at: datetime | None
    rate_limit: int | None
    rate_window_seconds: int | None
    max_concurrent: int | None
    max_tokens: int | None
    tokens_per_day: int | None
    tokens_per_minute: int | None
    default_model: str | None
    models: list[str] | None  # the key's scope; None: every model, every API
    apis: list[str] | None
    key_rate_limit: int | None = None  # the key's own request limit (None: none)
    key_rate_window_seconds: int | None = None
    key_budgeted: bool = False  # the key has a token budget of its own
    # Whose budgets and request window it spends: the first key of its rotations, else its own
    # id (the query fills it in; the default only keeps the field after the defaulted ones).
    limits_key: str = ""

    @property
    def restricted(self) -> bool:
        """Less than its user's full access: a scope, limits or a budget of its own, an expiry."""
        return (
            self.models is not None
            or self.apis is not None
            or self.key_rate_limit is not None
            or self.key_budgeted
            or self.expires_at is not None
        )


@dataclass(frozen=True)
class TokenTotals:
    """A user's tokens in `llama_requests`: since the day began and within the last minute."""

    day: int
    minute: int
    minute_oldest: datetime | None  # when the oldest tokens counted in the minute were used
    seen: frozenset[str]  # which of the request ids asked about have rows


# Per-user overrides `set-limit` may change; NULL means the proxy's setting (or no quota).
LIMIT_COLUMNS = (
    "rate_limit",
    "rate_window_seconds",
    "max_concurrent",
    "max_tokens",
    "tokens_per_day",
    "tokens_per_minute",
)

# Migration 0002's triggers NOTIFY this channel with `key:<key id>` or `user:<user id>`.
AUTH_CHANNEL = "llama_gate_auth"

_USER_COLUMNS = "id, username, enabled, created_at, " + ", ".join(LIMIT_COLUMNS)


async def create_user(
    con: Connection, username: str, rate_limit: int | None, rate_window_seconds: int | None
) -> asyncpg.Record:
    try:
        row = await con.fetchrow(
            f"""INSERT INTO users (username, rate_limit, rate_window_seconds)
                VALUES ($1, $2, $3) RETURNING {_USER_COLUMNS}""",
            username,
            rate_limit,
            rate_window_seconds,
        )
    except asyncpg.UniqueViolationError:
        raise DuplicateUser(username) from None
    assert row is not None
    return row


async def get_user(con: Connection, username: str) -> asyncpg.Record | None:
    return await con.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE username = $1", username)


async def list_users(con: Connection) -> list[asyncpg.Record]:
    return await con.fetch(
        """SELECT u.username, u.enabled, u.rate_limit, u.rate_window_seconds, u.max_concurrent,
                  u.max_tokens, u.tokens_per_day, u.tokens_per_minute, u.created_at,
                  count(k.id) FILTER (
                      WHERE (k.revoked_at IS NULL OR k.revoked_at > now())
                        AND (k.expires_at IS NULL OR k.expires_at > now())
                  ) AS active_keys,
                  max(k.last_used_at) AS last_used_at
           FROM users u LEFT JOIN api_keys k ON k.user_id = u.id
           GROUP BY u.id ORDER BY u.username"""
    )


async def set_user_enabled(con: Connection, username: str, enabled: bool) -> bool:
    row = await con.fetchrow(
        "UPDATE users SET enabled = $2 WHERE username = $1 RETURNING id", username, enabled
    )
    return row is not None


async def delete_user(con: Connection, username: str) -> bool:
    """Delete a user and their keys; their llama_requests rows keep the username."""
    row = await con.fetchrow("DELETE FROM users WHERE username = $1 RETURNING id", username)
    return row is not None


async def set_user_limits(
    con: Connection, username: str, limits: Mapping[str, int | None]
) -> asyncpg.Record | None:
    """Set some of a user's `LIMIT_COLUMNS` (None: back to the default); the user's row after."""
    unknown = set(limits) - set(LIMIT_COLUMNS)
    if unknown:
        raise ValueError(f"not a limit column: {sorted(unknown)}")
    names = list(limits)
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, start=2))
    return await con.fetchrow(
        f"UPDATE users SET {assignments} WHERE username = $1 RETURNING {_USER_COLUMNS}",
        username,
        *(limits[name] for name in names),
    )


async def set_default_model(con: Connection, user_id: int, model: str | None) -> bool:
    """Set (None: clear) the model a user's requests naming none get; False if no such user.

    The users trigger notifies every proxy, so cached keys pick the change up at once.
    """
    row = await con.fetchrow(
        "UPDATE users SET default_model = $2 WHERE id = $1 RETURNING id", user_id, model
    )
    return row is not None


async def insert_key(
    con: Connection,
    user_id: int,
    key_id: str,
    secret_hash: str,
    label: str | None,
    expires_at: datetime | None,
    models: Sequence[str] | None = None,
    apis: Sequence[str] | None = None,
) -> asyncpg.Record:
    row = await con.fetchrow(
        """INSERT INTO api_keys (user_id, key_id, secret_hash, label, expires_at, models, apis)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           RETURNING key_id, label, created_at, expires_at""",
        user_id,
        key_id,
        secret_hash,
        label,
        expires_at,
        list(models) if models is not None else None,
        list(apis) if apis is not None else None,
    )
    assert row is not None
    return row


async def list_keys(con: Connection, username: str | None) -> list[asyncpg.Record]:
    return await con.fetch(
        """SELECT k.key_id, u.username, k.label, k.created_at, k.last_used_at, k.expires_at,
                  k.revoked_at, k.models, k.apis, k.rate_limit, k.rate_window_seconds,
                  k.tokens_per_minute, k.tokens_per_day, k.tokens_per_week, k.tokens_per_month,
                  CASE WHEN k.revoked_at IS NOT NULL AND k.revoked_at <= now() THEN 'revoked'
                       WHEN k.expires_at IS NOT NULL AND k.expires_at <= now() THEN 'expired'
                       WHEN k.revoked_at IS NOT NULL THEN 'retiring'
                       ELSE 'active' END AS state
           FROM api_keys k JOIN users u ON u.id = k.user_id
           WHERE $1::text IS NULL OR u.username = $1
           ORDER BY u.username, k.created_at""",
        username,
    )


async def get_key_owner(con: Connection, key_id: str) -> asyncpg.Record | None:
    return await con.fetchrow(
        """SELECT k.key_id, k.user_id, k.label, k.revoked_at, k.models, k.apis, u.username
           FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_id = $1""",
        key_id,
    )


async def revoke_key(con: Connection, key_id: str, after: timedelta = timedelta(0)) -> bool:
    """Revoke a key now or after a grace period; a key already revoked earlier stays so."""
    row = await con.fetchrow(
        """UPDATE api_keys SET revoked_at = now() + $2::interval
           WHERE key_id = $1 AND (revoked_at IS NULL OR revoked_at > now() + $2::interval)
           RETURNING key_id""",
        key_id,
        after,
    )
    return row is not None


_KEY_RECORDS = """
    SELECT k.key_id, k.secret_hash, k.expires_at, k.revoked_at,
           u.id AS user_id, u.username, u.enabled AS user_enabled,
           u.rate_limit, u.rate_window_seconds, u.max_concurrent, u.max_tokens,
           u.tokens_per_day, u.tokens_per_minute, u.default_model, k.models, k.apis,
           k.rate_limit AS key_rate_limit, k.rate_window_seconds AS key_rate_window_seconds,
           coalesce(k.limits_key, k.key_id) AS limits_key,
           num_nonnulls(k.tokens_per_minute, k.tokens_per_day, k.tokens_per_week,
                        k.tokens_per_month) > 0 AS key_budgeted
    FROM api_keys k JOIN users u ON u.id = k.user_id"""


async def lookup_key(con: Connection, key_id: str) -> KeyRecord | None:
    row = await con.fetchrow(f"{_KEY_RECORDS} WHERE k.key_id = $1", key_id)
    return KeyRecord(**dict(row)) if row is not None else None


async def lookup_keys(con: Connection, key_ids: Sequence[str]) -> list[KeyRecord]:
    """The records of several keys in one query (those that no longer exist are missing)."""
    rows = await con.fetch(f"{_KEY_RECORDS} WHERE k.key_id = ANY($1::text[])", list(key_ids))
    return [KeyRecord(**dict(row)) for row in rows]


async def key_active(con: Connection, key_id: str) -> bool:
    """Whether the key works now: not revoked, not expired, its user enabled."""
    return bool(
        await con.fetchval(
            """SELECT EXISTS (SELECT 1 FROM api_keys k JOIN users u ON u.id = k.user_id
                              WHERE k.key_id = $1 AND u.enabled
                                AND (k.revoked_at IS NULL OR k.revoked_at > now())
                                AND (k.expires_at IS NULL OR k.expires_at > now()))""",
            key_id,
        )
    )


async def touch_keys(con: Connection, key_ids: Sequence[str]) -> None:
    """Record recent use of several keys in one statement (no NOTIFY: last_used_at only)."""
    await con.execute(
        "UPDATE api_keys SET last_used_at = now() WHERE key_id = ANY($1::text[])", list(key_ids)
    )


async def replace_key_hash(con: Connection, key_id: str, old_hash: str, new_hash: str) -> bool:
    """Swap in a hash made with current parameters, unless the key changed meanwhile."""
    row = await con.fetchrow(
        """UPDATE api_keys SET secret_hash = $3
           WHERE key_id = $1 AND secret_hash = $2 RETURNING key_id""",
        key_id,
        old_hash,
        new_hash,
    )
    return row is not None


# Tokens as quotas count them: times the model's weight (migration 0018), rounded up.
_TOKENS = (
    "ceil((coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))"
    " * coalesce(weight, 1))::bigint"
)


async def user_tokens(
    con: Connection,
    user_id: int,
    day_start: datetime,
    minute_start: datetime,
    request_ids: Sequence[str],
    requests_since: datetime,
) -> TokenTotals:
    """One user's tokens since `day_start` and after `minute_start` (one index range scan),
    and which of `request_ids` (requests begun since `requests_since`) have their rows yet."""
    row = await con.fetchrow(
        f"""SELECT t.day, t.minute, t.minute_oldest, s.seen
            FROM (SELECT coalesce(sum({_TOKENS}) FILTER (WHERE created_at >= $2), 0) AS day,
                         coalesce(sum({_TOKENS}) FILTER (WHERE created_at > $3), 0) AS minute,
                         min(created_at) FILTER (WHERE created_at > $3 AND {_TOKENS} > 0)
                             AS minute_oldest
                  FROM llama_requests
                  WHERE user_id = $1
                    AND created_at >= least($2::timestamptz, $3::timestamptz)) AS t,
                 (SELECT coalesce(array_agg(request_id), '{{}}') AS seen
                  FROM llama_requests
                  WHERE user_id = $1 AND created_at >= $5 AND request_id = ANY($4::text[])) AS s""",
        user_id,
        day_start,
        minute_start,
        list(request_ids),
        requests_since,
    )
    assert row is not None
    return TokenTotals(int(row["day"]), int(row["minute"]), row["minute_oldest"],
                       frozenset(row["seen"]))  # fmt: skip


async def quota_usage(
    con: Connection, day_start: datetime, minute_start: datetime, username: str | None
) -> list[asyncpg.Record]:
    """Users with a token quota (or just `username`) and their tokens today and last minute."""
    return await con.fetch(
        f"""SELECT u.username, u.tokens_per_day,
                   coalesce(sum({_TOKENS}) FILTER (WHERE r.created_at >= $1), 0) AS tokens_today,
                   u.tokens_per_minute,
                   coalesce(sum({_TOKENS}) FILTER (WHERE r.created_at > $2), 0)
                       AS tokens_last_minute
            FROM users u
            LEFT JOIN llama_requests r
                   ON r.user_id = u.id
                  AND r.created_at >= least($1::timestamptz, $2::timestamptz)
            WHERE ($3::text IS NULL AND (u.tokens_per_day IS NOT NULL
                                         OR u.tokens_per_minute IS NOT NULL))
               OR u.username = $3
            GROUP BY u.id ORDER BY u.username""",
        day_start,
        minute_start,
        username,
    )


async def ping(con: Connection) -> None:
    await con.fetchval("SELECT 1")


async def usage_daily(con: Connection, since: date, username: str | None) -> list[asyncpg.Record]:
    return await con.fetch(
        """SELECT day, username, requests, errors, prompt_tokens, completion_tokens,
                  bytes_in, bytes_out, p50_ms, p95_ms
           FROM llama_usage_daily
           WHERE day >= $1 AND ($2::text IS NULL OR username = $2)
           ORDER BY day DESC, username NULLS LAST""",
        since,
        username,
    )


async def user_usage_daily(con: Connection, since: date, user_id: int) -> list[asyncpg.Record]:
    """One user's days, as `usage_daily` shows them, of their own rows (by id, not by name)."""
    return await con.fetch(
        f"""SELECT {_USAGE_DAY} AS day, username, count(*) AS requests,
                   count(*) FILTER (WHERE status_code >= 400) AS errors,
                   coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(completion_tokens), 0) AS completion_tokens,
                   coalesce(sum(request_bytes), 0) AS bytes_in,
                   coalesce(sum(response_bytes), 0) AS bytes_out,
                   round(percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1)
                       AS p50_ms,
                   round(percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1)
                       AS p95_ms
            FROM llama_requests
            WHERE user_id = $2 AND created_at >= $1::date::timestamp AT TIME ZONE 'UTC'
            GROUP BY 1, 2 ORDER BY 1 DESC, 2""",
        since,
        user_id,
    )


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
                "llama_requests", records=rows, columns=list(columns), timeout=timeout
            )
    return bool(fresh)


async def prune_audit_batches(con: Connection, before: datetime) -> int:
    """Forget batch ids older than `before` (they only guard replays of recent batches)."""
    result: Any = await con.execute("DELETE FROM llama_audit_batches WHERE written_at < $1", before)
    return int(str(result).rsplit(" ", 1)[-1])


# -- admin tokens: who may sign in to the dashboard -------------------------------------------


async def insert_admin_token(
    con: Connection, token_id: str, secret_hash: str, label: str | None
) -> asyncpg.Record:
    row = await con.fetchrow(
        """INSERT INTO admin_tokens (token_id, secret_hash, label) VALUES ($1, $2, $3)
           RETURNING token_id, label, created_at""",
        token_id,
        secret_hash,
        label,
    )
    assert row is not None
    return row


async def list_admin_tokens(con: Connection) -> list[asyncpg.Record]:
    return await con.fetch(
        """SELECT token_id, label, created_at, last_used_at, revoked_at,
                  CASE WHEN revoked_at IS NULL THEN 'active' ELSE 'revoked' END AS state
           FROM admin_tokens ORDER BY created_at"""
    )


async def lookup_admin_token(con: Connection, token_id: str) -> asyncpg.Record | None:
    """A usable (unrevoked) admin token's hash, to verify a sign-in with."""
    return await con.fetchrow(
        "SELECT token_id, secret_hash FROM admin_tokens WHERE token_id = $1 AND revoked_at IS NULL",
        token_id,
    )


async def admin_token_active(con: Connection, token_id: str) -> bool:
    """Whether a signed-in session's token still stands (asked on every dashboard request)."""
    return bool(
        await con.fetchval(
            "SELECT EXISTS (SELECT 1 FROM admin_tokens WHERE token_id = $1 AND revoked_at IS NULL)",
            token_id,
        )
    )


async def touch_admin_token(con: Connection, token_id: str) -> None:
    """Note a sign-in with the token (its `last_used_at`)."""
    await con.execute("UPDATE admin_tokens SET last_used_at = now() WHERE token_id = $1", token_id)


async def revoke_admin_token(con: Connection, token_id: str) -> bool | None:
    """Revoke an admin token: True, False when it was already revoked, None when unknown."""
    row = await con.fetchrow(
        """UPDATE admin_tokens SET revoked_at = coalesce(revoked_at, now())
           WHERE token_id = $1 RETURNING revoked_at = now() AS revoked_now""",
        token_id,
    )
    return None if row is None else bool(row["revoked_now"])


# -- usage reports: `llama-gate usage` and the dashboard's Overview run the same queries -----

# The UTC day of a row, written exactly as the expression index ix_llama_requests_day_username.
_USAGE_DAY = "((created_at AT TIME ZONE 'UTC')::date)"


async def usage_daily_totals(con: Connection, since: date) -> list[dict[str, Any]]:
    """Per UTC day, everyone together: requests, errors, tokens (prompt tokens served from the
    backend's cache among them), and the percentiles of latency and of time to the first byte
    of the answer (percentiles do not add up across users, so they are computed here rather than
    from llama_usage_daily)."""
    rows = await con.fetch(
        f"""SELECT {_USAGE_DAY} AS day,
                   count(*) AS requests,
                   count(*) FILTER (WHERE status_code >= 400) AS errors,
                   coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(completion_tokens), 0) AS completion_tokens,
                   round(percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1)
                       AS p50_ms,
                   round(percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1)
                       AS p95_ms,
                   round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ttfb_ms)::numeric, 1)
                       AS ttfb_p50_ms,
                   round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ttfb_ms)::numeric, 1)
                       AS ttfb_p95_ms,
                   coalesce(sum(cached_tokens), 0) AS cached_tokens
            FROM llama_requests
            WHERE {_USAGE_DAY} >= $1
            GROUP BY 1 ORDER BY 1 DESC""",
        since,
    )
    # Requests without a valid key count as requests and errors, nothing else.
    strangers = {
        row["day"]: int(row["requests"])
        for row in await con.fetch(
            """SELECT ((minute AT TIME ZONE 'UTC')::date) AS day, sum(requests) AS requests
               FROM llama_unauthenticated WHERE minute >= $1::date GROUP BY 1""",
            since,
        )
    }
    return _with_strangers(rows, strangers)


def _with_strangers(rows: list[asyncpg.Record], strangers: dict[date, int]) -> list[dict[str, Any]]:
    empty = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "p50_ms": None,
             "p95_ms": None, "ttfb_p50_ms": None, "ttfb_p95_ms": None}  # fmt: skip
    days = {row["day"]: dict(row) for row in rows}
    for day, requests in strangers.items():
        into = days.setdefault(day, {"day": day, "requests": 0, "errors": 0, **empty})
        into["requests"] += requests
        into["errors"] += requests
    return sorted(days.values(), key=lambda row: row["day"], reverse=True)


async def usernames(con: Connection, user_ids: Sequence[int]) -> dict[int, str]:
    rows = await con.fetch("SELECT id, username FROM users WHERE id = ANY($1::bigint[])", user_ids)
    return {row["id"]: row["username"] for row in rows}


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
