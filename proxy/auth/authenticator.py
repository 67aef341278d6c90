"""API-key authentication: memory first, then Postgres, then argon2id on worker threads.

The steady state is a dictionary lookup: a verified key is cached under a keyed digest (see
`proxy.auth.cache`), so it costs no argon2 and no query until its entry needs re-checking. What an
uncached key costs is bounded, because bad keys arrive in floods:
- a string not shaped like a key is rejected before any query or hash;
- at most `MAX_VERIFICATIONS` lookups+hashes run at once, argon2 on `ARGON2_THREADS` threads,
  and concurrent requests with the same key share one verification;
- a rejected key is remembered for `REJECTED_TTL_SECONDS`;
- an address with `FAILURE_LIMIT` failures in `FAILURE_WINDOW_SECONDS` is answered 429 at once
  for unknown keys (keys that verified before still pass: only their holder can present them).
Every cause of rejection gives the same `InvalidApiKey`, so nothing tells which one it was.
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
from proxy.db import queries
from proxy.db.connect import DatabaseUnavailable
from proxy.db.pool import Database
from proxy.errors import InvalidApiKey, KeyStoreUnavailable, TooManyAuthFailures
from proxy.limits.window import SlidingWindows
from proxy.settings import Secret, Settings

MAX_VERIFICATIONS = 4
ARGON2_THREADS = 2  # the machine's cores; more threads would only queue inside argon2
REJECTED_TTL_SECONDS = 60.0
FAILURE_LIMIT = 20
FAILURE_WINDOW_SECONDS = 10.0
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
    invalidations: int = 0  # notifications (or reconnects) that changed what is trusted


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
        self._slots = asyncio.Semaphore(MAX_VERIFICATIONS)
        self._executor = ThreadPoolExecutor(ARGON2_THREADS, thread_name_prefix="argon2")
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
        if known is None:
            if digest in self._rejected:
                raise self._failed(address)
            if wait_ms := self._failures.blocked_for_ms(
                address, FAILURE_LIMIT, FAILURE_WINDOW_SECONDS
            ):
                self.stats.blocked += 1
                raise TooManyAuthFailures(wait_ms)
        future = self._inflight.get(digest)
        if future is None:
            # A task of its own, so one impatient client cannot cancel a verification others
            # are waiting for.
            future = asyncio.ensure_future(self._verify(digest, parts[0], parts[1], known))
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
        self, digest: bytes, key_id: str, secret: str, known: CachedKey | None
    ) -> Principal:
        async with self._slots:
            verified_hash = known.secret_hash if known is not None else None
            record: queries.KeyRecord | None = None
            for _ in range(RECHECKS):
                generation = self._generation
                checked_at = self._clock()
                try:
                    record = await self._db.run(lambda con: queries.lookup_key(con, key_id))
                except DatabaseUnavailable:
                    if known is not None:
                        return known.principal  # verified recently: serve it while PG is down
                    raise KeyStoreUnavailable() from None
                self.stats.lookups += 1
                if record is None or not _usable(record):
                    self._reject(digest)
                    raise InvalidApiKey()
                if verified_hash is None or not hmac.compare_digest(
                    verified_hash, record.secret_hash
                ):
                    await self._check_argon2(digest, key_id, secret, record.secret_hash)
                    verified_hash = record.secret_hash
                if generation == self._generation:
                    break
                # A revocation or change arrived while we looked: our read may predate it, so
                # look again rather than answer (or cache) what may no longer hold.
        assert record is not None
        principal = Principal(
            record.user_id, record.username, record.key_id, record.rate_limit,
            record.rate_window_seconds, record.max_concurrent, record.max_tokens,
            record.tokens_per_day, record.tokens_per_minute,
        )  # fmt: skip
        # Still changing after the re-checks: answer this request, but have the next one check.
        entry = CachedKey(principal, record.secret_hash, _valid_until(record), checked_at)
        self._cache.put(digest, entry, fresh=generation == self._generation)
        return principal

    async def _check_argon2(self, digest: bytes, key_id: str, secret: str, stored: str) -> None:
        self.stats.argon2 += 1
        loop = asyncio.get_running_loop()
        ok, new_hash = await loop.run_in_executor(
            self._executor, self._check_secret, stored, secret
        )
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
                lambda con: queries.replace_key_hash(con, key_id, old_hash, new_hash)
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
        """Notifications may have been lost: re-check every key on its next use."""
        self._changed()
        self._cache.mark_all_stale()

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
            await self._db.run(lambda con: queries.touch_keys(con, key_ids))
        except DatabaseUnavailable:
            self._touched.update(key_ids)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _valid_until(record: queries.KeyRecord) -> float | None:
    ends = [t.timestamp() for t in (record.expires_at, record.revoked_at) if t is not None]
    return min(ends) if ends else None


def _usable(record: queries.KeyRecord) -> bool:
    until = _valid_until(record)
    return record.user_enabled and (until is None or until > datetime.now(UTC).timestamp())
