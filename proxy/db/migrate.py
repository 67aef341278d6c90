"""Run alembic from code: `llama-gate init-db` upgrades to head, tests round-trip to base."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def sqlalchemy_url(dsn: str) -> str:
    """SQLAlchemy's spelling of a libpq/asyncpg DSN, on the asyncpg driver."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme not in {"postgres", "postgresql", "postgresql+asyncpg"}:
        raise ValueError("the database DSN must start with postgresql://")
    return f"postgresql+asyncpg://{rest}"


def alembic_config(dsn: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["dsn"] = dsn
    return config


def upgrade(dsn: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(dsn), revision)


def downgrade(dsn: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(dsn), revision)
