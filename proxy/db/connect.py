"""Connections to Postgres, and the one translation of their failures into operator sentences."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from proxy.settings import Settings, mask_passwords, redact_dsn

CONNECT_TIMEOUT_SECONDS = 5.0


class DatabaseUnavailable(Exception):
    """Postgres cannot be reached or used; the message says what to do and never has a password."""


def _explain(label: str, exc: BaseException) -> str:
    return mask_passwords(_reason(label, exc))  # a driver's message may quote the DSN it got


def _reason(label: str, exc: BaseException) -> str:
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{exc} at {label}: run `llama-gate init-db` to create it"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):  # bad password or user
        return f"Postgres at {label} refused the login ({exc}): check POSTGRES_AUTH_USER/PASSWORD"
    if isinstance(exc, TimeoutError):
        return f"Postgres at {label} did not answer within {CONNECT_TIMEOUT_SECONDS:g} s"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (
        f"cannot reach Postgres at {label}: {reason}. Is it running? Start the stack with "
        "`bin/console.sh start`, or point POSTGRES_AUTH_DSN at a running server"
    )


async def connect(settings: Settings, **kwargs: Any) -> asyncpg.Connection:
    """One connection; failures become `DatabaseUnavailable` with an actionable message."""
    return await _connect(settings.database_dsn.reveal(), **kwargs)


async def _connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_SECONDS, **kwargs)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(_explain(redact_dsn(dsn), exc)) from None


async def create_pool(settings: Settings, **kwargs: Any) -> asyncpg.Pool:
    """The process's one pool. Like `connect`, failures become `DatabaseUnavailable`."""
    dsn = settings.database_dsn.reveal()
    try:
        pool = await asyncpg.create_pool(dsn, timeout=CONNECT_TIMEOUT_SECONDS, **kwargs)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(_explain(redact_dsn(dsn), exc)) from None
    assert pool is not None
    return pool


async def ensure_database(settings: Settings) -> bool:
    """Create the configured database when the server has no such database; True if created."""
    dsn = settings.database_dsn.reveal()
    try:
        con = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_SECONDS)
    except asyncpg.InvalidCatalogNameError:
        pass
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(_explain(redact_dsn(dsn), exc)) from None
    else:
        await con.close()
        return False
    parts = urlsplit(dsn)
    name = unquote(parts.path.lstrip("/"))
    admin = await _connect(parts._replace(path="/postgres").geturl())
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await asyncio.wait_for(admin.execute(f"CREATE DATABASE {quoted}"), 60)
    except asyncpg.DuplicateDatabaseError:
        return False  # created concurrently by another init-db: fine
    except asyncpg.PostgresError as exc:
        raise DatabaseUnavailable(
            f"database {name!r} does not exist and could not be created ({exc}); "
            "create it, or grant CREATEDB to POSTGRES_AUTH_USER"
        ) from None
    finally:
        await admin.close()
    return True


Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


async def ping(con: Connection) -> None:
    await con.fetchval("SELECT 1")
