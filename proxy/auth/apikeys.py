"""API keys: generation, parsing and argon2id hashing. No secret is ever compared with `==`.

A key reads `lgk_<key id>_<secret>`: the prefix makes leaked keys easy to recognise (and to scan
for), the 16-hex-digit key id is public and is what lookups and logs use, and the secret is 32
random bytes from `secrets` (256 bits), of which only an argon2id hash is stored.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from proxy.settings import Secret

KEY_PREFIX = "lgk_"
_KEY_RE = re.compile(r"^lgk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class NewKey:
    key_id: str
    secret: Secret
    full: Secret


def generate_key() -> NewKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    full = f"{KEY_PREFIX}{key_id}_{secret}"
    return NewKey(key_id=key_id, secret=Secret(secret), full=Secret(full))


def parse_key(presented: str) -> tuple[str, str] | None:
    """Split a presented key into (key id, secret), or None when it is not shaped like one."""
    match = _KEY_RE.match(presented)
    return (match.group(1), match.group(2)) if match else None


class KeyHasher:
    """argon2id with parameters sized for high-entropy secrets.

    Argon2's memory and time costs exist to slow down guessing of low-entropy passwords. A 256-bit
    random secret cannot be guessed at any cost setting, so the hash only has to be one-way; cheap
    parameters (t=1, m=8 MiB, p=1: a few ms) keep a cache miss fast and a flood of bad keys from
    eating the CPU. If policy ever demands more, raise them here: `needs_rehash` reports old
    hashes and the proxy rewrites them on the next successful verification.
    """

    def __init__(self, time_cost: int = 1, memory_cost_kib: int = 8192, parallelism: int = 1):
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost_kib, parallelism=parallelism
        )

    def hash(self, secret: Secret) -> str:
        return self._hasher.hash(secret.reveal())

    def verify(self, secret_hash: str, secret: str) -> bool:
        try:
            return self._hasher.verify(secret_hash, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, secret_hash: str) -> bool:
        return self._hasher.check_needs_rehash(secret_hash)
