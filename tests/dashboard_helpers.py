"""Shared pieces of the dashboard's tests: admin tokens, a proxy serving its dashboard, and a
signed-in HTTP client."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from proxy.auth.admintokens import generate_admin_token
from proxy.auth.apikeys import KeyHasher
from proxy.db import admin_tokens
from proxy.db.localpg import free_port
from tests.proxy_harness import Harness, running_proxy

_CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


async def make_admin_token(dsn: str, label: str | None = None) -> tuple[str, str]:
    """A new admin token in the database: (token id, full token)."""
    token = generate_admin_token()
    con = await asyncpg.connect(dsn)
    try:
        await admin_tokens.insert_admin_token(
            con, token.key_id, KeyHasher().hash(token.secret), label
        )
    finally:
        await con.close()
    return token.key_id, token.full.reveal()


def csrf_in(html: str) -> str:
    match = _CSRF_RE.search(html)
    assert match, html[:2000]
    return match.group(1)


@dataclass
class Dashboard:
    proxy: Harness
    url: str  # the dashboard's base URL

    def at(self, path: str) -> str:
        return self.url + path


@asynccontextmanager
async def running_dashboard(dsn: str, home: Path, **settings: str) -> AsyncIterator[Dashboard]:
    """The proxy (in front of a fake backend) serving its dashboard on a free loopback port."""
    port = free_port()
    async with running_proxy(dsn, home, LLAMA_PROXY_DASHBOARD_PORT=str(port), **settings) as proxy:
        yield Dashboard(proxy, f"http://127.0.0.1:{port}")


def client() -> aiohttp.ClientSession:
    """A client that keeps cookies for 127.0.0.1 (aiohttp's default jar skips IP hosts)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(http: aiohttp.ClientSession, dashboard: Dashboard, token: str) -> str:
    """Sign `http` in with `token`; return the session's CSRF token (from the overview page)."""
    async with http.get(dashboard.at("/login")) as r:
        nonce = csrf_in(await r.text())
    form = {"csrf": nonce, "token": token, "next": "/users"}
    async with http.post(dashboard.at("/login"), data=form, allow_redirects=False) as r:
        assert r.status == 303, await r.text()
        assert r.headers["Location"] == "/users"
    async with http.get(dashboard.at("/users")) as r:
        assert r.status == 200
        return csrf_in(await r.text())


async def wait_for_rows(dsn: str, count: int) -> None:
    """Until llama_requests holds `count` rows (the audit writer flushes about every 0.2 s)."""
    con = await asyncpg.connect(dsn)
    try:
        for _ in range(100):
            if await con.fetchval("SELECT count(*) FROM llama_requests") >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"llama_requests did not reach {count} rows in 5 s")
    finally:
        await con.close()
