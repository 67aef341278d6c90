"""API-key authentication: memory first, then Postgres, then argon2id on worker threads.

The steady state is a dictionary lookup: a verified key is cached under a keyed digest (see
`proxy.auth.cache`), so it costs no argon2 and no query until its entry needs re-checking.

Bad keys arrive in floods, so what they cost is bounded, and it is kept apart from what good
users wait for:
- known keys (verified recently, in the cache) are re-checked in a lane of their own (its own
  slots, its own argon2 thread), so a cached user never queues behind unknown keys;
- an unknown key costs one lookup, taken round-robin by client address, and no argon2 unless
  its key id exists and is usable; argon2 turns go round-robin by key id on one thread (the
  other core stays free), so a new valid key waits for at most one hash per key id under
  attack, and at most `KEY_WAITING` wrong secrets of one key id wait at once (429 beyond);
- a string not shaped like a key is rejected before any query or hash; a rejected key is
  remembered for `REJECTED_TTL_SECONDS`; concurrent requests with one key share one check;
- an address with `FAILURE_LIMIT` failures in `FAILURE_WINDOW_SECONDS` still has its unknown
  keys checked (a valid key behind the same NAT as a flood must get through), but one at a
  time, with at most `BLOCKED_WAITING` waiting: beyond that it is answered 429 without work.
Every cause of rejection gives the same `InvalidApiKey`, so nothing tells which one it was.

After the revocation listener (re)connects, notifications may have been missed: every cached
key is re-checked at once, in one query, so a revocation made meanwhile takes effect as the
listener is back, and no holder waits for the re-check on their next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.auth.apikeys import KeyHasher, parse_key
from proxy.auth.cache import CachedKey, KeyCache, Principal, RejectedKeys
from proxy.auth.turns import Busy, Turns
from proxy.db import accounts
from proxy.db.connect import DatabaseUnavailable
from proxy.db.pool import Database
from proxy.errors import InvalidApiKey, KeyStoreUnavailable, TooManyAuthFailures
from proxy.settings import Secret, Settings
from proxy.window import SlidingWindows

KNOWN_CHECKS = 4  # re-checks of cached keys at once (each one query)
LOOKUPS = 4  # lookups of unknown keys at once, of the pool's connections
REJECTED_TTL_SECONDS = 60.0
FAILURE_LIMIT = 20
FAILURE_WINDOW_SECONDS = 10.0
BLOCKED_WAITING = 8  # unknown keys of an address over the failure limit that may wait at once
KEY_WAITING = 8  # wrong secrets of one key id that may wait for argon2 at once
LAST_USED_INTERVAL_SECONDS = 60.0
RECHECKS = 2  # lookups one verification makes at most when revocations keep arriving


def presented_key(request: web.Request) -> str | None:
    """The key from `Authorization: Bearer <key>` or, failing that, `x-api-key`."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return request.headers.get("x-api-key")


