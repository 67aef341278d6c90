"""One decision of a sliding window, as this process holds it: the requests it admitted, and the
lease of places more (migration 0019) it admits on its own until the lease ends.

Times are this process's monotonic clock; what Postgres is told back is the lease's grant time
(Postgres's clock) plus the monotonic time elapsed since the call that got it was sent. That is
never earlier than the admission really was, so an admission given back leaves the window no
earlier than it should: the limit holds whatever the two clocks read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from proxy.db.limits import LeaseGrant, LeaseReturn
from proxy.window import Admission

MAX_LEASE = 64  # places leased at once, at most: a lease given back costs a row per admission
LONGEST_LEASE_MS = 5000  # never longer than a twelfth of the window either
SHORTEST_LEASE_MS = 20  # shorter windows lease nothing


def lease_ms(window_seconds: int) -> int:
    """How long a lease of a `window_seconds` window lasts (0: leases are not worth it)."""
    ms = min(LONGEST_LEASE_MS, window_seconds * 1000 // 12)
    return ms if ms >= SHORTEST_LEASE_MS else 0


@dataclass(eq=False)
class Lease:
    sent: float  # when the call that decided it was sent
    received: float  # when its answer came
    until: float  # places left may be taken before this
    grant: LeaseGrant
    left: int  # leased places not taken yet
    used: list[float] = field(default_factory=list)  # offsets from `sent` of its admissions

    @classmethod
    def of(cls, grant: LeaseGrant, sent: float, received: float, ttl_ms: int) -> Lease:
        lease = cls(sent, received, sent + ttl_ms / 1000, grant, grant.leased)
        lease.used.extend([0.0] * grant.granted)  # admitted as Postgres decided: at granted_at
        return lease

    def admitted(self, index: int) -> Admission:
        """The answer to the `index`-th (0-based) request the decision itself admitted."""
        return Admission(True, max(self.grant.free - index - 1, 0), self.grant.reset_ms, 0)

    def take(self, now: float) -> Admission | None:
        """Admit one more request from the lease, or None when it is used up or over."""
        if self.left <= 0 or now >= self.until:
            return None
        self.left -= 1
        self.used.append(now - self.sent)
        reset_ms = max(1, self.grant.reset_ms - int((now - self.received) * 1000))
        return Admission(True, max(self.grant.free - len(self.used), 0), reset_ms, 0)

    def given_back(self) -> LeaseReturn | None:
        """What Postgres is told when the lease ends (None: nothing was leased)."""
        ends = self.grant.lease_ends
        if ends is None:
            return None
        start = self.grant.granted_at
        used_at = [min(start + timedelta(seconds=offset), ends) for offset in self.used]
        return LeaseReturn(ends, self.grant.granted + self.grant.leased, used_at)

    def next_extra(self, now: float) -> int:
        """Places to lease next time: twice what this one admitted when it was asked again
        soon (a user sending one request after another), none for an occasional request."""
        if now - self.sent > 2 * (self.until - self.sent) or self.until == self.sent:
            return 0
        return min(MAX_LEASE, max(4, 2 * len(self.used)))
