"""Which conversation a request continues, so it can go where that conversation is warm.

A backend keeps each conversation's state in its prompt cache, so the next turn of a conversation
is cheapest on the backend that served the last one. A request names its conversation by digests
of its message list's prefixes: `key` covers all of its messages, `prefixes` every shorter run of
them, longest first. The next turn's messages start with this turn's, so one of its `prefixes`
is this turn's `key`. Digests, not text: the routing table never holds what anybody wrote.

What is digested is bounded, whatever the request's size: a long text counts by its length and
its first and last `EDGE` characters, a long list by its length and its first and last items. Two
conversations that differ only deep inside a long text share a digest: they are routed alike,
which costs one of them a warm cache at worst, never a wrong answer (affinity only chooses
among backends that all serve the request).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

MAX_PREFIXES = 256  # a conversation longer than this many messages is matched on its latest ones
CHAT_PATH = "/v1/chat/completions"  # the backend call that continues a conversation


@dataclass(frozen=True)
class Affinity:
    key: bytes  # this request's whole conversation so far
    prefixes: tuple[bytes, ...]  # the conversations it may continue, longest first


EDGE = 128  # characters of a long text digested at each end
ITEMS = 16  # items of a long list digested at each end


def _shape(value: Any) -> Any:
    """`value` with every long text and list cut to its length and its ends."""
    if isinstance(value, str):
        return value if len(value) <= 2 * EDGE else [len(value), value[:EDGE], value[-EDGE:]]
    if isinstance(value, Mapping):
        return {str(key): _shape(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = list(value) if len(value) <= 2 * ITEMS else [*value[:ITEMS], *value[-ITEMS:]]
        return [len(value), *(_shape(item) for item in items)]
    return value


def _canonical(value: Any) -> bytes:
    return msgspec.json.encode(_shape(value), order="sorted")  # any integer a body holds


def of_call(path: str, body: Mapping[str, Any] | None) -> Affinity | None:
    """The conversation a backend call continues: a chat's, whichever API the client spoke (the
    model and the tools shape the prompt too, so they must match as well); None otherwise."""
    if path != CHAT_PATH or body is None:
        return None
    context = [body.get("model"), body.get("tools"), body.get("functions")]
    return conversation(context, body.get("messages"))


def conversation(context: Any, messages: Any) -> Affinity | None:
    """The affinity of a request whose `messages` are a list, in a `context` (model, tools, ...)
    that must match too; None when there is no list of messages."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        return None
    digest = hashlib.blake2b(_canonical(context), digest_size=16).digest()
    chain: list[bytes] = []
    for message in messages:
        digest = hashlib.blake2b(digest + _canonical(message), digest_size=16).digest()
        chain.append(digest)
    prefixes = tuple(reversed(chain[-MAX_PREFIXES - 1 : -1]))
    return Affinity(chain[-1], prefixes)
