"""What constraining generation to a tool call costs, per token, with the real SmolLM2.

    runtime/.venv/bin/python bench/grammar.py [--tokens 48] [--runs 3]

Generates the same answers with the model in this process and prints CPU seconds (all threads)
and wall seconds per generated token, the best of `--runs` (taken in turns), for:

- free text: no grammar at all (the floor);
- llama_cpp's `grammar`: a `required` tool call's grammar in llama_cpp's sampler chain, which
  checks every token of the vocabulary for every token generated;
- GrammarFilter, required: the same grammar through `backend.grammar.GrammarFilter`, which asks
  the grammar about the likeliest tokens first;
- `auto`'s grammar for a question answered in text, in llama_cpp's chain and through
  GrammarFilter (which lets the answer run free after its first token).

CPU time is what counts on a shared machine: wall time also holds other processes' load.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_cpp import Llama  # noqa: E402
from llama_cpp.llama_grammar import LlamaGrammar  # noqa: E402

from backend.grammar import GrammarFilter  # noqa: E402
from backend.tools import plan  # noqa: E402

GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
CALL_PROMPT = (
    "<|im_start|>user\nThe weather in Paris for 3 days?<|im_end|>\n<|im_start|>assistant\n"
)
TEXT_PROMPT = "<|im_start|>user\nWrite a story about a cat.<|im_end|>\n<|im_start|>assistant\n"


def _grammar(mode: str) -> str:
    served = plan({"messages": [], "tools": [TOOL], "tool_choice": mode}, None)
    assert served is not None
    assert served.grammar is not None
    return served.grammar


def _once(llama: Llama, prompt: str, tokens: int, extra: dict[str, Any]) -> tuple[float, float]:
    """CPU and wall seconds per generated token, for one answer."""
    llama.create_completion(prompt, max_tokens=1)  # the prompt in the context already
    cpu, wall = time.process_time(), time.perf_counter()
    out: Any = llama.create_completion(prompt, max_tokens=tokens, temperature=0, **extra)
    made = out["usage"]["completion_tokens"]
    return (time.process_time() - cpu) / made, (time.perf_counter() - wall) / made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    llama = Llama(str(GGUF), n_ctx=1024, n_threads=2, verbose=False)
    required, auto = _grammar("required"), _grammar("auto")
    rows: list[tuple[str, str, dict[str, Callable[[], Any]]]] = [
        ("free text", TEXT_PROMPT, {}),
        ("llama_cpp's grammar, required", CALL_PROMPT,
         {"grammar": lambda: LlamaGrammar.from_string(required)}),
        ("GrammarFilter, required", CALL_PROMPT,
         {"logits_processor": lambda: [GrammarFilter(llama, required)]}),
        ("llama_cpp's grammar, auto, text", TEXT_PROMPT,
         {"grammar": lambda: LlamaGrammar.from_string(auto)}),
        ("GrammarFilter, auto, text", TEXT_PROMPT,
         {"logits_processor": lambda: [GrammarFilter(llama, auto, lazy=True)]}),
    ]  # fmt: skip
    _once(llama, TEXT_PROMPT, args.tokens, {})  # warm up: the first answer pays for allocations
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.runs):  # round robin, so that other load spreads over every row
        for name, prompt, make in rows:
            result = _once(llama, prompt, args.tokens, {k: f() for k, f in make.items()})
            best[name] = min(best.get(name, result), result)
    print(f"{'':32} {'cpu ms/tok':>10} {'wall ms/tok':>11}")
    for name, _, _ in rows:
        cpu, wall = best[name]
        print(f"{name:32} {cpu * 1000:10.1f} {wall * 1000:11.1f}")
    llama.close()


if __name__ == "__main__":
    main()
