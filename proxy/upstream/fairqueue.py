"""Per-user FIFO queues served round-robin: who gets the next free backend slot.

Each user's requests wait in their own FIFO. When a slot frees, the user served least recently
goes next, and a user with nothing in flight or queued counts as never served. So a newcomer goes
ahead of everyone already being served, and users who all keep requests waiting take turns one
request each, however many each has waiting: a user with 20 requests queued delays another user's
single request by at most the one request already running on that slot.

Users may belong to a team (their group, `proxy.limits.budgets`): then turns go round the teams
first, the team served least recently next, and within it to its user served least recently. A
user in no team is a team of their own, so a group of three flooding users shares the model with
a lone user as one user would.

Fairness is counted in requests, not tokens; `max_tokens` caps what one request can cost.
A user's (and a team's) turn position is forgotten once they have nothing in flight or queued,
which keeps the state as small as the set of active users.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Team:
    held: int = 0  # its users' requests queued or in flight
    last_turn: int = 0  # 0: not served since it became active


@dataclass(eq=False)
class _User(Generic[T]):
    team: _Team
    team_key: Hashable
    waiting: deque[T] = field(default_factory=deque)
    held: int = 0  # queued plus in flight: what the per-user concurrency cap counts
    last_turn: int = 0  # 0: not served since they became active


class FairQueue(Generic[T]):
    """Waiting items per user; `pop` picks by least recent service among eligible items."""

    def __init__(self) -> None:
        self._users: dict[Hashable, _User[T]] = {}
        self._teams: dict[Hashable, _Team] = {}
        self._turns = itertools.count(1)

    def held(self, user: Hashable) -> int:
        """How many of the user's requests are queued or in flight."""
        state = self._users.get(user)
        return state.held if state is not None else 0

    def hold(self, user: Hashable, team: Hashable | None = None) -> None:
        """Count a request of `user` (of `team`; None: a team of their own) until `release`.
        A user already active stays in the team they were in."""
        state = self._users.get(user)
        if state is None:
            key = ("user", user) if team is None else ("team", team)
            state = self._users[user] = _User(self._teams.setdefault(key, _Team()), key)
        state.held += 1
        state.team.held += 1

    def release(self, user: Hashable) -> None:
        state = self._users[user]
        state.held -= 1
        state.team.held -= 1
        if state.held == 0:
            del self._users[user]
        if state.team.held == 0:
            self._teams.pop(state.team_key, None)

    def served(self, user: Hashable) -> None:
        """Record a turn of a held request of `user` that got a free slot without queueing."""
        state = self._users[user]
        state.last_turn = state.team.last_turn = next(self._turns)

    def push(self, user: Hashable, item: T, front: bool = False) -> None:
        """Queue a held request; `front` puts it before the user's others (a retry)."""
        waiting = self._users[user].waiting
        if front:
            waiting.appendleft(item)
        else:
            waiting.append(item)

    def remove(self, user: Hashable, item: T) -> None:
        """Take a waiting item out (its client left or it timed out)."""
        state = self._users.get(user)
        if state is not None and item in state.waiting:
            state.waiting.remove(item)

    def pop(self, eligible: Callable[[T], bool]) -> T | None:
        """The next item to serve among those `eligible` says may use the free slot, or None.

        Each user's first eligible item competes; the team served least recently wins, and in
        it the user served least recently (ties go to the user who became active first); the
        turn is recorded for both.
        """
        best: tuple[tuple[int, int], _User[T], T] | None = None
        for state in self._users.values():  # insertion order: who became active first
            rank = (state.team.last_turn, state.last_turn)
            if best is not None and rank >= best[0]:
                continue
            item = next((i for i in state.waiting if eligible(i)), None)
            if item is not None:
                best = (rank, state, item)
        if best is None:
            return None
        _, state, item = best
        state.waiting.remove(item)
        state.last_turn = state.team.last_turn = next(self._turns)
        return item

    def waiting(self) -> Iterator[T]:
        """Every queued item, in no particular order."""
        for state in self._users.values():
            yield from state.waiting

    def __len__(self) -> int:
        return sum(len(state.waiting) for state in self._users.values())
