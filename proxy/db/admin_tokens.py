"""Admin tokens: who may sign in to the dashboard."""

from __future__ import annotations

import asyncpg

from proxy.db.connect import Connection

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
