"""Round-robin turns: a key's long queue delays another key's first request by one turn at most,
a key may be held to one at a time, and what waits past a bound is refused at once."""

from __future__ import annotations

import asyncio

import pytest

from proxy.auth.turns import Busy, Turns


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_newcomer_goes_ahead_of_a_queue_of_another_key() -> None:
    turns: Turns[str] = Turns(1)
    order: list[str] = []
    release = asyncio.Event()

    async def work(key: str, name: str) -> None:
        async with turns.turn(key):
            order.append(name)
            await release.wait()

    flood = [asyncio.create_task(work("flood", f"flood-{n}")) for n in range(20)]
    await _settle()
    newcomer = asyncio.create_task(work("newcomer", "newcomer"))
    await _settle()
    assert order == ["flood-0"]  # one turn: the flood's first holds it
    release.set()
    await asyncio.gather(*flood, newcomer)
    assert order[:3] == ["flood-0", "newcomer", "flood-1"]  # next in line, not 20th


async def test_a_key_held_to_one_at_a_time_leaves_the_other_turns_to_others() -> None:
    turns: Turns[str] = Turns(4)
    running: dict[str, int] = {"blocked": 0, "other": 0}
    peak: dict[str, int] = {"blocked": 0, "other": 0}
    release = asyncio.Event()

    async def work(key: str, most: int | None) -> None:
        async with turns.turn(key, most=most):
            running[key] += 1
            peak[key] = max(peak[key], running[key])
            await release.wait()
            running[key] -= 1

    tasks = [asyncio.create_task(work("blocked", 1)) for _ in range(6)]
    tasks += [asyncio.create_task(work("other", None)) for _ in range(3)]
    await _settle()
    assert running == {"blocked": 1, "other": 3}
    release.set()
    await asyncio.gather(*tasks)
    assert peak == {"blocked": 1, "other": 3}
    assert turns.busy == 0


async def test_past_the_waiting_bound_a_key_is_refused_at_once() -> None:
    turns: Turns[str] = Turns(1)
    release = asyncio.Event()

    async def work(key: str) -> None:
        async with turns.turn(key, waiting=2):
            await release.wait()

    held = [asyncio.create_task(work("a")) for _ in range(3)]  # one runs, two wait
    await _settle()
    with pytest.raises(Busy):
        await work("a")
    other = asyncio.create_task(work("b"))  # another key is not refused for a's queue
    await _settle()
    release.set()
    await asyncio.gather(*held, other)


async def test_a_waiter_that_leaves_takes_no_turn_with_it() -> None:
    turns: Turns[str] = Turns(1)
    release = asyncio.Event()
    served: list[str] = []

    async def work(key: str) -> None:
        async with turns.turn(key):
            served.append(key)
            await release.wait()

    first = asyncio.create_task(work("a"))
    await _settle()
    leaver = asyncio.create_task(work("b"))
    last = asyncio.create_task(work("c"))
    await _settle()
    leaver.cancel()
    await _settle()
    release.set()
    await asyncio.gather(first, last)
    assert leaver.cancelled()
    assert served == ["a", "c"]
    assert turns.busy == 0
