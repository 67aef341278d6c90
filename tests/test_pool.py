"""The pool's short circuit: connection failures are an outage; a busy pool or slow query is not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from proxy.db import connect
from proxy.db.connect import DatabaseUnavailable
from proxy.db.localpg import free_port
from proxy.db.pool import POOL_SIZE, Database, DatabaseBusy
from tests.proxy_harness import proxy_settings


@pytest.fixture
async def database(db_dsn: str, tmp_path: Path) -> AsyncIterator[Database]:
    settings = proxy_settings(db_dsn, 9, tmp_path, LLAMA_PROXY_DB_TIMEOUT_SECONDS="1")
    database = Database(settings)
    await database.open()
    try:
        yield database
    finally:
        await database.close()


async def test_every_connection_in_use_is_busy_not_an_outage(database: Database) -> None:
    held: list[asyncpg.Connection] = [await database.pool.acquire() for _ in range(POOL_SIZE)]
    try:
        with pytest.raises(DatabaseBusy, match="every pooled connection in use"):
            await database.run(connect.ping)
        assert database.up
    finally:
        for con in held:
            await database.pool.release(con)
    started = time.monotonic()
    await database.run(connect.ping)  # nobody was told to skip Postgres meanwhile
    assert time.monotonic() - started < 0.5


async def test_a_slow_query_is_busy_not_an_outage(database: Database) -> None:
    with pytest.raises(DatabaseBusy, match="slow query"):
        await database.run(lambda con: con.execute("SELECT pg_sleep(3)"))
    assert database.up
    await database.run(connect.ping)


async def test_a_refused_connection_is_an_outage_that_callers_skip_for_a_moment(
    tmp_path: Path,
) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    database = Database(proxy_settings(nowhere, 9, tmp_path))
    await database.open()
    try:
        assert not database.up
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as caught:
            await database.run(connect.ping)
        assert not isinstance(caught.value, DatabaseBusy)
        assert time.monotonic() - started < 0.1  # skipped: no new connection attempt
    finally:
        await database.close()
