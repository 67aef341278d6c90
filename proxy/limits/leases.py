"""One decision of a sliding window, as this process holds it: the requests it admitted, and the
lease of places more (migration 0019) it admits on its own until the lease ends.

What Postgres is told back is, for each admission, the lease's grant time (Postgres's clock)
plus the time elapsed here since the call that got it was sent. That must never be earlier than
the admission really was, or the admission would leave the window early. So elapsed time is the
larger of two clocks, one that keeps counting while the host is suspended (`CLOCK_BOOTTIME`,
where there is one; a plain monotonic clock stops) and the wall clock, with a margin for clocks
running at slightly different rates; and a lease is used only while that stamp stays inside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

from proxy.db.limits import LeaseGrant, LeaseReturn
from proxy.window import Admission

MAX_LEASE = 64  # places leased at once, at most: a lease given back costs a row per admission
LONGEST_LEASE_MS = 5000  # never longer than a twelfth of the window either
SHORTEST_LEASE_MS = 20  # shorter windows lease nothing
RATE_MARGIN = 1e-3  # elapsed time stretched by this (NTP slews clocks by at most 5e-4) ...
MARGIN_SECONDS = 1e-3  # ... plus this
_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def clock() -> float:
    """Seconds, counting on while the host is suspended where the platform can."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


def lease_ms(window_seconds: int) -> int:
    """How long a lease of a `window_seconds` window lasts (0: leases are not worth it)."""
    ms = min(LONGEST_LEASE_MS, window_seconds * 1000 // 12)
    return ms if ms >= SHORTEST_LEASE_MS else 0


def _stamp_offset(elapsed: float) -> float:
    return elapsed * (1 + RATE_MARGIN) + MARGIN_SECONDS


@dataclass(eq=False)
class Lease:
    sent: float  # `clock()` when the call that decided it was sent
    sent_wall: float  # `time.time()` then
    received: float  # `clock()` when its answer came
    ttl: float  # seconds
    grant: LeaseGrant
    left: int  # leased places not taken yet
    used: list[float] = field(default_factory=list)  # offsets from `sent` of those taken

    @classmethod
    def of(
        cls, grant: LeaseGrant, sent: float, sent_wall: float, received: float, ttl_ms: int
    ) -> Lease:
        return cls(sent, sent_wall, received, ttl_ms / 1000, grant, grant.leased)

    @property
    def until(self) -> float:
        """`clock()` time after which nothing more is taken from it: the last stamp, margin
        included, still falls inside the lease."""
        return self.sent + (self.ttl - MARGIN_SECONDS) / (1 + RATE_MARGIN) - MARGIN_SECONDS

    def admitted(self, index: int) -> Admission:
        """The answer to the `index`-th (0-based) request the decision itself admitted."""
        return Admission(True, max(self.grant.free - index - 1, 0), self.grant.reset_ms, 0)

    def take(self, now: float) -> Admission | None:
        """Admit one more request from the lease, or None when it is used up or over.

        Its headers say what the window held when the lease was granted, less what the lease
        admitted: never more places than are left (admissions leaving the window meanwhile are
        counted at the next decision); once the oldest one counted has left, the reset is the
        lease's end, when the next decision will know."""
        if self.left <= 0:
            return None
        elapsed = max(now - self.sent, time.time() - self.sent_wall)
        if self.sent + elapsed >= self.until:
            return None
        self.left -= 1
        self.used.append(_stamp_offset(elapsed))
        reset_ms = self.grant.reset_ms - int((now - self.received) * 1000)
        if reset_ms <= 0:
            reset_ms = int((self.until - self.sent - elapsed) * 1000)
        remaining = max(self.grant.free - self.grant.granted - len(self.used), 0)
        return Admission(True, remaining, max(1, reset_ms), 0)

    def given_back(self) -> LeaseReturn | None:
        """What Postgres is told when the lease ends (None: nothing was leased)."""
        ends = self.grant.lease_ends
        if ends is None:
            return None
        start = self.grant.granted_at
        used_at = [min(start + timedelta(seconds=offset), ends) for offset in self.used]
        return LeaseReturn(ends, self.grant.leased, used_at)

    def next_extra(self, now: float) -> int:
        """Places to lease next time: twice what this one admitted when it was asked again
        soon (a user sending one request after another), none for an occasional request."""
        if self.ttl <= 0 or now - self.sent > 2 * self.ttl:
            return 0
        return min(MAX_LEASE, max(4, 2 * (self.grant.granted + len(self.used))))
