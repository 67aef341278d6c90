"""Turns at a scarce resource (Postgres lookups, argon2), taken round-robin among keys.

Key verification shares its work out by who asks: lookups by client address, argon2 by key id.
When every turn is taken, the key served least recently goes next, one request at a time, so a
flood queued under one key (an address, a key id) delays another key's first request by one
turn at most, however long the flood's own queue is. A caller may also say how many of its
key's requests may run at once and how many may wait; past that it is refused (`Busy`) at once,
which is what a flood's excess costs.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Busy(Exception):
    """Too many requests of this key are waiting already."""


@dataclass(eq=False)
class _Waiter:
    most: int | None  # how many of its key's requests may run at once, itself included
    granted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Turns(Generic[K]):
    def __init__(self, width: int) -> None:
        self._width = width  # turns at once, for all keys together
        self.busy = 0  # turns taken
        self._running: Counter[K] = Counter()
        self._waiting: dict[K, deque[_Waiter]] = {}  # keys with requests waiting
        # When each active key last got a turn; a key with nothing running or waiting is
        # forgotten, so it counts as never served (as a newcomer) when it comes back.
        self._served: dict[K, int] = {}
        self._turns = itertools.count(1)

    @asynccontextmanager
    async def turn(
        self, key: K, *, most: int | None = None, waiting: int | None = None
    ) -> AsyncIterator[None]:
        """Hold a turn for `key`; `most` of key's at once, `waiting` at most waiting, or `Busy`."""
        await self._take(key, most, waiting)
        try:
            yield
        finally:
            self._give_back(key)

    async def _take(self, key: K, most: int | None, waiting: int | None) -> None:
        queue = self._waiting.get(key)
        if not self._waiting and self._may_run(key, most):
            self._run(key)
            return
        if waiting is not None and queue is not None and len(queue) >= waiting:
            raise Busy
        waiter = _Waiter(most)
        self._waiting.setdefault(key, deque()).append(waiter)
        self._grant()  # a free turn may be this key's (others may wait on their own limits)
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self._give_back(key)  # granted just as the caller left: pass it on
            else:
                self._forget(key, waiter)
            raise

    def _may_run(self, key: K, most: int | None) -> bool:
        return self.busy < self._width and (most is None or self._running[key] < most)

    def _run(self, key: K) -> None:
        self.busy += 1
        self._running[key] += 1
        self._served[key] = next(self._turns)

    def _give_back(self, key: K) -> None:
        self.busy -= 1
        self._running[key] -= 1
        if self._running[key] <= 0:
            del self._running[key]
            if key not in self._waiting:
                self._served.pop(key, None)
        self._grant()

    def _grant(self) -> None:
        """Give free turns to waiting keys, the one served least recently first."""
        while self.busy < self._width:
            best: K | None = None
            for key in list(self._waiting):
                queue = self._waiting[key]
                while queue and queue[0].granted.done():  # its caller left
                    queue.popleft()
                if not queue:
                    self._drop(key)
                elif self._may_run(key, queue[0].most) and (
                    best is None or self._served.get(key, 0) < self._served.get(best, 0)
                ):
                    best = key
            if best is None:
                return
            queue = self._waiting[best]
            waiter = queue.popleft()
            if not queue:
                del self._waiting[best]
            self._run(best)
            waiter.granted.set_result(None)

    def _forget(self, key: K, waiter: _Waiter) -> None:
        queue = self._waiting.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                self._drop(key)

    def _drop(self, key: K) -> None:
        """`key` has nobody waiting any more."""
        del self._waiting[key]
        if key not in self._running:
            self._served.pop(key, None)
