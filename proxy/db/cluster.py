"""The runtime SQL of proxy processes as one gateway: each process's presence (`llama_proxies`)
and the backend slots they share (migration 0017's functions), used by `proxy.cluster`.

Beside the rest of the runtime SQL in `proxy.db`, one module a concern, as `proxy.db.limits` is.
"""

from __future__ import annotations

import json

import asyncpg

from proxy.db.connect import Connection

# --- proxy processes' presence (llama_proxies) ---------------------------------------------------


async def beat_proxy(
    con: Connection,
    proxy_id: str,
    host: str,
    pid: int,
    live: str,
    stale_seconds: float,
    shared: bool = False,
) -> int:
    """Refresh this process's row with its live figures (JSON text) and whether it uses shared
    slots, and delete the rows of processes not seen for `stale_seconds` (gone: killed or cut
    off), in one statement: how many other processes are live. Times are Postgres's own, so no
    proxy's clock decides who is gone."""
    others = await con.fetchval(
        """WITH gone AS (DELETE FROM llama_proxies
                         WHERE seen_at < now() - make_interval(secs => $5) AND id <> $1),
                mine AS (INSERT INTO llama_proxies (id, host, pid, seen_at, live, shared)
                         VALUES ($1, $2, $3, now(), $4::jsonb, $6)
                         ON CONFLICT (id) DO UPDATE
                         SET seen_at = now(), live = excluded.live, shared = excluded.shared)
           SELECT count(*) FROM llama_proxies
           WHERE id <> $1 AND seen_at >= now() - make_interval(secs => $5)""",
        proxy_id,
        host,
        pid,
        live,
        stale_seconds,
        shared,
    )
    return int(others)


async def live_proxies(con: Connection, stale_seconds: float) -> list[asyncpg.Record]:
    """The processes seen within `stale_seconds`, oldest first, with their live figures."""
    return await con.fetch(
        """SELECT id, host, pid, started_at, seen_at, live::text AS live FROM llama_proxies
           WHERE seen_at >= now() - make_interval(secs => $1) ORDER BY started_at, id""",
        stale_seconds,
    )


async def leave_proxy(con: Connection, proxy_id: str) -> None:
    await con.execute("DELETE FROM llama_proxies WHERE id = $1", proxy_id)


# --- backend slots shared by proxy processes (migration 0017's functions) -----------------------

SLOTS_CHANNEL = "llama_gate_slots"  # NOTIFY payload: "<proxy id> <request id> <backend>"


async def offer_slots(con: Connection, slots: dict[str, int]) -> None:
    """Say how many slots each backend has (every process says the same)."""
    await con.executemany(
        """INSERT INTO llama_slot_backends (backend, slots) VALUES ($1, $2)
           ON CONFLICT (backend) DO UPDATE SET slots = excluded.slots""",
        list(slots.items()),
    )


async def wait_for_slots(
    con: Connection,
    proxy_id: str,
    requests: list[dict[str, object]],
    lease_seconds: float,
    stale_seconds: float,
) -> dict[int, str | None]:
    """Queue requests that arrived together for slots (each `{"id", "user", "backends",
    "prefer", "cap"}`): per request the backend granted at once, None to wait for a grant, or
    "!cap" when its user already holds `cap` places across processes."""
    answer = await con.fetchval(
        "SELECT llama_gate_slot_wait($1, $2::jsonb, $3, $4)",
        proxy_id,
        json.dumps(requests),
        lease_seconds,
        stale_seconds,
    )
    return {int(request_id): backend for request_id, backend in json.loads(answer).items()}


async def release_slots(
    con: Connection, request_ids: list[int], lease_seconds: float, stale_seconds: float
) -> None:
    """Give back requests' leases (or their places in the wait) and grant what is free."""
    await con.execute(
        "SELECT llama_gate_slot_release($1::bigint[], $2, $3)",
        request_ids,
        lease_seconds,
        stale_seconds,
    )


