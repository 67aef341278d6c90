"""Users and their API keys: made, listed, changed, revoked, and looked up to authenticate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from proxy.db.connect import Connection


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


async def usernames(con: Connection, user_ids: Sequence[int]) -> dict[int, str]:
    rows = await con.fetch("SELECT id, username FROM users WHERE id = ANY($1::bigint[])", user_ids)
    return {row["id"]: row["username"] for row in rows}
