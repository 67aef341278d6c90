"""Grammar-constrained sampling at a fraction of llama_cpp's cost, as a logits processor.

llama_cpp puts a `grammar` into its sampler chain ahead of top-k, so llama.cpp checks every token
of the vocabulary against the grammar for every token generated: with SmolLM2 (49k tokens) that
makes a token cost 70-100% more CPU (`bench/grammar.py`). llama.cpp's own server avoids that by
checking the likely tokens first, and so does `GrammarFilter` (+15% for a call, nothing for text
after `auto`'s first token): it asks the same grammar
sampler (llama.cpp's, through llama_cpp's bindings) about the `FIRST_LOOK` most likely tokens,
then the `SECOND_LOOK` most likely, and only when none of those fits about the whole vocabulary.
Tokens the grammar refuses get -inf, so the rest of the chain (penalties, top-k, temperature)
chooses among the allowed ones as before.

`lazy` serves tool_choice `auto`: the grammar decides the first token only, and when that token
does not begin a call (`<`) the answer is free text, generated at full speed.

The grammar sampler must be told each token generated (`llama_sampler_accept`); it is told only
tokens it allowed, since llama.cpp aborts the process on one it did not. Should no token fit at
all, the filter stops constraining rather than risk that, and the caller finds no whole call.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import Llama

logger = logging.getLogger(__name__)

FIRST_LOOK = 64
SECOND_LOOK = 1024
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


class GrammarError(ValueError):
    """llama.cpp could not parse the grammar."""


class GrammarFilter:
    """A llama_cpp logits processor that allows only the tokens `gbnf` allows."""

    def __init__(self, llama: Llama, gbnf: str, *, lazy: bool = False) -> None:
        self._llama = llama
        sampler = llama_cpp.llama_sampler_init_grammar(
            llama_cpp.llama_model_get_vocab(llama.model), gbnf.encode(), b"root"
        )
        if not sampler:
            raise GrammarError("llama.cpp refused the grammar")
        self._sampler = sampler
        weakref.finalize(self, llama_cpp.llama_sampler_free, sampler)
        self._lazy = lazy
        self._seen: int | None = None  # tokens of the sequence already accepted (or the prompt)
        self._free = False  # no longer constraining
        self.full_looks = 0  # times the whole vocabulary had to be checked (for tests)

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        generated = len(input_ids)
        if self._seen is None:
            self._seen = generated  # the first call comes right after the prompt
        new = input_ids[self._seen : generated]
        self._seen = generated
        if self._free:
            return scores
        for token in new:
            llama_cpp.llama_sampler_accept(self._sampler, int(token))
            if self._lazy and not self._llama.detokenize([int(token)]).startswith(b"<"):
                self._free = True  # a text answer: nothing more to constrain
                return scores
        for look in (FIRST_LOOK, SECOND_LOOK):
            likely = np.argpartition(scores, -look)[-look:]
            allowed = self._allowed(likely, scores[likely])
            if allowed.any():
                kept = np.full_like(scores, -np.inf)
                kept[likely[allowed]] = scores[likely[allowed]]
                return kept
        self.full_looks += 1
        every = np.arange(len(scores), dtype=np.intc)
        allowed = self._allowed(every, scores)
        if not allowed.any():
            logger.warning("no token fits the grammar; generation goes on unconstrained")
            self._free = True
            return scores
        return np.where(allowed, scores, -np.inf).astype(np.single)

    def _allowed(self, ids: Sequence[int] | npt.NDArray[Any], logits: npt.NDArray[Any]) -> Any:
        """Which of the tokens `ids` the grammar allows next."""
        data = np.recarray((len(ids),), dtype=_TOKEN_DATA)
        data.id[:] = ids
        data.logit[:] = logits
        data.p[:] = 0
        candidates = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=len(ids),
            selected=-1,
            sorted=False,
        )
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(candidates))
        return np.isfinite(data.logit)
