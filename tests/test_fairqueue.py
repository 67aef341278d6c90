"""The turn order of `FairQueue`: round-robin across users, FIFO within one, newcomers first."""

from __future__ import annotations

from proxy.upstream.fairqueue import FairQueue


def _queue(*items: tuple[str, str]) -> FairQueue[str]:
    queue: FairQueue[str] = FairQueue()
    for user, item in items:
        queue.hold(user)
        queue.push(user, item)
    return queue


def _drain(queue: FairQueue[str]) -> list[str]:
    order = []
    while (item := queue.pop(lambda _: True)) is not None:
        order.append(item)
    return order


def test_backlogged_users_take_turns_one_request_each() -> None:
    queue = _queue(*[("a", f"a{i}") for i in range(4)], ("b", "b0"), ("b", "b1"), ("c", "c0"))
    assert _drain(queue) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_a_newcomer_goes_before_users_already_served() -> None:
    queue = _queue(*[("heavy", f"h{i}") for i in range(20)])
    assert queue.pop(lambda _: True) == "h0"  # now being served: heavy's turn is recorded
    queue.hold("light")
    queue.push("light", "l0")
    assert queue.pop(lambda _: True) == "l0"
    assert len(queue) == 19


def test_turns_are_forgotten_when_a_user_has_nothing_held() -> None:
    queue = _queue(("a", "a0"), ("b", "b0"))
    assert queue.pop(lambda _: True) == "a0"
    queue.release("a")  # a's request finished and a holds nothing: a starts afresh
    queue.hold("a")
    queue.push("a", "a1")
    # b has waited since before a's turn, but a holding nothing counts as never served; ties
    # go to whoever became active first, which is now b.
    assert _drain(queue) == ["b0", "a1"]


def test_only_eligible_items_are_served_and_others_keep_their_place() -> None:
    queue = _queue(("a", "a-big"), ("a", "a-small"), ("b", "b-big"))
    assert queue.pop(lambda item: item.endswith("small")) == "a-small"
    assert queue.pop(lambda item: item.endswith("small")) is None
    assert _drain(queue) == ["b-big", "a-big"]  # a was served last


def test_held_counts_queued_and_in_flight_and_a_retry_goes_first() -> None:
    queue = _queue(("a", "a0"), ("a", "a1"))
    assert queue.held("a") == 2
    first = queue.pop(lambda _: True)
    assert queue.held("a") == 2  # a0 is in flight now, still held
    queue.push("a", "a0-retry", front=True)
    queue.remove("a", "a1")
    assert _drain(queue) == ["a0-retry"]
    assert first == "a0"
    queue.release("a")
    queue.release("a")
    assert queue.held("a") == 0
    assert list(queue.waiting()) == []


def test_a_request_served_without_queueing_counts_as_a_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.hold("heavy")
    queue.served("heavy")  # found the slot free
    for user, item in (("heavy", "h1"), ("light", "l0")):
        queue.hold(user)
        queue.push(user, item)
    assert _drain(queue) == ["l0", "h1"]


def test_turns_go_round_groups_first_then_their_users() -> None:
    """Three flooding users of one group and a lone user of another share the slot half and
    half; in the group its three users take turns."""
    queue: FairQueue[str] = FairQueue()
    for user, team in (("a", "big"), ("b", "big"), ("c", "big"), ("d", "small")):
        for i in range(4):
            queue.hold(user, team)
            queue.push(user, f"{user}{i}")
    order = [queue.pop(lambda _: True) for _ in range(8)]
    assert order == ["a0", "d0", "b0", "d1", "c0", "d2", "a1", "d3"]
    # A user in no group is a team of their own: with the group, it is one turn each.
    queue.hold("e")
    queue.push("e", "e0")
    assert queue.pop(lambda _: True) == "e0"


def test_a_groups_turn_is_forgotten_once_its_users_hold_nothing() -> None:
    queue: FairQueue[str] = FairQueue()
    for user, team in (("b", "h"), ("a", "g")):
        queue.hold(user, team)
        queue.push(user, f"{user}0")
    assert [queue.pop(lambda _: True) for _ in range(2)] == ["b0", "a0"]  # g served last
    queue.release("a")  # g holds nothing now
    queue.hold("b", "h")
    queue.push("b", "b1")
    queue.hold("c", "g")  # g's other user arrives: g counts as never served, not as last
    queue.push("c", "c0")
    assert _drain(queue) == ["c0", "b1"]
