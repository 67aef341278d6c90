"""Paths with `.` or `..` segments, in any spelling, are refused before routing.

The proxy routes on the decoded path, a backend may decode it again, and path normalisation
differs between the two: `..%2F`, `%2e%2e`, `%252e%252e` or a backslash must never let one of
them see a different path than the other. No API path here has such a segment, so none is lost.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_SEPARATORS = re.compile(r"[/\\]")
DECODINGS = 3  # %25252e -> %252e -> %2e -> .


def has_dot_segment(raw_path: str) -> bool:
    """Whether the path (query excluded), or any decoding of it, holds a `.` or `..` segment."""
    path = raw_path.split("?", 1)[0]
    if "." not in path and "%" not in path:  # no dot, nor any escape that could decode to one
        return False
    for _ in range(DECODINGS + 1):
        if any(segment in {".", ".."} for segment in _SEPARATORS.split(path)):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return False
