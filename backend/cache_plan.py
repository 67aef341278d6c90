"""Which prompt cache the backend runs, its budget, and putting it on the model being served.

`LLAMA_PROMPT_CACHE` is `ram` (the default), `disk` or `off`. The budget is
`LLAMA_PROMPT_CACHE_BYTES`, or when that is `auto`:
- in RAM, a quarter of what the machine's memory (or the container's memory limit, if lower)
  leaves beside the largest model file, and at least `MIN_BUDGET_BYTES`;
- on disk, a quarter of the free space where `runtime/cache/` lives, and at least the same.

The cache is installed by the backend itself (`ModelCache.install`) rather than by llama_cpp.server
(whose config turns its own off): llama_cpp.server only knows its own two cache classes.
"""

from __future__ import annotations

import logging
import os
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from llama_cpp import Llama

from backend.prompt_cache import CacheStats, PromptCache

logger = logging.getLogger(__name__)

MIN_BUDGET_BYTES = 64 << 20
_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


@dataclass(frozen=True)
class CachePlan:
    mode: str  # ram, disk or off
    capacity_bytes: int  # 0 when off
    directory: Path | None = None  # for disk
    derived: bool = False  # the budget came from the rule, not from LLAMA_PROMPT_CACHE_BYTES

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def describe(self) -> str:
        if not self.on:
            return "prompt cache off"
        where = f"on disk in {self.directory}" if self.directory else "in RAM"
        how = "derived from this machine" if self.derived else "LLAMA_PROMPT_CACHE_BYTES"
        return f"prompt cache {where}, budget {self.capacity_bytes / 2**20:,.0f} MiB ({how})"


def memory_bytes() -> int:
    """This machine's memory, or the limit of the container it runs in when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            limit = path.read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def default_budget(mode: str, model_bytes: int, directory: Path) -> int:
    """The budget of the rule in this module's docstring."""
    if mode == "disk":
        probe = directory
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        return max(MIN_BUDGET_BYTES, free // 4)
    return max(MIN_BUDGET_BYTES, (memory_bytes() - model_bytes) // 4)


def plan_cache(mode: str, budget: int | None, model_bytes: int, directory: Path) -> CachePlan:
    """The cache to run for `LLAMA_PROMPT_CACHE=mode` and `LLAMA_PROMPT_CACHE_BYTES=budget`
    (None: auto), given the largest model file's size and the disk cache's directory."""
    if mode == "off":
        return CachePlan("off", 0)
    derived = budget is None
    capacity = default_budget(mode, model_bytes, directory) if budget is None else budget
    return CachePlan(mode, capacity, directory if mode == "disk" else None, derived)


class ModelCache:
    """The prompt cache of whichever model llama_cpp.server is serving.

    llama_cpp.server keeps one model loaded and closes it to load another, so the cache belongs
    to one `Llama` at a time: a state of one model means nothing to another, and is dropped.
    """

    def __init__(self, plan: CachePlan) -> None:
        self.plan = plan
        self.cache: PromptCache | None = None
        if plan.on:
            self.cache = PromptCache(plan.capacity_bytes, directory=plan.directory)
        self._model: weakref.ref[Llama] | None = None

    def install(self, llama: Llama) -> None:
        """Make `llama` use the cache (called on the model's thread, under its lock)."""
        if self.cache is None or (self._model is not None and self._model() is llama):
            return
        if self._model is not None:
            logger.info("another model is loaded: its predecessor's prompt cache is emptied")
        self.cache.clear()
        self._model = weakref.ref(llama)
        # Without logits for every token (the config asks for none while the cache is on) Llama
        # never reads its logits buffer, yet copies up to n_batch rows of it (n_batch x vocabulary
        # floats, ~96 MiB for a 49k vocabulary) into every state it saves and writes them all back
        # on each restore. One row is all it indexes.
        llama.scores = np.zeros((1, llama.n_vocab()), dtype=np.single)
        llama.set_cache(self.cache)

    def stats(self) -> CacheStats | None:
        return self.cache.stats() if self.cache is not None else None
