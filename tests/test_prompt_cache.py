"""`backend.prompt_cache.PromptCache`: one state per conversation, LRU within a byte budget,
in RAM or on disk. States here are real `LlamaState` objects holding made-up bytes; the
tests against the real model are in test_prompt_cache_model.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from llama_cpp.llama import LlamaState

from backend.prompt_cache import NO_TOKEN, PromptCache

N_CTX, VOCAB = 64, 10
MB = 1 << 20


def _state(tokens: tuple[int, ...], nbytes: int = MB, rows: int = 8) -> LlamaState:
    ids = np.full(N_CTX, 3, dtype=np.intc)  # stale tokens past n_tokens, as Llama leaves them
    ids[: len(tokens)] = tokens
    return LlamaState(
        input_ids=ids,
        scores=np.ones((rows, VOCAB), dtype=np.single),
        n_tokens=len(tokens),
        llama_state=bytes([len(tokens) % 256]) * nbytes,
        llama_state_size=nbytes,
        seed=7,
    )


def test_a_conversation_keeps_only_its_latest_state() -> None:
    cache = PromptCache(100 * MB)
    cache[(1, 2, 3)] = _state((1, 2, 3))
    cache[(1, 2, 3, 4, 5)] = _state((1, 2, 3, 4, 5))  # its next turn
    assert cache.stats().states == 1
    got = cache[(1, 2, 3, 4, 5, 6, 7)]
    assert got.n_tokens == 5
    # A state that a stored one extends is useless as well: nothing is added.
    cache[(1, 2, 3)] = _state((1, 2, 3))
    assert cache.stats().states == 1


def test_each_prompt_gets_the_state_sharing_most_of_it() -> None:
    cache = PromptCache(100 * MB)
    cache[(9, 1, 1)] = _state((9, 1, 1))
    cache[(9, 2, 2, 2)] = _state((9, 2, 2, 2))
    assert cache[(9, 2, 2, 5)].n_tokens == 4
    assert cache[(9, 1, 1, 8)].n_tokens == 3
    assert (9, 4) in cache  # shares the 9
    assert (8,) not in cache
    with pytest.raises(KeyError):
        cache[(8, 1)]
    assert cache.stats().hits == 2
    assert cache.stats().misses == 1


def test_the_budget_evicts_the_least_recently_used() -> None:
    cache = PromptCache(3 * MB + 3 * 4096)
    for first in (1, 2, 3):
        cache[(first, 0)] = _state((first, 0))
    cache[(1, 0, 5)]
    cache[(4, 0)] = _state((4, 0))
    stats = cache.stats()
    assert stats.bytes <= stats.capacity_bytes
    assert stats.states == 3
    assert stats.evictions == 1
    assert (2, 0) not in cache  # the least recently used went
    assert cache[(1, 0)].n_tokens == 2


def test_a_state_larger_than_the_budget_is_not_kept() -> None:
    cache = PromptCache(2 * MB)
    cache[(1,)] = _state((1,), nbytes=MB)
    cache[(2,)] = _state((2,), nbytes=3 * MB)
    assert cache.stats().states == 1
    assert (2,) not in cache


def test_a_state_keeps_one_row_of_logits_and_exact_tokens() -> None:
    cache = PromptCache(100 * MB)
    cache[(5, 6)] = _state((5, 6), rows=8)
    got = cache[(5, 6)]
    assert got.scores.shape == (1, VOCAB)  # broadcasts to the rows Llama writes back
    assert list(got.input_ids[:2]) == [5, 6]
    assert set(got.input_ids[2:].tolist()) == {NO_TOKEN}  # no stale token to match a prompt
    assert cache.stats().bytes == MB + VOCAB * 4 + N_CTX * 4
    kept = PromptCache(100 * MB, keep_scores=True)
    kept[(5, 6)] = _state((5, 6), rows=8)
    assert kept[(5, 6)].scores.shape == (8, VOCAB)


def test_on_disk_a_state_survives_being_read_and_goes_with_its_file(tmp_path: Path) -> None:
    directory = tmp_path / "states"
    directory.mkdir()
    (directory / "left-from-last-run.state").write_bytes(b"x")
    cache = PromptCache(3 * MB, directory=directory)
    assert list(directory.iterdir()) == []  # an earlier run's states cannot be indexed again
    cache[(1, 2)] = _state((1, 2))
    for _ in range(2):  # llama_cpp's LlamaDiskCache would lose it at the first read
        got = cache[(1, 2, 3)]
        assert got.llama_state == _state((1, 2)).llama_state
    assert len(list(directory.iterdir())) == 1
    cache[(1, 2, 3, 4)] = _state((1, 2, 3, 4))  # the next turn replaces it, file and all
    assert len(list(directory.iterdir())) == 1
    for first in (7, 8, 9):
        cache[(first,)] = _state((first,))
    assert len(list(directory.iterdir())) == cache.stats().states <= 3
    cache.clear()
    assert list(directory.iterdir()) == []
    assert cache.stats().bytes == 0
