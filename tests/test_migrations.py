"""The alembic history builds exactly the schema metadata describes, and unwinds cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import asyncpg
import pytest
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


@pytest.mark.slow
def test_init_db_works_from_an_installed_wheel(empty_dsn: str, tmp_path: Path) -> None:
    """The revisions are package data: a wheel, installed anywhere, can migrate a database."""
    # Built from a copy, so the build leaves nothing behind in the source tree.
    root = tmp_path / "source"
    shutil.copytree(
        Path(__file__).resolve().parent.parent,
        root,
        ignore=shutil.ignore_patterns(
            ".git", "runtime", "models", "build", "*.egg-info", ".*cache"
        ),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), root],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("llama_gate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "proxy/db/migrations/env.py" in names
    assert "proxy/db/migrations/script.py.mako" in names
    assert any(name.startswith("proxy/db/migrations/versions/0001_") for name in names)
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", site, wheel],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"  # no source tree, no alembic.ini around
    elsewhere.mkdir()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(site), "POSTGRES_AUTH_DSN": empty_dsn}
    code = (
        "import proxy, sys; from proxy.cli.main import main; "
        "print(proxy.__file__, file=sys.stderr); main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "init-db"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert str(site) in result.stderr  # the wheel's copy ran, not the source tree's
    assert "is at the newest schema" in result.stdout
    assert _diff(empty_dsn) == []
