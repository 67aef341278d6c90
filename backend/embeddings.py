"""Embeddings without slowing generation down.

llama_cpp.server can only embed with a model loaded `embedding=True`, and that mode makes this
machine generate ~3x slower (measured: 72 vs 25 tokens/s with SmolLM2), and a causal model then
answers one vector per token instead of one per input. So embeddings get their own context on
the same GGUF file, opened on first use with mean pooling: the weights are memory-mapped, so the
two share them, and only the (small) embedding context is extra. One such context at a time,
for the model last asked for; a lock serialises its use, as llama.cpp contexts are not
thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama


class Embedder:
    def __init__(self, paths: Mapping[str, str], n_ctx: int, n_threads: int) -> None:
        self._paths = dict(paths)  # alias -> GGUF path
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._lock = threading.Lock()
        self._alias: str | None = None
        self._llama: Llama | None = None

    def embed(self, alias: str, text: str | list[str]) -> dict[str, Any]:
        """OpenAI's embeddings answer for `text` (blocking: run it in a worker thread)."""
        with self._lock:
            if self._alias != alias or self._llama is None:
                self._llama = None  # let the previous context go before opening another
                self._llama = Llama(
                    model_path=self._paths[alias],
                    embedding=True,
                    pooling_type=LLAMA_POOLING_TYPE_MEAN,
                    n_ctx=self._n_ctx,
                    # A whole input is one batch: any input the context holds is embedded whole
                    # (llama_cpp cuts one longer than n_batch short, silently).
                    n_batch=self._n_ctx,
                    n_threads=self._n_threads,
                    verbose=False,
                )
                self._alias = alias
            answer: dict[str, Any] = dict(self._llama.create_embedding(text, model=alias))
        return answer
