"""What the proxy remembers about keys: verified keys (positive) and rejected ones (negative).

Entries are found by a keyed BLAKE2b digest of the full presented key, never by the key itself,
so a memory dump shows no usable key. A positive entry is *fresh* for `fresh_seconds` after
Postgres last confirmed it; past that it is re-checked (one query, no argon2 unless the hash
changed), but may still be used for up to `stale_seconds` while Postgres is unreachable.
Notifications remove entries by key id or user id; a listener reconnect marks all stale.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    user_id: int
    username: str
    key_id: str
    rate_limit: int | None  # per-user overrides; None means the proxy's default
    rate_window_seconds: int | None
    max_concurrent: int | None = None
    max_tokens: int | None = None
    tokens_per_day: int | None = None  # token quotas; None means none
    tokens_per_minute: int | None = None
    default_model: str | None = None  # for requests naming none (POST /setModel); None: server's
    models: tuple[str, ...] | None = None  # the key's scope: model names or globs; None: all
    apis: frozenset[str] | None = None  # the APIs the key may use (`proxy.routes.APIS`); None: all
    key_rate_limit: int | None = None  # the key's own request limit per window (None: none)
    key_rate_window_seconds: int | None = None
    key_budgeted: bool = False  # the key has token budgets of its own (`proxy.limits.budgets`)
    limits_key: str = ""  # whose request window it shares: the first key of its rotations

    def may_use(self, model: str) -> bool:
        """Whether the key's scope covers `model`: a name or glob of it matches (case-sensitive)."""
        return self.models is None or any(fnmatchcase(model, glob) for glob in self.models)


@dataclass
class CachedKey:
    principal: Principal
    secret_hash: str
    valid_until: float | None  # epoch seconds: expiry or scheduled revocation, whichever is first
    verified_at: float  # monotonic time Postgres last confirmed the key


class KeyCache:
    def __init__(
        self,
        fresh_seconds: float,
        stale_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        self._fresh = fresh_seconds
        self._stale = max(stale_seconds, fresh_seconds)
        self._clock = clock
        self._max = max_entries
        self._entries: OrderedDict[bytes, CachedKey] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes) -> CachedKey | None:
        """The entry if it may still be used at all (fresh, or stale within the stale window)."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        past_use = entry.valid_until is not None and entry.valid_until <= time.time()
        if past_use or self._clock() - entry.verified_at > self._stale:
            del self._entries[digest]
            return None
        return entry

    def is_fresh(self, entry: CachedKey) -> bool:
        return self._clock() - entry.verified_at <= self._fresh

    def put(self, digest: bytes, entry: CachedKey, fresh: bool = True) -> None:
        """Remember a verified key; `fresh=False` makes its next use re-check it first."""
        if not fresh:
            entry.verified_at = min(entry.verified_at, self._clock() - self._fresh - 1)
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def discard(self, digest: bytes) -> None:
        self._entries.pop(digest, None)

    def entries(self) -> list[tuple[bytes, CachedKey]]:
        """Every entry as it is now (a re-check of all of them reads Postgres meanwhile)."""
        return list(self._entries.items())

    def replace(self, digest: bytes, old: CachedKey, new: CachedKey) -> None:
        """Put `new` in place of `old`, unless the entry changed (or went) since it was read."""
        if self._entries.get(digest) is old:
            self._entries[digest] = new

    def forget_key(self, key_id: str) -> None:
        self._forget(lambda p: p.key_id == key_id)

    def forget_user(self, user_id: int) -> None:
        self._forget(lambda p: p.user_id == user_id)

    def _forget(self, match: Callable[[Principal], bool]) -> None:
        for digest in [d for d, e in self._entries.items() if match(e.principal)]:
            del self._entries[digest]

    def mark_all_stale(self) -> None:
        """Re-check every entry on its next use (notifications may have been missed)."""
        for entry in self._entries.values():
            entry.verified_at = min(entry.verified_at, self._clock() - self._fresh - 1)


class RejectedKeys:
    """Digests of keys recently rejected, so repeating a bad key costs no query and no argon2."""

    def __init__(
        self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic,
        max_entries: int = 50_000,
    ) -> None:  # fmt: skip
        self._ttl = ttl_seconds
        self._clock = clock
        self._max = max_entries
        self._until: OrderedDict[bytes, float] = OrderedDict()

    def __contains__(self, digest: bytes) -> bool:
        until = self._until.get(digest)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[digest]
            return False
        return True

    def add(self, digest: bytes) -> None:
        self._until[digest] = self._clock() + self._ttl
        self._until.move_to_end(digest)
        while len(self._until) > self._max:
            self._until.popitem(last=False)

    def clear(self) -> None:
        self._until.clear()
