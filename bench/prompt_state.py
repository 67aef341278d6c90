"""What saving and restoring one conversation's state costs, at n_ctx 2048 and 4096.

    runtime/.venv/bin/python bench/prompt_state.py [--tokens 256,1024] [--repeat 3]

For each context size and conversation length it loads SmolLM2 twice:
- "llama_cpp": as llama_cpp.server loads it by default (logits for every token) with its
  `LlamaRAMCache`: what LLAMA_PROMPT_CACHE=1 (disk, same states) gave before;
- "llama-gate": as the backend loads it with the prompt cache on (no logits for every token,
  `ModelCache` installed: one row of logits kept, `PromptCache`).
It reads `tokens` tokens into the context, then times what Llama does around a cached turn:
`save_state()` plus storing the state in the cache (after each answer), and looking the prompt up
plus `load_state()` (before each turn whose state was evicted from the context). It prints the
median milliseconds over `repeat` runs and the bytes one stored state holds, and the targets: a
state sized by the tokens in use (within 1% from n_ctx 2048 to 4096: only the token list grows),
within 10% of the context's own size for those tokens (its keys and values).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_cpp import Llama  # noqa: E402
from llama_cpp.llama_cache import BaseLlamaCache, LlamaRAMCache  # noqa: E402

from backend.cache_plan import CachePlan, ModelCache  # noqa: E402
from backend.prompt_cache import PromptCache  # noqa: E402

GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "A user and an assistant talk about lighthouses, bread, chess and the weather. " * 400


def _measure(llama: Llama, cache: BaseLlamaCache, tokens: int, repeat: int) -> tuple[float, ...]:
    prompt = llama.tokenize(TEXT.encode())[:tokens]
    saves, restores = [], []
    nbytes = 0
    for _ in range(repeat):
        llama.reset()
        llama.eval(prompt)
        started = time.perf_counter()
        cache[prompt] = llama.save_state()
        saves.append(time.perf_counter() - started)
        llama.reset()  # another conversation took the context
        started = time.perf_counter()
        state = cache[prompt]
        llama.load_state(state)
        restores.append(time.perf_counter() - started)
        # What the cache holds for it (LlamaRAMCache's own count leaves out the logits).
        nbytes = state.llama_state_size + state.scores.nbytes + state.input_ids.nbytes
        _empty(cache)
    return statistics.median(saves) * 1000, statistics.median(restores) * 1000, float(nbytes)


def _kinds(n_ctx: int) -> dict[str, tuple[Llama, BaseLlamaCache]]:
    plain = Llama(str(GGUF), n_ctx=n_ctx, n_threads=2, verbose=False, logits_all=True)
    ours = Llama(str(GGUF), n_ctx=n_ctx, n_threads=2, verbose=False, logits_all=False)
    keeper = ModelCache(CachePlan("ram", 8 << 30))
    keeper.install(ours)
    assert keeper.cache is not None
    return {"llama_cpp": (plain, LlamaRAMCache(8 << 30)), "llama-gate": (ours, keeper.cache)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="256,1024", help="conversation lengths, in tokens")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    lengths = [int(n) for n in args.tokens.split(",")]
    rows = []
    for n_ctx in (2048, 4096):
        kinds = _kinds(n_ctx)
        for tokens in lengths:
            for kind, (llama, cache) in kinds.items():
                save, restore, nbytes = _measure(llama, cache, tokens, args.repeat)
                context = tokens * _context_bytes_per_token(llama)
                rows.append((n_ctx, tokens, kind, save, restore, nbytes, context))
        for llama, _ in kinds.values():
            llama.close()
    print(f"SmolLM2-135M Q4_1, median of {args.repeat}; MiB = 2^20 bytes\n")
    head = ("n_ctx", "tokens", "cache", "save ms", "restore ms", "state MiB", "context MiB")
    print("{:>5} {:>6}  {:<10} {:>8} {:>10} {:>9} {:>11}".format(*head))
    for n_ctx, tokens, kind, save, restore, nbytes, context in rows:
        print(
            f"{n_ctx:>5} {tokens:>6}  {kind:<10} {save:>8.1f} {restore:>10.1f}"
            f" {nbytes / 2**20:>9.1f} {context / 2**20:>11.1f}"
        )
    ours = {(r[0], r[1]): r for r in rows if r[2] == "llama-gate"}
    # Only Llama's token id array (4 bytes a context slot, which load_state needs whole) grows
    # with n_ctx; the keys and values, the bulk, are those of the tokens in use.
    growth = max(ours[(4096, t)][5] / ours[(2048, t)][5] for t in lengths)
    overhead = max(r[5] / r[6] - 1 for r in ours.values())
    print()
    print(f"{'figure':<52} {'measured':>10} {'target':>10}  met")
    print(f"{'llama-gate state at n_ctx 4096 / at 2048':<52} {growth:>9.4f}x {'<= 1.01x':>10}  "
          f"{'yes' if growth <= 1.01 else 'NO'}")  # fmt: skip
    print(f"{'llama-gate state beyond the context it holds':<52} {overhead:>9.1%} {'<= 10%':>10}  "
          f"{'yes' if overhead <= 0.10 else 'NO'}")  # fmt: skip


def _empty(cache: BaseLlamaCache) -> None:
    if isinstance(cache, LlamaRAMCache):
        cache.cache_state.clear()
    elif isinstance(cache, PromptCache):
        cache.clear()


def _context_bytes_per_token(llama: Llama) -> int:
    """The K and V of one token in f16, over every layer (what llama.cpp serializes)."""
    meta = llama.metadata
    arch = meta["general.architecture"]
    layers = int(meta[f"{arch}.block_count"])
    heads_kv = int(
        meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])
    )
    head_dim = int(meta[f"{arch}.embedding_length"]) // int(meta[f"{arch}.attention.head_count"])
    return 2 * layers * heads_kv * head_dim * 2


if __name__ == "__main__":
    main()
