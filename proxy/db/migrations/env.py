"""alembic environment: migrates the database named by llama-gate's settings to `proxy.db.schema`.

The DSN arrives in `config.attributes["dsn"]` (set by `proxy.db.migrate`), so it never passes
through alembic.ini or a log line.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from proxy.db.migrate import sqlalchemy_url
from proxy.db.schema import metadata
from proxy.settings import load_settings

config = context.config


def _dsn() -> str:
    dsn = config.attributes.get("dsn")
    if dsn is None:  # alembic run by hand rather than through `llama-gate init-db`
        dsn = load_settings().database_dsn.reveal()
    return str(dsn)


def _run(connection: Connection) -> None:
    # `proxy.db.migrate.upgrade` passes a callback told of each migration applied.
    applied = config.attributes.get("on_version_apply")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        on_version_apply=applied,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(sqlalchemy_url(_dsn()))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=sqlalchemy_url(_dsn()), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_online())
