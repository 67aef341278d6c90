"""Admin tokens: what signs an admin in to the dashboard. Shaped and hashed like API keys.

A token reads `lga_<token id>_<secret>`: another prefix than API keys (`lgk_`), so neither is
mistaken for the other, by people or by secret scanners; the 16-hex-digit token id is public
(it is what `list-admin-tokens`, `revoke-admin-token` and the log show); the secret is 32 random
bytes, of which only an argon2id hash (`proxy.auth.apikeys.KeyHasher`) is stored.
"""

from __future__ import annotations

import re
import secrets

from proxy.auth.apikeys import NewKey
from proxy.settings import Secret

TOKEN_PREFIX = "lga_"  # noqa: S105 - a prefix, no secret
_TOKEN_RE = re.compile(r"^lga_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
TOKEN_ID_RE = re.compile(r"^[0-9a-f]{16}$")


def generate_admin_token() -> NewKey:
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return NewKey(token_id, Secret(secret), Secret(f"{TOKEN_PREFIX}{token_id}_{secret}"))


def parse_admin_token(presented: str) -> tuple[str, str] | None:
    """Split a presented token into (token id, secret), or None when it is not shaped like one."""
    match = _TOKEN_RE.match(presented.strip())
    return (match.group(1), match.group(2)) if match else None
