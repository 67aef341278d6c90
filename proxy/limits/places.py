"""Concurrency places: how many requests each user has in flight or queued in this process.

A place is taken before anything else is spent on a request (its body, its quota, its rate
limit) and given back when the request ends, however it ends. Taking one is a check and an
increment with no await in between, so parallel requests can never all pass the check. When
several processes share the backends' slots (`proxy.cluster.slots`), the cap is counted again
across all of them as a request joins the wait for a slot.
"""

from __future__ import annotations

from collections.abc import Hashable

from proxy.errors import TooManyConcurrent


class Places:
    def __init__(self) -> None:
        self._held: dict[Hashable, int] = {}

    def take(self, user: Hashable, cap: int, whose: str | None = None) -> None:
        """Hold one more place for `user` (or a group, `whose` naming it), or raise
        `TooManyConcurrent` at `cap`."""
        held = self._held.get(user, 0)
        if held >= cap:
            raise TooManyConcurrent(cap, whose)
        self._held[user] = held + 1

    def give_back(self, user: Hashable) -> None:
        held = self._held[user] - 1
        if held:
            self._held[user] = held
        else:
            del self._held[user]

    def held(self, user: Hashable) -> int:
        return self._held.get(user, 0)

    def by_user(self) -> dict[Hashable, int]:
        """Every user with a request in flight or queued, and how many (for the dashboard)."""
        return dict(self._held)
