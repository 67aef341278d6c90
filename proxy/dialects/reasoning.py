"""Reasoning kept apart from answers: `<think>...</think>` as models such as Qwen3 or DeepSeek-R1
distillations write it, taken out of the text as it streams.

A tag may be split across chunks at any byte, so the splitter holds back the end of a chunk only
while it could still be the start of a tag, and never longer: no piece of a tag ever reaches a
client, and no answer text waits for more than a possible tag prefix. Whitespace right after a
tag (the newline models put there) is dropped.
"""

from __future__ import annotations

from enum import Enum

OPEN, CLOSE = "<think>", "</think>"


class Reasoning(Enum):
    """What happens to a model's reasoning."""

    SPLIT = "split"  # apart from the answer: OpenAI's `reasoning_content`, Anthropic's thinking
    KEEP = "keep"  # inline, exactly as generated
    STRIP = "strip"  # dropped


Piece = tuple[bool, str]  # (is reasoning, text)


def _partial(data: str, tag: str) -> int:
    """How many characters at the end of `data` could begin `tag`."""
    for size in range(min(len(tag) - 1, len(data)), 0, -1):
        if data.endswith(tag[:size]):
            return size
    return 0


class ThinkSplitter:
    def __init__(self) -> None:
        self._inside = False
        self._held = ""
        self._fresh = False  # right after a tag: leading whitespace is dropped

    @property
    def inside(self) -> bool:
        return self._inside

    def feed(self, text: str) -> list[Piece]:
        """The pieces of text that may be sent now, in order; a possible tag start is held."""
        data, self._held = self._held + text, ""
        pieces: list[Piece] = []
        while data:
            tag = CLOSE if self._inside else OPEN
            found = data.find(tag)
            if found >= 0:
                self._emit(pieces, data[:found])
                data = data[found + len(tag) :]
                self._inside, self._fresh = not self._inside, True
                continue
            held = _partial(data, tag)
            self._emit(pieces, data[: len(data) - held])
            self._held = data[len(data) - held :]
            break
        return pieces

    def flush(self) -> list[Piece]:
        """The text is over: what was held back was no tag after all."""
        pieces: list[Piece] = []
        self._emit(pieces, self._held)
        self._held = ""
        return pieces

    def _emit(self, pieces: list[Piece], text: str) -> None:
        if self._fresh:
            text = text.lstrip()
            if text:
                self._fresh = False
        if not text:
            return
        if pieces and pieces[-1][0] == self._inside:
            pieces[-1] = (self._inside, pieces[-1][1] + text)
        else:
            pieces.append((self._inside, text))


def split_text(text: str) -> tuple[str, str]:
    """A whole text's (reasoning, answer)."""
    splitter = ThinkSplitter()
    pieces = splitter.feed(text) + splitter.flush()
    reasoning = "".join(t for is_reasoning, t in pieces if is_reasoning)
    answer = "".join(t for is_reasoning, t in pieces if not is_reasoning)
    return reasoning, answer
