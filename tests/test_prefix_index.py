"""`backend.prefix_index`: the longest shared prefix, found by walking a radix tree."""

from __future__ import annotations

import random

from backend.prefix_index import PrefixIndex


def _brute_force(stored: dict[tuple[int, ...], str], query: tuple[int, ...]) -> int:
    best = 0
    for key in stored:
        n = 0
        while n < min(len(key), len(query)) and key[n] == query[n]:
            n += 1
        best = max(best, n)
    return best


def test_the_longest_shared_prefix_wins_and_ties_go_to_the_shortest_key() -> None:
    index: PrefixIndex[str] = PrefixIndex()
    index.put((1, 2, 3, 4, 5), "long")
    index.put((1, 2, 9), "branch")
    index.put((7, 8), "other")
    assert index.longest((1, 2, 3, 4, 6)) == ((1, 2, 3, 4, 5), "long", 4)
    assert index.longest((1, 2, 9, 9)) == ((1, 2, 9), "branch", 3)
    # Two keys share (1, 2) with the query: the shorter one is cheaper to restore.
    assert index.longest((1, 2, 0)) == ((1, 2, 9), "branch", 2)
    assert index.longest((5,)) is None
    assert index.longest(()) is None


def test_put_reports_the_stored_keys_it_extends() -> None:
    index: PrefixIndex[str] = PrefixIndex()
    assert index.put((1, 2), "turn 1") == []
    assert index.put((1, 2, 3, 4), "turn 2") == [((1, 2), "turn 1")]
    assert index.put((1, 5), "a branch") == []  # shares (1,), extends nothing stored
    assert len(index) == 3


def test_remove_merges_the_tree_back_and_lookups_stay_right() -> None:
    index: PrefixIndex[str] = PrefixIndex()
    index.put((1, 2, 3), "a")
    index.put((1, 2, 4), "b")
    index.put((1,), "c")
    assert index.remove((1, 2, 3)) == "a"
    assert index.remove((1, 2, 3)) is None
    assert index.remove((1, 2)) is None  # a node, but nothing stored there
    assert index.longest((1, 2, 3)) == ((1, 2, 4), "b", 2)
    assert index.longest((1, 3)) == ((1,), "c", 1)
    assert index.get((1, 2, 4)) == "b"
    assert sorted(index.items()) == [((1,), "c"), ((1, 2, 4), "b")]
    index.clear()
    assert len(index) == 0
    assert index.longest((1,)) is None


def test_it_agrees_with_a_brute_force_scan_on_random_conversations() -> None:
    rng = random.Random(14)
    index: PrefixIndex[str] = PrefixIndex()
    stored: dict[tuple[int, ...], str] = {}
    for step in range(400):
        base = rng.choice([*stored, ()]) if stored else ()
        key = base[: rng.randint(0, len(base))] + tuple(rng.randint(0, 5) for _ in range(4))
        if rng.random() < 0.2 and stored:
            gone = rng.choice(list(stored))
            assert index.remove(gone) == stored.pop(gone)
        else:
            index.put(key, f"v{step}")
            stored[key] = f"v{step}"
        query = (*key[: rng.randint(0, len(key))], rng.randint(0, 5))
        found = index.longest(query)
        expected = _brute_force(stored, query)
        if expected == 0:
            assert found is None
        else:
            assert found is not None
            found_key, value, shared = found
            assert shared == expected
            assert stored[found_key] == value
            assert found_key[:shared] == query[:shared]
    assert len(index) == len(stored)
    assert dict(index.items()) == stored
