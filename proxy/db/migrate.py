"""Run alembic from code: `llama-gate init-db` upgrades to head, tests round-trip to base."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext, MigrationInfo

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


def upgrade(dsn: str, revision: str = "head") -> list[str]:
    """Migrate to `revision`; returns the revisions applied, oldest first (none when up to date)."""
    applied: list[str] = []
    config = alembic_config(dsn)

    def note(
        ctx: MigrationContext,
        step: MigrationInfo,
        heads: Collection[Any],
        run_args: Mapping[str, Any],
    ) -> None:
        applied.extend(step.up_revision_ids)

    config.attributes["on_version_apply"] = note
    command.upgrade(config, revision)
    return applied


def downgrade(dsn: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(dsn), revision)
