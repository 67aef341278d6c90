"""Token sequences in a radix tree: which stored sequence shares the longest prefix with a query.

llama_cpp's own caches answer that by comparing the query with every stored key in Python, token
by token: a cost that grows with the number of conversations times their length, paid by every
request under the model lock. Here a lookup walks down the tree once, comparing each token of the
query at most once, whatever the number of stored sequences.

Each stored sequence ends at a node; its value hangs there. Nodes with one child and no value are
merged into their parent's edge, so the tree has at most twice as many nodes as values.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(eq=False)
class _Node(Generic[V]):
    label: tuple[int, ...]  # the tokens on the edge from the parent to this node
    parent: _Node[V] | None
    children: dict[int, _Node[V]] = field(default_factory=dict)  # by each edge's first token
    value: V | None = None  # values are never None, so None means "no sequence ends here"

    @property
    def depth(self) -> int:
        depth = 0
        node: _Node[V] | None = self
        while node is not None:
            depth += len(node.label)
            node = node.parent
        return depth


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixIndex(Generic[V]):
    """A map from token sequences to values (never None) that finds the longest shared prefix."""

    def __init__(self) -> None:
        self._root: _Node[V] = _Node((), None)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def get(self, key: Sequence[int]) -> V | None:
        node = self._find(key)
        return node.value if node is not None else None

    def put(self, key: Sequence[int], value: V) -> list[tuple[tuple[int, ...], V]]:
        """Store `value` under `key`; return the stored (key, value) pairs `key` extends.

        Those are prefixes of `key`, so any query shares at least as many tokens with `key` as
        with them: the caller may drop them.
        """
        node, depth = self._root, 0
        key = tuple(key)
        while depth < len(key):
            child = node.children.get(key[depth])
            if child is None:
                child = _Node(key[depth:], node)
                node.children[key[depth]] = child
                node = child
                depth = len(key)
                break
            shared = _common(child.label, key[depth:])
            if shared < len(child.label):
                child = self._split(child, shared)
            node, depth = child, depth + shared
        if node.value is None:
            self._size += 1
        node.value = value
        extended: list[tuple[tuple[int, ...], V]] = []
        ancestor = node.parent
        while ancestor is not None:
            if ancestor.value is not None:
                extended.append((key[: ancestor.depth], ancestor.value))
            ancestor = ancestor.parent
        return extended

    def longest(self, query: Sequence[int]) -> tuple[tuple[int, ...], V, int] | None:
        """The stored (key, value) sharing the most leading tokens with `query`, and how many.

        Among keys that share equally many, the shortest (cheapest to restore). None when no
        stored key shares even the first token.
        """
        node, depth = self._root, 0
        while depth < len(query):
            child = node.children.get(query[depth])
            if child is None:
                break
            shared = _common(child.label, query[depth : depth + len(child.label)])
            depth += shared
            node = child
            if shared < len(child.label):
                break
        if depth == 0:
            return None
        found = self._shallowest_value(node)
        if found is None:
            return None
        key, value = found
        return key, value, depth

    def remove(self, key: Sequence[int]) -> V | None:
        node = self._find(key)
        if node is None or node.value is None:
            return None
        value = node.value
        node.value = None
        self._size -= 1
        self._prune(node)
        return value

    def clear(self) -> None:
        self._root = _Node((), None)
        self._size = 0

    def items(self) -> Iterator[tuple[tuple[int, ...], V]]:
        stack: list[tuple[_Node[V], tuple[int, ...]]] = [(self._root, ())]
        while stack:
            node, prefix = stack.pop()
            key = prefix + node.label
            if node.value is not None:
                yield key, node.value
            stack.extend((child, key) for child in node.children.values())

    # -- internals -----------------------------------------------------------------------------

    def _find(self, key: Sequence[int]) -> _Node[V] | None:
        node, depth = self._root, 0
        while depth < len(key):
            child = node.children.get(key[depth])
            if child is None or tuple(key[depth : depth + len(child.label)]) != child.label:
                return None
            node, depth = child, depth + len(child.label)
        return node

    def _split(self, child: _Node[V], at: int) -> _Node[V]:
        """Put a new node `at` tokens into `child`'s edge; return it."""
        parent = child.parent
        assert parent is not None
        middle: _Node[V] = _Node(child.label[:at], parent)
        parent.children[middle.label[0]] = middle
        child.label = child.label[at:]
        child.parent = middle
        middle.children[child.label[0]] = child
        return middle

    def _prune(self, node: _Node[V]) -> None:
        """Drop valueless leaves and merge valueless single-child nodes, from `node` up."""
        while node.parent is not None and node.value is None:
            parent = node.parent
            if not node.children:
                del parent.children[node.label[0]]
                node = parent
                continue
            if len(node.children) == 1:
                (only,) = node.children.values()
                only.label = node.label + only.label
                only.parent = parent
                parent.children[only.label[0]] = only
            return

    def _shallowest_value(self, start: _Node[V]) -> tuple[tuple[int, ...], V] | None:
        prefix = _key_of(start.parent)
        queue: deque[tuple[_Node[V], tuple[int, ...]]] = deque([(start, prefix)])
        best: tuple[int, tuple[int, ...], V] | None = None
        while queue:
            node, before = queue.popleft()
            key = before + node.label
            if best is not None and len(key) >= best[0]:
                continue
            if node.value is not None:
                best = (len(key), key, node.value)
                continue
            queue.extend((child, key) for child in node.children.values())
        return (best[1], best[2]) if best is not None else None


def _key_of(node: _Node[V] | None) -> tuple[int, ...]:
    parts: list[tuple[int, ...]] = []
    while node is not None:
        parts.append(node.label)
        node = node.parent
    return tuple(token for part in reversed(parts) for token in part)
