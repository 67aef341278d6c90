"""The backend's prompt cache: each conversation's model state, kept between its turns.

llama_cpp.server holds one context. When several people chat at once, each turn replaces the
context of the person before, and without a cache every turn reads the whole conversation again.
Llama asks its cache (`BaseLlamaCache`) for the stored state sharing the longest prefix with each
prompt, loads it, and stores the state it ends with after answering. This class is such a cache,
made for many conversations at once:

- lookups go through a radix tree of token sequences (`backend.prefix_index`), not a scan of every
  stored key;
- a stored state that another one extends (the previous turn of the same conversation) is dropped
  at once: any later request shares at least as many tokens with the newer state, so nothing could
  reuse the older copy;
- states are evicted least recently used first, to stay within a budget in bytes; a state larger
  than the whole budget is not kept at all;
- a state is sized by the tokens in use: llama.cpp serializes only the occupied part of the
  context, and the logits Llama copies along (one row of the vocabulary per token, several times
  the context itself) are cut to one row when the model does not keep logits for every token
  (`keep_scores=False`), since Llama then never reads them after a restore;
- on disk (`directory`), the state's bytes go to one file each and stay until evicted: reading a
  state does not remove it, unlike llama_cpp's `LlamaDiskCache`.

Llama calls it from the model's worker thread, under llama_cpp.server's model lock; `stats` may be
read from any thread.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llama_cpp.llama import LlamaState
from llama_cpp.llama_cache import BaseLlamaCache

from backend.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)

NO_TOKEN = -1  # no token has this id: written past a state's tokens (see `_exact`)


@dataclass(eq=False)
class _Entry:
    key: tuple[int, ...]
    state: LlamaState  # in RAM; on disk its `llama_state` is b"" and the bytes are in `path`
    nbytes: int
    path: Path | None = None


@dataclass(frozen=True)
class CacheStats:
    states: int
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int


class PromptCache(BaseLlamaCache):
    """Conversation states in RAM (or on disk under `directory`) within `capacity_bytes`."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        keep_scores: bool = False,
        directory: Path | None = None,
    ) -> None:
        super().__init__(capacity_bytes)
        self.keep_scores = keep_scores
        self.directory = directory
        self._index: PrefixIndex[_Entry] = PrefixIndex()
        self._lru: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._bytes = 0
        self._names = itertools.count()
        self.hits = self.misses = self.evictions = 0
        if directory is not None:
            # States written by an earlier run cannot be indexed again: their keys lived in RAM.
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def cache_size(self) -> int:
        return self._bytes

    def stats(self) -> CacheStats:
        return CacheStats(
            len(self._lru), self._bytes, self.capacity_bytes, self.hits, self.misses, self.evictions
        )

    # -- BaseLlamaCache ------------------------------------------------------------------------

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        found = self._index.longest(_tokens(key))
        if found is None:
            self.misses += 1
            raise KeyError("no stored state shares a prefix with this prompt")
        stored_key, entry, _ = found
        self._lru.move_to_end(stored_key)
        self.hits += 1
        return self._load(entry)

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._index.longest(_tokens(key)) is not None

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        tokens = _tokens(key)
        state = _exact(value, self.keep_scores)
        nbytes = _size(state)
        if nbytes > self.capacity_bytes:
            logger.info(
                "not caching a state of %d tokens: its %d bytes exceed the whole budget of %d",
                len(tokens),
                nbytes,
                self.capacity_bytes,
            )
            self._drop(tokens)
            return
        if self._extended(tokens):
            return  # a stored state already covers every prefix this one does
        self._drop(tokens)
        entry = self._keep(tokens, state, nbytes)
        for older, _ in self._index.put(tokens, entry):
            self._drop(older)  # the previous turns of this conversation
        self._lru[tokens] = entry
        self._bytes += nbytes
        while self._bytes > self.capacity_bytes:
            oldest = next(iter(self._lru))
            self._drop(oldest)
            self.evictions += 1

    def clear(self) -> None:
        for key in list(self._lru):
            self._drop(key)

    # -- internals -----------------------------------------------------------------------------

    def _extended(self, tokens: tuple[int, ...]) -> bool:
        """Whether a stored key starts with all of `tokens` and goes on (so it covers them)."""
        found = self._index.longest(tokens)
        return found is not None and found[2] == len(tokens) and len(found[0]) > len(tokens)

    def _keep(self, key: tuple[int, ...], state: LlamaState, nbytes: int) -> _Entry:
        if self.directory is None:
            return _Entry(key, state, nbytes)
        path = self.directory / f"{next(self._names)}.state"
        path.write_bytes(state.llama_state)
        shell = LlamaState(
            input_ids=state.input_ids,
            scores=state.scores,
            n_tokens=state.n_tokens,
            llama_state=b"",
            llama_state_size=state.llama_state_size,
            seed=state.seed,
        )
        return _Entry(key, shell, nbytes, path)

    def _load(self, entry: _Entry) -> LlamaState:
        if entry.path is None:
            return entry.state
        shell = entry.state
        return LlamaState(
            input_ids=shell.input_ids,
            scores=shell.scores,
            n_tokens=shell.n_tokens,
            llama_state=entry.path.read_bytes(),
            llama_state_size=shell.llama_state_size,
            seed=shell.seed,
        )

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._lru.pop(key, None)
        if entry is None:
            return
        self._index.remove(key)
        self._bytes -= entry.nbytes
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)


def _tokens(key: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(token) for token in key)


def _exact(state: LlamaState, keep_scores: bool) -> LlamaState:
    """The state with its token list made exact, and without logits Llama never reads back.

    Llama compares a stored state's whole `input_ids` array (the context's length, stale past
    `n_tokens`) with the prompt, so stale tokens could make a state look longer than it is: they
    are overwritten with an id no prompt holds.
    """
    input_ids = state.input_ids.copy()
    input_ids[state.n_tokens :] = NO_TOKEN
    return LlamaState(
        input_ids=input_ids,
        # One row broadcasts to the rows Llama writes back; without logits for every token it
        # never reads them.
        scores=state.scores if keep_scores or not len(state.scores) else state.scores[-1:].copy(),
        n_tokens=state.n_tokens,
        llama_state=state.llama_state,
        llama_state_size=state.llama_state_size,
        seed=state.seed,
    )


def _size(state: LlamaState) -> int:
    return int(state.llama_state_size) + int(state.scores.nbytes) + int(state.input_ids.nbytes)
