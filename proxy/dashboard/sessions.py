"""Signed-in dashboard sessions, held in this process's memory, and the sign-in rate limit.

A session is created by signing in with an admin token and named by a random 256-bit cookie
value; only a digest of it is kept, so the table holds nothing a browser could present. Sessions
end after `IDLE_SECONDS` without a request, after `LIFETIME_SECONDS` in any case, on sign-out,
and (checked by the guard on every request) as soon as their admin token is revoked. A restart
forgets them all: admins sign in again. Each session has its own CSRF token, which every action
must carry.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.window import SlidingWindows

IDLE_SECONDS = 2 * 3600.0
LIFETIME_SECONDS = 12 * 3600.0
MAX_SESSIONS = 1000  # past this the oldest goes: admins are few, a flood of sign-ins is not
# Sign-in attempts, counted whether they succeed or not: per client address, and for everyone
# together (each attempt may cost an argon2 verification; through an SSH tunnel every admin
# comes from 127.0.0.1 anyway).
ATTEMPTS_PER_ADDRESS = 10
ATTEMPTS_OVERALL = 60
ATTEMPT_WINDOW_SECONDS = 300.0


@dataclass
class Session:
    token_id: str  # the admin token, or a user's API key id, it was opened with (public)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    started: float = 0.0
    seen: float = 0.0
    notices: list[str] = field(default_factory=list)  # shown once on the next page
    # A user's own session (opened with an API key): their usage page, nothing of an admin's.
    user_id: int | None = None
    username: str | None = None
    # Opened with a key of limited access (`KeyRecord.restricted`): it manages no keys.
    scoped: bool = False

    def take_notices(self) -> list[str]:
        notices, self.notices = self.notices, []
        return notices


def _digest(cookie: str) -> bytes:
    return hashlib.sha256(cookie.encode()).digest()


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: dict[bytes, Session] = {}

    def open(
        self,
        token_id: str,
        user_id: int | None = None,
        username: str | None = None,
        scoped: bool = False,
    ) -> tuple[str, Session]:
        """A new session for `token_id` (an admin's; a user's with `user_id`): the cookie value to
        hand the browser, and the session."""
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]  # the oldest
        cookie = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(
            token_id, started=now, seen=now, user_id=user_id, username=username, scoped=scoped
        )
        self._sessions[_digest(cookie)] = session
        return cookie, session

    def get(self, cookie: str | None) -> Session | None:
        """The live session named by `cookie`, now seen again; None when there is none."""
        if not cookie:
            return None
        digest = _digest(cookie)
        session = self._sessions.get(digest)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > IDLE_SECONDS or now - session.started > LIFETIME_SECONDS:
            del self._sessions[digest]
            return None
        session.seen = now
        return session

    def close(self, cookie: str | None) -> None:
        if cookie:
            self._sessions.pop(_digest(cookie), None)

    def close_token(self, token_id: str) -> None:
        """End every session opened with `token_id` (it was revoked)."""
        for digest in [d for d, s in self._sessions.items() if s.token_id == token_id]:
            del self._sessions[digest]


class SignInLimiter:
    """At most `ATTEMPTS_PER_ADDRESS` sign-in attempts per address (and `ATTEMPTS_OVERALL` in
    all) in any `ATTEMPT_WINDOW_SECONDS`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_address: SlidingWindows[str] = SlidingWindows(clock, max_keys=10_000)
        self._overall: SlidingWindows[str] = SlidingWindows(clock, max_keys=1)

    def attempt(self, address: str) -> int:
        """Count an attempt from `address`: 0 when allowed, else seconds until one is."""
        window = ATTEMPT_WINDOW_SECONDS
        wait_ms = max(
            self._overall.blocked_for_ms("", ATTEMPTS_OVERALL, window),
            self._by_address.blocked_for_ms(address, ATTEMPTS_PER_ADDRESS, window),
        )
        if wait_ms:
            return -(-wait_ms // 1000)
        self._overall.add("", window)
        self._by_address.add(address, window)
        return 0
