"""Turns at the event loop for the work a large body costs, so that it never stalls a stream.

Putting an 8 MiB body together from its pieces, parsing and checking it, or serializing it for
a backend, holds the one event loop for a few milliseconds at a time (CPython's JSON readers and
pydantic hold the GIL throughout, so a thread would not help). Several such bodies arriving
together would run back to back, and every other user's stream would wait for all of them.
Instead each such step takes its turn here: one at a time, each after a pass of the loop, so
between two of them everything else that is ready runs. A stream then waits for at most one step,
however many large bodies arrive. Small bodies, whose steps take microseconds, never wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")

LARGE_BODY_BYTES = 256 * 1024  # parsed in well under a millisecond: no turn needed


class Lane:
    def __init__(self, large: int = LARGE_BODY_BYTES) -> None:
        self._large = large
        self._turn = asyncio.Lock()

    @asynccontextmanager
    async def turn(self, size: int) -> AsyncIterator[None]:
        """Held while one heavy step for a body of `size` bytes runs (at once for a small one)."""
        if size < self._large:
            yield
            return
        async with self._turn:
            # Two passes of the loop first: what arrived while the last step ran is read in
            # the first and handed on by the task waiting for it in the second.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            yield

    async def step(self, size: int, work: Callable[[], T]) -> T:
        """`work()` (one heavy step for a body of `size` bytes), run at its turn."""
        if size < self._large:  # at once, without the context manager's cost (most requests)
            return work()
        async with self.turn(size):
            return work()
