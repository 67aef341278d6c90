"""The benchmarks' database: BENCH_DATABASE_URL when given, else a throwaway local server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from proxy.db.localpg import throwaway_server


@contextmanager
def database() -> Iterator[str]:
    if configured := os.environ.get("BENCH_DATABASE_URL"):
        yield configured
        return
    with throwaway_server("llama-gate-bench-") as server:
        yield server.dsn
