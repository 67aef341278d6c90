"""The alembic history builds exactly the schema metadata describes, and unwinds cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from proxy.db import migrate
from proxy.db.schema import metadata
from tests.proxy_harness import ROOT


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
    applied = migrate.upgrade(empty_dsn)
    assert _diff(empty_dsn) == []
    # Each revision once, oldest first; a second run has nothing left to apply.
    versions = sorted(p.name[:4] for p in (migrate.MIGRATIONS_DIR / "versions").glob("0*.py"))
    assert applied == versions
    assert migrate.upgrade(empty_dsn) == []


def test_downgrade_to_base_then_upgrade_round_trips(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn)
    migrate.downgrade(empty_dsn, "base")
    assert asyncio.run(_tables(empty_dsn)) == {"alembic_version"}
    migrate.upgrade(empty_dsn)
    assert _diff(empty_dsn) == []
    tables = asyncio.run(_tables(empty_dsn))
    assert {"users", "api_keys", "llama_requests", "llama_usage_daily"} <= tables


def test_groups_and_weights_keep_every_user_key_limit_and_row(empty_dsn: str) -> None:
    """Migration 0018 (groups, keys' limits, weights) on a database in use before it."""
    migrate.upgrade(empty_dsn, "0017")

    async def before() -> None:
        con = await asyncpg.connect(empty_dsn)
        try:
            await con.execute(
                """INSERT INTO users (username, rate_limit, tokens_per_day) VALUES ('alice', 7, 99);
                   INSERT INTO api_keys (user_id, key_id, secret_hash, models)
                       SELECT id, 'k1', 'hash', '{m*}' FROM users;
                   INSERT INTO llama_requests (user_id, username, path, status_code,
                       duration_ms, prompt_tokens, completion_tokens)
                       SELECT id, 'alice', '/v1/chat/completions', 200, 1, 5, 2 FROM users"""
            )
        finally:
            await con.close()

    async def after() -> tuple[Any, Any, Any, int]:
        con = await asyncpg.connect(empty_dsn)
        try:
            return (
                await con.fetchrow("SELECT username, rate_limit, tokens_per_day FROM users"),
                await con.fetchrow(
                    "SELECT key_id, models, rate_limit, tokens_per_day FROM api_keys"
                ),
                await con.fetchrow(
                    "SELECT prompt_tokens, completion_tokens, weight FROM llama_requests"
                ),
                await con.fetchval("SELECT count(*) FROM llama_groups"),
            )
        finally:
            await con.close()

    asyncio.run(before())
    assert migrate.upgrade(empty_dsn)[0] == "0018"
    user, key, row, groups = asyncio.run(after())
    assert tuple(user) == ("alice", 7, 99)
    assert tuple(key) == ("k1", ["m*"], None, None)  # the scope kept; no limits of its own
    assert tuple(row) == (5, 2, None)  # weight NULL: counted as 1
    assert groups == 0


def test_upgrade_is_idempotent(db_dsn: str) -> None:
    migrate.upgrade(db_dsn)
    assert _diff(db_dsn) == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy so the build leaves nothing in the source tree."""
    folder = tmp_path_factory.mktemp("wheel")
    root = folder / "source"
    shutil.copytree(
        ROOT,
        root,
        ignore=shutil.ignore_patterns(
            ".git", "runtime", "models", "build", "*.egg-info", ".*cache"
        ),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(folder), root],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (path,) = folder.glob("llama_gate-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a folder of its own (for PYTHONPATH)."""
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", site, wheel],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return site


def _run_installed(
    site: Path, code: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """`code` by the installed copy, from a folder with no source tree nor alembic.ini around."""
    elsewhere = site.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=elsewhere, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(site), **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_init_db_works_from_an_installed_wheel(
    empty_dsn: str, wheel: Path, installed: Path
) -> None:
    """The revisions are package data: a wheel, installed anywhere, can migrate a database."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "proxy/db/migrations/env.py" in names
    assert "proxy/db/migrations/script.py.mako" in names
    assert any(name.startswith("proxy/db/migrations/versions/0001_") for name in names)
    code = (
        "import proxy, sys; from proxy.cli.main import main; "
        "print(proxy.__file__, file=sys.stderr); main()"
    )
    result = _run_installed(installed, code, "init-db", POSTGRES_AUTH_DSN=empty_dsn)
    assert result.returncode == 0, result.stderr
    assert str(installed) in result.stderr  # the wheel's copy ran, not the source tree's
    assert "is at the newest schema" in result.stdout
    count = len(list((migrate.MIGRATIONS_DIR / "versions").glob("0*.py")))
    assert f"Applied {count} migration(s): 0001, " in result.stdout
    assert _diff(empty_dsn) == []


@pytest.mark.slow
def test_the_wheel_carries_the_dashboards_pages_and_chart_js(wheel: Path, installed: Path) -> None:
    """The dashboard works offline from a wheel: its templates, styles and Chart.js are inside."""
    source = ROOT / "proxy" / "dashboard"
    shipped = {
        path.relative_to(ROOT).as_posix()
        for folder in ("templates", "static")
        for path in (source / folder).iterdir()
        if path.is_file()
    }
    assert "proxy/dashboard/static/chart.umd.min.js" in shipped
    assert "proxy/dashboard/templates/users.html" in shipped
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        chart = archive.read("proxy/dashboard/static/chart.umd.min.js")
    assert shipped <= names, sorted(shipped - names)
    assert chart == (source / "static" / "chart.umd.min.js").read_bytes()
    # The installed copy finds them where the dashboard looks: each template compiles.
    code = (
        "from proxy.dashboard.app import STATIC; from proxy.dashboard.render import templates\n"
        "env = templates()\n"
        "for name in env.list_templates(): env.get_template(name)\n"
        "print(STATIC / 'chart.umd.min.js', *env.list_templates(), sep='\\n')\n"
    )
    result = _run_installed(installed, code)
    assert result.returncode == 0, result.stderr
    chart_path, *templates = result.stdout.split()
    assert chart_path.startswith(str(installed)), chart_path
    assert Path(chart_path).read_bytes() == chart
    assert templates == sorted(p.name for p in (source / "templates").iterdir())
