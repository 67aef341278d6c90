"""Making and replacing API keys: the admin CLI and the dashboard do it the same way, here.

Only a key's id and its argon2id hash are stored; the full key exists only in the `NewKey`
returned, for the caller to show once. A revocation reaches every proxy within a second through
the `api_keys` triggers' NOTIFY (migration 0002).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from proxy.auth.apikeys import KeyHasher, NewKey, generate_key
from proxy.db import accounts, limits
from proxy.db.connect import Connection


class KeyNotFound(Exception):
    """No API key has that id."""


class KeyAlreadyRevoked(Exception):
    """The key is revoked already: there is nothing left to rotate."""


async def issue_key(
    con: Connection,
    user_id: int,
    label: str | None,
    expires_in: timedelta | None,
    models: Sequence[str] | None = None,
    apis: Sequence[str] | None = None,
) -> NewKey:
    """Make a key for the user and store only its id and argon2id hash, and its scope (the
    models and APIs it may use; None: all)."""
    key = generate_key()
    expires_at = datetime.now(UTC) + expires_in if expires_in else None
    secret_hash = KeyHasher().hash(key.secret)
    await accounts.insert_key(
        con, user_id, key.key_id, secret_hash, label, expires_at, models, apis
    )
    return key


async def rotate_key(
    con: Connection, key_id: str, grace: timedelta, expires_in: timedelta | None
) -> tuple[str, NewKey]:
    """A new key for the owner of `key_id`, which stops working now or after `grace`.

    Returns the owner's username and the new key; raises `KeyNotFound` or `KeyAlreadyRevoked`.
    """
    async with con.transaction():
        old = await accounts.get_key_owner(con, key_id)
        if old is None:
            raise KeyNotFound(key_id)
        if old["revoked_at"] is not None and old["revoked_at"] <= datetime.now(UTC):
            raise KeyAlreadyRevoked(key_id)
        # The new key may do what the old one could: the same scope.
        new = await issue_key(
            con, old["user_id"], old["label"], expires_in, old["models"], old["apis"]
        )
        await limits.carry_key_limits(con, key_id, new.key_id)
        await accounts.revoke_key(con, key_id, after=grace)
        return old["username"], new
