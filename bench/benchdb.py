"""The benchmarks' database: BENCH_DATABASE_URL when given, else a throwaway local server with
default durability (fsync and synchronous_commit on), as every real deployment runs Postgres;
`durable=False` gives the tests' kind, without fsync, for comparison."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from proxy.db.localpg import throwaway_server


@contextmanager
def database(durable: bool = True) -> Iterator[str]:
    if configured := os.environ.get("BENCH_DATABASE_URL"):
        yield configured
        return
    with throwaway_server("llama-gate-bench-", durable=durable) as server:
        yield server.dsn
