"""A task that runs in the background for as long as a block does: cancelled, and waited for,
as the block ends, however it ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any


@asynccontextmanager
async def background(work: Coroutine[Any, Any, object]) -> AsyncIterator[asyncio.Task[object]]:
    """`work` as a task while this is entered; on the way out it is cancelled and awaited."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
