"""`/health` answers whenever the process runs; `/ready` names what is missing."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from proxy.db.localpg import free_port
from tests.proxy_harness import running_proxy


def _nowhere() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/llama_gate"


async def _get(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as client, client.get(url) as response:
        return response.status, await response.json()


async def test_health_needs_no_key_no_database_and_no_backend(tmp_path: Path) -> None:
    async with running_proxy(_nowhere(), tmp_path, listening=False) as proxy:
        await proxy.upstream.stop()
        assert await _get(proxy.url("/health")) == (200, {"status": "ok"})
    assert proxy.records == []  # probes are not API requests


async def test_ready_when_database_and_backend_answer_without_calling_the_backend_api(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        status, body = await _get(proxy.url("/ready"))
    assert status == 200
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "backend": "ok"}
    assert proxy.upstream.seen == []  # only /health, which never waits for the model lock
    assert proxy.upstream.health_checks >= 1
    assert proxy.records == []


async def test_not_ready_names_the_database_when_postgres_is_unreachable(tmp_path: Path) -> None:
    async with running_proxy(_nowhere(), tmp_path, listening=False) as proxy:
        status, body = await _get(proxy.url("/ready"))
    assert status == 503
    assert body["status"] == "not ready: database"
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert "Postgres is unreachable" in checks["database"]
    assert checks["backend"] == "ok"


async def test_not_ready_names_the_backend_when_it_is_down(db_dsn: str, tmp_path: Path) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        await proxy.upstream.stop()
        status, body = await _get(proxy.url("/ready"))
    assert status == 503
    assert body["status"] == "not ready: backend"
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["database"] == "ok"
    assert str(checks["backend"]).startswith("not reachable")