async def grant_slots(con: Connection, lease_seconds: float, stale_seconds: float) -> None:
    """Grant every free slot to the requests waiting for one (expired leases freed first)."""
    await con.execute(
        "SELECT llama_gate_slot_grant($1, $2, '{}', true)", lease_seconds, stale_seconds
    )


async def slot_states(
    con: Connection, proxy_id: str, request_ids: list[int]
) -> dict[int, str | None]:
    """Where this process's waiting requests stand: the backend of those granted a lease, None
    for those still waiting; a request that is neither (its row is gone) is left out."""
    rows = await con.fetch(
        """SELECT id, backend FROM llama_slot_leases
           WHERE proxy_id = $1 AND id = ANY($2::bigint[])
           UNION ALL
           SELECT id, NULL FROM llama_slot_waiters
           WHERE proxy_id = $1 AND id = ANY($2::bigint[])""",
        proxy_id,
        request_ids,
    )
    return {row["id"]: row["backend"] for row in rows}


async def renew_slots(
    con: Connection,
    proxy_id: str,
    slots: dict[str, int],
    leases: list[tuple[int, str, int]],
    waiting: list[int],
    lone: dict[str, int],
    lease_seconds: float,
) -> None:
    """Renew what this process holds: its backends' `slots` (written back, like its `leases`
    (request id, backend, user id), should Postgres have lost them in a crash), its `waiting`
    requests, and its `lone` leases (backend -> requests it still runs from before it switched
    to shared slots). Rows a release holds are skipped: they are going anyway, and waiting for
    one could deadlock with it."""
    async with con.transaction():
        await con.execute("SET LOCAL synchronous_commit = off")
        await con.execute(  # empty only after a crash of Postgres: a new epoch begins
            "INSERT INTO llama_slot_epoch (began) VALUES (now()) ON CONFLICT DO NOTHING"
        )
        await offer_slots(con, slots)
        for table, ids in (
            ("llama_slot_leases", [lease[0] for lease in leases]),
            ("llama_slot_waiters", waiting),
        ):
            await con.execute(
                f"""WITH mine AS (SELECT id FROM {table}
                                  WHERE proxy_id = $1 AND id = ANY($2::bigint[])
                                  ORDER BY id FOR UPDATE SKIP LOCKED)
                    UPDATE {table} t SET expires_at = now() + make_interval(secs => $3)
                    FROM mine WHERE t.id = mine.id""",
                proxy_id,
                ids,
                lease_seconds,
            )
        await con.execute(
            """INSERT INTO llama_slot_leases (id, backend, proxy_id, user_id, n, expires_at)
               SELECT l.id, l.backend, $1, l.user_id, 1, now() + make_interval(secs => $5)
               FROM unnest($2::bigint[], $3::text[], $4::bigint[]) AS l(id, backend, user_id)
               WHERE NOT EXISTS (SELECT 1 FROM llama_slot_leases x WHERE x.id = l.id)
               ON CONFLICT (id) DO NOTHING""",
            proxy_id,
            [lease[0] for lease in leases],
            [lease[1] for lease in leases],
            [lease[2] for lease in leases],
            lease_seconds,
        )
        await con.execute("DELETE FROM llama_slot_leases WHERE proxy_id = $1 AND lone", proxy_id)
        await con.execute(
            """INSERT INTO llama_slot_leases (id, backend, proxy_id, n, lone, expires_at)
               SELECT -1 - (abs(hashtextextended($1 || ' ' || backend, 0)) % 4611686018427387904),
                      backend, $1, n, true, now() + make_interval(secs => $4)
               FROM unnest($2::text[], $3::int[]) AS l(backend, n) WHERE n > 0""",
            proxy_id,
            list(lone),
            list(lone.values()),
            lease_seconds,
        )


async def leave_slots(con: Connection, proxy_id: str) -> None:
    """Give back everything this process holds or waits for (it is stopping)."""
    await con.execute("DELETE FROM llama_slot_waiters WHERE proxy_id = $1", proxy_id)
    await con.execute("DELETE FROM llama_slot_leases WHERE proxy_id = $1", proxy_id)
