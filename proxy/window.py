"""Sliding windows of event times held in this process: the fallback rate limiter while Postgres
is unreachable, and the per-address limit on failed authentications.

A window is exact, not a fixed bucket: at most `limit` events in any `window`-second span. Each
key's deque keeps only the times still inside its window, so memory follows the limits, and the
number of keys is capped so a flood of new keys (addresses) cannot grow it without bound.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Admission:
    """One sliding-window decision: `reset_ms` is when the oldest admission in the window leaves
    it (so `remaining` grows again); `retry_after_ms` is 0 when admitted."""

    admitted: bool
    remaining: int
    reset_ms: int
    retry_after_ms: int


class SlidingWindows(Generic[K]):
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self._clock = clock
        self._max_keys = max_keys
        self._events: dict[K, deque[float]] = {}

    def _live(self, key: K, window: float, now: float) -> deque[float]:
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= self._max_keys:
                del self._events[next(iter(self._events))]  # the longest-known key
            events = self._events[key] = deque()
        while events and events[0] <= now - window:
            events.popleft()
        return events

    def try_acquire(self, key: K, limit: int, window: float) -> Admission:
        """Record an event if fewer than `limit` happened in the last `window` seconds."""
        now = self._clock()
        events = self._live(key, window, now)
        if len(events) < limit:
            events.append(now)
            return Admission(True, limit - len(events), _ms(events[0] + window - now), 0)
        # Admission reopens when enough of the oldest events have left the window.
        wait = _ms(events[len(events) - limit] + window - now)
        return Admission(False, 0, wait, wait)

    def add(self, key: K, window: float) -> None:
        """Record an event unconditionally (one admitted elsewhere, or a failure)."""
        now = self._clock()
        self._live(key, window, now).append(now)

    def blocked_for_ms(self, key: K, limit: int, window: float) -> int:
        """Milliseconds until `key` is under `limit` again; 0 when it is now."""
        if key not in self._events:
            return 0
        now = self._clock()
        events = self._live(key, window, now)
        if len(events) < limit:
            return 0
        return _ms(events[len(events) - limit] + window - now)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
