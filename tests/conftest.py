"""Shared fixtures: a real Postgres for the whole run, and a fresh migrated database per test.

`TEST_DATABASE_URL` (a role that may CREATE DATABASE) is used when set; otherwise a throwaway
server is started from this machine's Postgres binaries and removed after the run.
"""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from proxy.db import migrate
from proxy.db.localpg import LocalPostgres, throwaway_server

TEMPLATE_DB = "llama_gate_template"


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect each test's garbage as it ends. Something it left unclosed (a socket, a session)
    is then reported in that test, or closed while its loop still runs, rather than failing
    whichever later test the collector happens to run in, as a socket did now and then."""
    yield
    gc.collect()


def _with_database(dsn: str, name: str) -> str:
    return urlsplit(dsn)._replace(path=f"/{name}").geturl()


async def _admin(dsn: str, *statements: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await con.execute(statement)
    finally:
        await con.close()


@pytest.fixture(scope="session")
def postgres_server_dsn() -> Iterator[str]:
    """DSN of a server the tests may create databases on."""
    if configured := os.environ.get("TEST_DATABASE_URL"):
        yield configured
        return
    with throwaway_server() as server:
        yield server.dsn


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    """A migrated server of the test's own, for tests that stop and restart Postgres."""
    with throwaway_server("llama-gate-own-pg-") as server:
        migrate.upgrade(server.dsn)
        yield server


@pytest.fixture(scope="session")
def template_dsn(postgres_server_dsn: str) -> str:
    """A database migrated to head once per run; each test gets a copy of it."""
    asyncio.run(
        _admin(
            postgres_server_dsn,
            f"DROP DATABASE IF EXISTS {TEMPLATE_DB}",
            f"CREATE DATABASE {TEMPLATE_DB}",
        )
    )
    dsn = _with_database(postgres_server_dsn, TEMPLATE_DB)
    migrate.upgrade(dsn)
    return dsn


def _fresh_database(server_dsn: str, template: str | None) -> Iterator[str]:
    name = f"llama_gate_test_{uuid.uuid4().hex[:12]}"
    create = f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "")
    asyncio.run(_admin(server_dsn, create))
    try:
        yield _with_database(server_dsn, name)
    finally:
        asyncio.run(_admin(server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def db_dsn(postgres_server_dsn: str, template_dsn: str) -> Iterator[str]:
    """A fresh database at the newest schema, dropped after the test."""
    yield from _fresh_database(postgres_server_dsn, TEMPLATE_DB)


@pytest.fixture
def empty_dsn(postgres_server_dsn: str) -> Iterator[str]:
    """A fresh database with no tables at all."""
    yield from _fresh_database(postgres_server_dsn, None)


@pytest.fixture
def cli_env(db_dsn: str, tmp_path: Path) -> dict[str, str]:
    """Environment for admin commands: the test database, and a home with no config files."""
    return {"POSTGRES_AUTH_DSN": db_dsn, "LLAMA_GATE_HOME": str(tmp_path)}


@pytest.fixture(scope="module")
def module_db_dsn(postgres_server_dsn: str, template_dsn: str) -> Iterator[str]:
    """A fresh database at the newest schema shared by one module's tests (for slow stacks)."""
    yield from _fresh_database(postgres_server_dsn, TEMPLATE_DB)
