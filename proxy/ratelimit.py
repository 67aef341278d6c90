"""Per-user sliding-window rate limits, exact across every proxy process sharing the database.

Each request is one call of `llama_gate_admit` (migration 0002), which serialises one user's
decisions under an advisory lock, so N processes admit exactly LIMIT requests per window between
them. While Postgres is unreachable the limits are enforced from this process's own window,
which also holds every admission made while Postgres was up, so an outage never lifts a limit.
"""

from __future__ import annotations

import logging

from proxy import store
from proxy.db import DatabaseUnavailable
from proxy.errors import RateLimited
from proxy.keycache import Principal
from proxy.pool import Database
from proxy.settings import Settings
from proxy.store import Admission
from proxy.window import SlidingWindows

log = logging.getLogger(__name__)


def format_duration(ms: int) -> str:
    """OpenAI's spelling of a reset time: `250ms`, `1.5s`, `6m0s`."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, seconds = divmod(ms / 1000, 60)
    text = f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class RateLimiter:
    def __init__(self, settings: Settings, database: Database) -> None:
        self._default_limit = settings.rate_limit
        self._default_window = settings.rate_window_seconds
        self._db = database
        self._local: SlidingWindows[int] = SlidingWindows()
        self._degraded = False

    def limits_for(self, principal: Principal) -> tuple[int, int]:
        return (
            principal.rate_limit or self._default_limit,
            principal.rate_window_seconds or self._default_window,
        )

    async def admit(self, principal: Principal) -> dict[str, str]:
        """Admit one request, returning its `x-ratelimit-*` headers, or raise `RateLimited`."""
        limit, window = self.limits_for(principal)
        user = principal.user_id
        try:
            admission = await self._db.run(
                lambda con: store.admit_request(con, user, limit, window * 1000)
            )
        except DatabaseUnavailable:
            if not self._degraded:
                self._degraded = True
                log.warning("rate limits are enforced per process until Postgres returns")
            admission = self._local.try_acquire(user, limit, window)
        else:
            self._degraded = False
            if admission.admitted:
                self._local.add(user, window)  # so an outage starts from what we admitted
        headers = _headers(limit, admission)
        if not admission.admitted:
            raise RateLimited(limit, window, admission.retry_after_ms, headers)
        return headers


def _headers(limit: int, admission: Admission) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(admission.remaining),
        "x-ratelimit-reset-requests": format_duration(admission.reset_ms),
    }