@dataclass
class AuthStats:
    """Counters that show where the work went (tests read them; metrics may later)."""

    cache_hits: int = 0
    lookups: int = 0  # queries for keys not fresh in the cache
    argon2: int = 0
    rejected: int = 0
    blocked: int = 0  # answered 429 without any work
    single_file: int = 0  # unknown keys of an address over the failure limit, checked one by one
    known_lookups: int = 0  # re-checks of cached keys past their freshness, in their own lane
    known_waits: int = 0  # ... that found their lane full and waited
    invalidations: int = 0  # notifications (or reconnects) that changed what is trusted
    rechecks: int = 0  # every cached key confirmed at once, after the listener (re)connected


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        hasher: KeyHasher | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = database
        self._hasher = hasher or KeyHasher()
        self._clock = clock
        self._digest_key = secrets.token_bytes(32)  # per process: digests are useless elsewhere
        self._cache = KeyCache(settings.auth_cache_seconds, settings.auth_stale_seconds, clock)
        self._rejected = RejectedKeys(REJECTED_TTL_SECONDS, clock)
        self._failures: SlidingWindows[str] = SlidingWindows(clock)
        # Known keys' lane: their own slots and thread, never shared with unknown keys.
        self._known_slots = asyncio.Semaphore(KNOWN_CHECKS)
        self._known_executor = ThreadPoolExecutor(1, thread_name_prefix="argon2-known")
        # Unknown keys: lookups shared out by address, argon2 by key id, on one thread so a
        # flood of wrong secrets can take one core at most.
        self._lookups: Turns[str] = Turns(LOOKUPS)
        self._hashes: Turns[str] = Turns(1)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="argon2")
        self._inflight: dict[bytes, asyncio.Future[Principal]] = {}
        self._generation = 0  # bumped by every invalidation; see _verify
        self._touched: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self.stats = AuthStats()

    async def authenticate(self, presented: str | None, client: str | None) -> Principal:
        """The caller behind `presented`, or `InvalidApiKey` / `TooManyAuthFailures` /
        `KeyStoreUnavailable` (Postgres is down and the key was not verified recently)."""
        address = client or "unknown"
        parts = parse_key(presented) if presented else None
        if presented is None or parts is None:
            raise self._failed(address)
        digest = hashlib.blake2b(presented.encode(), key=self._digest_key, digest_size=32).digest()
        known = self._cache.get(digest)
        if known is not None and self._cache.is_fresh(known):
            self.stats.cache_hits += 1
            self._touched.add(known.principal.key_id)
            return known.principal
        if known is None and digest in self._rejected:
            raise self._failed(address)
        future = self._inflight.get(digest)
        if future is None:
            # A task of its own, so one impatient client cannot cancel a verification others
            # are waiting for.
            check = self._verify(digest, parts[0], parts[1], known, address)
            future = asyncio.ensure_future(check)
            self._inflight[digest] = future
            future.add_done_callback(lambda done: self._settled(digest, done))
        try:
            principal = await asyncio.shield(future)
        except InvalidApiKey:
            raise self._failed(address) from None
        self._touched.add(principal.key_id)
        return principal

    def _failed(self, address: str) -> InvalidApiKey:
        self.stats.rejected += 1
        self._failures.add(address, FAILURE_WINDOW_SECONDS)
        return InvalidApiKey()

    def _settled(self, digest: bytes, done: asyncio.Future[Principal]) -> None:
        if self._inflight.get(digest) is done:  # not a newer check begun after an invalidation
            del self._inflight[digest]
        if not done.cancelled():
            done.exception()  # retrieved here, so a result nobody awaited is not logged

    async def _verify(
        self, digest: bytes, key_id: str, secret: str, known: CachedKey | None, address: str
    ) -> Principal:
        verified_hash = known.secret_hash if known is not None else None
        record: accounts.KeyRecord | None = None
        for _ in range(RECHECKS):
            generation = self._generation
            checked_at = self._clock()
            try:
                record = await self._lookup(key_id, known, address)
            except DatabaseUnavailable:
                if known is not None:
                    return known.principal  # verified recently: serve it while PG is down
                raise KeyStoreUnavailable() from None
            self.stats.lookups += 1
            if record is None or not _usable(record):
                self._reject(digest)
                raise InvalidApiKey()
            if verified_hash is None or not hmac.compare_digest(verified_hash, record.secret_hash):
                await self._check_argon2(digest, key_id, secret, record.secret_hash, known)
                verified_hash = record.secret_hash
            if generation == self._generation:
                break
            # A revocation or change arrived while we looked: our read may predate it, so
            # look again rather than answer (or cache) what may no longer hold.
        assert record is not None
        # Still changing after the re-checks: answer this request, but have the next one check.
        entry = CachedKey(_principal(record), record.secret_hash, _valid_until(record), checked_at)
        self._cache.put(digest, entry, fresh=generation == self._generation)
        return entry.principal

    async def _lookup(
        self, key_id: str, known: CachedKey | None, address: str
    ) -> accounts.KeyRecord | None:
        """The key's record, looked up in its lane: known keys' own, or unknown keys' turns."""
        if known is not None:
            self.stats.known_lookups += 1
            if self._known_slots.locked():
                self.stats.known_waits += 1
            async with self._known_slots:
                return await self._db.run(lambda con: accounts.lookup_key(con, key_id))
        # Over the failure limit, an address's unknown keys are checked one at a time: a flood
        # from it costs one lookup at a time, and a valid key from the same address still
        # gets its turn.
        blocked_ms = self._failures.blocked_for_ms(address, FAILURE_LIMIT, FAILURE_WINDOW_SECONDS)
        if blocked_ms:
            self.stats.single_file += 1
        try:
            async with self._lookups.turn(
                address,
                most=1 if blocked_ms else None,
                waiting=BLOCKED_WAITING if blocked_ms else None,
            ):
                return await self._db.run(lambda con: accounts.lookup_key(con, key_id))
        except Busy:
            self.stats.blocked += 1
            raise TooManyAuthFailures(blocked_ms) from None

    async def _check_argon2(
        self, digest: bytes, key_id: str, secret: str, stored: str, known: CachedKey | None
    ) -> None:
        loop = asyncio.get_running_loop()
        if known is not None:  # the hash changed since it was verified: rare, and not queued
            self.stats.argon2 += 1
            ok, new_hash = await loop.run_in_executor(
                self._known_executor, self._check_secret, stored, secret
            )
        else:
            try:
                async with self._hashes.turn(key_id, waiting=KEY_WAITING):
                    self.stats.argon2 += 1
                    ok, new_hash = await loop.run_in_executor(
                        self._executor, self._check_secret, stored, secret
                    )
            except Busy:
                self.stats.blocked += 1
                raise TooManyAuthFailures(1000) from None
        if not ok:
            self._reject(digest)
            raise InvalidApiKey()
        if new_hash is not None:
            self._spawn(self._replace_hash(key_id, stored, new_hash))

    def _reject(self, digest: bytes) -> None:
        self._cache.discard(digest)  # never again a fallback while Postgres is down
        self._rejected.add(digest)

    def _check_secret(self, secret_hash: str, secret: str) -> tuple[bool, str | None]:
        """On a worker thread: verify, and re-hash when the stored parameters are outdated."""
        if not self._hasher.verify(secret_hash, secret):
            return False, None
        if self._hasher.needs_rehash(secret_hash):
            return True, self._hasher.hash(Secret(secret))
        return True, None

    async def _replace_hash(self, key_id: str, old_hash: str, new_hash: str) -> None:
        with contextlib.suppress(DatabaseUnavailable):  # the next verification re-hashes again
            await self._db.run(
                lambda con: accounts.replace_key_hash(con, key_id, old_hash, new_hash)
            )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- invalidation, called by the NOTIFY listener --------------------------------------

    def invalidate(self, notice: str) -> None:
        """Forget what a `key:<key id>` or `user:<user id>` notification says has changed."""
        self._changed()
        kind, _, ident = notice.partition(":")
        if kind == "key":
            self._cache.forget_key(ident)
        elif kind == "user" and ident.isdigit():
            self._cache.forget_user(int(ident))
        else:
            self._cache.mark_all_stale()

    def invalidate_all(self) -> None:
        """Notifications may have been lost (the listener just connected): re-check every key.

        Every cached key is confirmed at once, in the background; until then (or if that fails)
        each is re-checked on its next use.
        """
        self._changed()
        self._cache.mark_all_stale()
        self._db.retry_now()  # the listener reached Postgres: the pool need not wait to retry
        self._spawn(self._recheck_cached())

    async def _recheck_cached(self) -> None:
        entries = self._cache.entries()
        if not entries:
            return
        generation, checked_at = self._generation, self._clock()
        key_ids = sorted({entry.principal.key_id for _, entry in entries})
        try:
            records = await self._db.run(lambda con: accounts.lookup_keys(con, key_ids))
        except DatabaseUnavailable:
            return  # each key is re-checked on its next use instead
        if generation != self._generation:
            return  # a change arrived as we read: the next use of each key looks again
        self.stats.rechecks += 1
        by_id = {record.key_id: record for record in records}
        for digest, entry in entries:
            record = by_id.get(entry.principal.key_id)
            if record is None or not _usable(record):
                self._reject(digest)
            elif hmac.compare_digest(entry.secret_hash, record.secret_hash):
                fresh = CachedKey(
                    _principal(record), record.secret_hash, _valid_until(record), checked_at
                )
                self._cache.replace(digest, entry, fresh)
            # A changed hash stays stale: the next use verifies the secret against it.

    def _changed(self) -> None:
        self._generation += 1
        self.stats.invalidations += 1
        self._rejected.clear()  # e.g. a re-enabled user's keys must work again at once
        # Checks under way may have read the key before the change: requests arriving from now
        # on start a check of their own instead of sharing theirs (which look again, see
        # _verify, before answering the requests already waiting on them).
        self._inflight.clear()

    # -- lazy last_used_at ----------------------------------------------------------------

    async def write_last_used_forever(self) -> None:
        while True:
            await asyncio.sleep(LAST_USED_INTERVAL_SECONDS)
            await self.flush_last_used()

    async def flush_last_used(self) -> None:
        """Write `last_used_at` for the keys used since the last flush, in one statement."""
        if not self._touched:
            return
        key_ids, self._touched = sorted(self._touched), set()
        try:
            await self._db.run(lambda con: accounts.touch_keys(con, key_ids))
        except DatabaseUnavailable:
            self._touched.update(key_ids)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._known_executor.shutdown(wait=False, cancel_futures=True)


def _principal(record: accounts.KeyRecord) -> Principal:
    return Principal(
        record.user_id, record.username, record.key_id, record.rate_limit,
        record.rate_window_seconds, record.max_concurrent, record.max_tokens,
        record.tokens_per_day, record.tokens_per_minute, record.default_model,
        tuple(record.models) if record.models is not None else None,
        frozenset(record.apis) if record.apis is not None else None,
        record.key_rate_limit, record.key_rate_window_seconds, record.key_budgeted,
        record.limits_key,
    )  # fmt: skip


def _valid_until(record: accounts.KeyRecord) -> float | None:
    ends = [t.timestamp() for t in (record.expires_at, record.revoked_at) if t is not None]
    return min(ends) if ends else None


def _usable(record: accounts.KeyRecord) -> bool:
    until = _valid_until(record)
    return record.user_enabled and (until is None or until > datetime.now(UTC).timestamp())
