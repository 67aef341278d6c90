"""Live: every proxy process right now: each backend's health, models and busy slots; each user's
requests being served and waiting in the fair queue, across all processes; and the processes
themselves. The page asks `/live.json` again every few seconds.

This process's figures are read from memory; the other processes' from their rows of
`llama_proxies` (`proxy.cluster.presence`), at most a beat (2 s) old. Health is this process's
view of the backends.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.appkeys import ADMISSION, AUDIT_WRITER, BACKENDS, DATABASE, PRESENCE
from proxy.cluster.presence import local_figures
from proxy.dashboard.keys import PROXY
from proxy.dashboard.render import render
from proxy.db import accounts
from proxy.db.connect import DatabaseUnavailable

REFRESH_SECONDS = 2


async def snapshot(proxy: web.Application) -> dict[str, Any]:
    backends = proxy[BACKENDS]
    presence = proxy[PRESENCE]
    own = local_figures(backends, proxy[ADMISSION].places.by_user())
    peers = await presence.peers()
    everyone = [own, *(peer.live for peer in peers)]
    busy_all: dict[str, int] = defaultdict(int)
    queued_all: dict[str, int] = defaultdict(int)
    for figures in everyone:
        for backend in figures.get("backends", []):
            busy_all[backend["name"]] += backend["busy"]
            queued_all[backend["name"]] += backend["queued"]
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
                "busy": backends.in_flight(name),  # this process's
                "slots": backends.slots(name),
                "queued": backends.queued(name),
                "busy_all": busy_all[name],  # every process's
                "queued_all": queued_all[name],
                "models": sorted(health.models) if health.models is not None else None,
                "default": health.default,
            }
        )
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for figures in everyone:
        for user, (served, queued) in figures.get("users", {}).items():
            totals[user][0] += served
            totals[user][1] += queued
    names: dict[int, str] = {}
    database = proxy[DATABASE]
    ids = [int(user) for user in totals if user.isdigit()]
    with contextlib.suppress(DatabaseUnavailable):  # ids stand in for names meanwhile
        names = await database.run(lambda con: accounts.usernames(con, ids))

    def shown_name(user: str) -> str:
        return names.get(int(user), f"user #{user}") if user.isdigit() else user

    counts = [(shown_name(u), served, queued) for u, (served, queued) in totals.items()]
    counts.sort(key=lambda c: (-c[1] - c[2], c[0]))  # the busiest first
    processes = [
        _process(presence.id, presence.host, presence.pid, own, None, this=True),
        *(_process(p.id, p.host, p.pid, p.live, p.seen_at, this=False) for p in peers),
    ]
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "backends": shown,
        "users": [{"username": n, "served": s, "queued": q} for n, s, q in counts],
        "served": sum(c[1] for c in counts),
        "queued": sum(c[2] for c in counts),
        "processes": processes,
        "database_up": database.up,
        "audit_backlog": proxy[AUDIT_WRITER].backlog,
        "refresh_seconds": REFRESH_SECONDS,
    }


def _process(
    id_: str, host: str, pid: int, live: dict[str, Any], seen: datetime | None, this: bool
) -> dict[str, Any]:
    users = live.get("users", {}).values()
    return {
        "id": id_,
        "host": host,
        "pid": pid,
        "this": this,
        "served": sum(served for served, _ in users),
        "queued": sum(queued for _, queued in users),
        "seen_at": seen.isoformat(timespec="seconds") if seen is not None else None,
    }


async def page(request: web.Request) -> web.StreamResponse:
    """The live view (the script refreshes it from /live.json)."""
    return render(request, "live.html", live=await snapshot(request.app[PROXY]))


async def snapshot_json(request: web.Request) -> web.StreamResponse:
    """The live view's figures, for the page's refresh."""
    return web.json_response(
        await snapshot(request.app[PROXY]), headers={"Cache-Control": "no-store"}
    )
