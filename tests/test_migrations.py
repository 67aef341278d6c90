"""The alembic history builds exactly the schema metadata describes, and unwinds cleanly."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from proxy.db import migrate
from proxy.db.schema import metadata


def _diff(dsn: str) -> list[object]:
    async def run() -> list[object]:
        engine = create_async_engine(migrate.sqlalchemy_url(dsn))
        try:
            async with engine.connect() as con:
                return await con.run_sync(
                    lambda sync: compare_metadata(
                        MigrationContext.configure(sync, opts={"compare_type": True}), metadata
                    )
                )
        finally:
            await engine.dispose()

    return asyncio.run(run())


async def _tables(dsn: str) -> set[str]:
    con = await asyncpg.connect(dsn)
    try:
        rows = await con.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    finally:
        await con.close()
    return {row["table_name"] for row in rows}


def test_migrated_database_matches_metadata(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn)
    assert _diff(empty_dsn) == []


def test_downgrade_to_base_then_upgrade_round_trips(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn)
    migrate.downgrade(empty_dsn, "base")
    assert asyncio.run(_tables(empty_dsn)) == {"alembic_version"}
    migrate.upgrade(empty_dsn)
    assert _diff(empty_dsn) == []
    tables = asyncio.run(_tables(empty_dsn))
    assert {"users", "api_keys", "llama_requests", "llama_usage_daily"} <= tables


def test_upgrade_is_idempotent(db_dsn: str) -> None:
    migrate.upgrade(db_dsn)
    assert _diff(db_dsn) == []
