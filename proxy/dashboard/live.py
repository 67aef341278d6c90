"""Live: this proxy process right now: each backend's health, busy slots and models; each
user's requests being served and waiting in the fair queue. The page asks `/live.json` again
every few seconds.

What it shows is this process's own: with several proxy processes each has its own queues (and
its own dashboard); rate limits and quotas, shared through Postgres, are on the Users page.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.appkeys import ADMISSION, AUDIT_WRITER, BACKENDS, DATABASE
from proxy.dashboard.keys import PROXY
from proxy.dashboard.render import render
from proxy.db import queries
from proxy.db.connect import DatabaseUnavailable

REFRESH_SECONDS = 2


async def snapshot(proxy: web.Application) -> dict[str, Any]:
    backends = proxy[BACKENDS]
    shown = []
    for upstream in backends.upstreams:
        name = upstream.name
        health = backends.health(name)
        shown.append(
            {
                "name": name,
                "url": f"{upstream.scheme}://{upstream.host}:{upstream.port}",
                "up": health.up,
                "problem": health.problem,
                "busy": backends.in_flight(name),
                "slots": backends.slots(name),
                "queued": backends.queued(name),
                "models": sorted(health.models) if health.models is not None else None,
                "default": health.default,
            }
        )
    # A place is held from admission to the end; a queued request holds one too.
    held = proxy[ADMISSION].places.by_user()
    waiting = backends.waiting_by_user()
    ids: set[Hashable] = set(held) | set(waiting)
    names: dict[int, str] = {}
    database = proxy[DATABASE]
    with contextlib.suppress(DatabaseUnavailable):  # ids stand in for names meanwhile
        names = await database.run(
            lambda con: queries.usernames(con, [i for i in ids if isinstance(i, int)])
        )

    def shown_name(user: Hashable) -> str:
        return names.get(user, f"user #{user}") if isinstance(user, int) else str(user)

    counts = [(shown_name(u), held.get(u, 0) - waiting.get(u, 0), waiting.get(u, 0)) for u in ids]
    counts.sort(key=lambda c: (-c[1] - c[2], c[0]))  # the busiest first
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "backends": shown,
        "users": [{"username": n, "served": s, "queued": q} for n, s, q in counts],
        "served": sum(c[1] for c in counts),
        "queued": sum(c[2] for c in counts),
        "database_up": database.up,
        "audit_backlog": proxy[AUDIT_WRITER].backlog,
        "refresh_seconds": REFRESH_SECONDS,
    }


async def page(request: web.Request) -> web.StreamResponse:
    """The live view (the script refreshes it from /live.json)."""
    return render(request, "live.html", live=await snapshot(request.app[PROXY]))


async def snapshot_json(request: web.Request) -> web.StreamResponse:
    """The live view's figures, for the page's refresh."""
    return web.json_response(
        await snapshot(request.app[PROXY]), headers={"Cache-Control": "no-store"}
    )
