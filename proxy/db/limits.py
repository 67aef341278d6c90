"""The runtime SQL of the limits: the rate windows' decisions and leases (migration 0019), groups
and their members, keys' limits and budgets, the budgets' charges (migration 0018's functions)
and model weights.

Beside the rest of the runtime SQL, one module a concern (`accounts`, `usage`, `ledger`,
`admin_tokens`, `stored_responses`, `cluster`): `proxy.db` is the one place SQL is written at run
time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg

from proxy.db.connect import Connection

GROUPS_CHANNEL = "llama_gate_groups"  # NOTIFY when groups, members or model weights change
PERIODS = ("minute", "day", "week", "month")
BUDGET_COLUMNS = tuple(f"tokens_per_{per}" for per in PERIODS)
GROUP_LIMITS = ("rate_limit", "rate_window_seconds", "max_concurrent")
KEY_LIMITS = ("rate_limit", "rate_window_seconds", *BUDGET_COLUMNS)
# A key's budget holder: the first key of its rotations (see `carry_key_limits`).
KEY_HOLDER = "'k:' || coalesce(k.limits_key, k.key_id)"
_GROUP_COLUMNS = ", ".join(
    f"g.{c}" for c in ("id", "name", "time_zone", *GROUP_LIMITS, *BUDGET_COLUMNS)
)


@dataclass(frozen=True)
class Charge:
    """What `llama_gate_group_reserve` decided for one request."""

    granted: int  # the answer's room left to it (refused: 0)
    refused: bool
    too_large: bool  # no budget could ever let it through
    holder: str | None  # whose budget is told ("group 'x'", "key lgk_..."): the one reached,
    # or else the tightest (None: no budget applies)
    period: str | None
    used: int | None  # that budget's use, this request's charge included when admitted
    budget: int | None
    resets_at: datetime | None


@dataclass(frozen=True)
class GroupLimit:
    """A group's request limit and cap on requests at once (None: none)."""

    group_id: int
    name: str
    rate_limit: int | None
    rate_window_seconds: int | None
    max_concurrent: int | None


@dataclass(frozen=True)
class Membership:
    teams: dict[int, int]  # each member's first group (lowest id): their turns' team
    budgeted: frozenset[int]  # members of at least one group with a token budget
    limits: dict[int, tuple[GroupLimit, ...]]  # members' groups with a request limit or a cap


async def memberships(con: Connection) -> Membership:
    rows = await con.fetch(
        f"""SELECT m.user_id, {_GROUP_COLUMNS}
            FROM llama_group_members m JOIN llama_groups g ON g.id = m.group_id
            ORDER BY m.user_id, g.id"""
    )
    teams: dict[int, int] = {}
    budgeted: set[int] = set()
    limits: dict[int, list[GroupLimit]] = {}
    for row in rows:
        user = row["user_id"]
        teams.setdefault(user, row["id"])
        if any(row[column] is not None for column in BUDGET_COLUMNS):
            budgeted.add(user)
        if row["rate_limit"] is not None or row["max_concurrent"] is not None:
            limits.setdefault(user, []).append(
                GroupLimit(
                    row["id"],
                    row["name"],
                    row["rate_limit"],
                    row["rate_window_seconds"],
                    row["max_concurrent"],
                )
            )
    return Membership(
        teams, frozenset(budgeted), {user: tuple(groups) for user, groups in limits.items()}
    )


async def model_weights(con: Connection) -> dict[str, float]:
    rows = await con.fetch("SELECT model, weight FROM llama_model_weights")
    return {row["model"]: float(row["weight"]) for row in rows}


async def set_model_weight(con: Connection, model: str, weight: float | None) -> None:
    """Give `model` a weight (None: back to 1)."""
    if weight is None:
        await con.execute("DELETE FROM llama_model_weights WHERE model = $1", model)
    else:
        await con.execute(
            """INSERT INTO llama_model_weights (model, weight) VALUES ($1, $2)
               ON CONFLICT (model) DO UPDATE SET weight = EXCLUDED.weight""",
            model,
            weight,
        )


@dataclass(frozen=True)
class LeaseGrant:
    """What `llama_gate_lease` (migration 0019) decided for the requests of one user, key or
    group that were waiting together."""

    granted: int  # the first `granted` of them are admitted
    leased: int  # places more, for this proxy to admit on its own until `lease_ends`
    free: int  # places free before these: the k-th admitted leaves `free - k`
    reset_ms: int
    retry_after_ms: int  # 0 when all were granted
    granted_at: datetime  # Postgres's clock
    lease_ends: datetime | None  # None: nothing leased, nothing to give back


@dataclass(frozen=True)
class LeaseReturn:
    """A lease given back: its rows (stamped `ends`) and when each admission in it was made."""

    ends: datetime
    rows: int
    used_at: list[datetime]


async def lease(
    con: Connection,
    holder: int | str,
    limit: int,
    window_ms: int,
    count: int,
    extra: int,
    ttl_ms: int,
    given_back: LeaseReturn | None,
) -> LeaseGrant:
    """Decide `count` requests of a user (`holder` an id) or of a key or group (`k:<key id>`,
    `g:<group id>`) against its sliding window, leasing up to `extra` places more, after giving
    back `given_back`."""
    function = "llama_gate_lease" if isinstance(holder, int) else "llama_gate_lease_subject"
    row = await con.fetchrow(
        f"""SELECT granted, leased, free, reset_ms, retry_after_ms, granted_at, lease_ends
            FROM {function}($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        holder,
        limit,
        window_ms,
        count,
        extra,
        ttl_ms,
        given_back.ends if given_back else None,
        given_back.rows if given_back else 0,
        given_back.used_at if given_back else [],
    )
    assert row is not None
    return LeaseGrant(**dict(row))


async def set_key_limits(
    con: Connection, key_id: str, limits: Mapping[str, int | None]
) -> asyncpg.Record | None:
    """Set some of a key's `KEY_LIMITS` (None: none); the key's row after, or None."""
    unknown = set(limits) - set(KEY_LIMITS)
    if unknown:
        raise ValueError(f"not a key limit: {sorted(unknown)}")
    names = list(limits)
    assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(names, start=2))
    return await con.fetchrow(
        f"""UPDATE api_keys SET {assignments} WHERE key_id = $1
            RETURNING key_id, {", ".join(KEY_LIMITS)}""",
        key_id,
        *(limits[column] for column in names),
    )


async def reserve(
    con: Connection,
    user_id: int,
    key_id: str,
    request_id: str,
    prompt: int,
    answer: int,
    weight: float,
    now: datetime | None,
) -> Charge:
    row = await con.fetchrow(
        "SELECT * FROM llama_gate_budget_reserve($1, $2, $3, $4, $5, $6, $7)",
        user_id,
        key_id,
        request_id,
        prompt,
        answer,
        weight,
        now,
    )
    assert row is not None
    return Charge(
        int(row["granted"]),
        bool(row["refused"]),
        bool(row["too_large"]),
        row["holder"],
        row["period"],
        row["used"],
        row["budget"],
        row["resets_at"],
    )


async def settle(con: Connection, costs: Mapping[str, int]) -> None:
    """Move each request's charge to what it really cost, in weighted tokens (requests never
    charged: nothing)."""
    await con.execute(
        "SELECT llama_gate_budget_settle($1::text[], $2::bigint[])",
        list(costs),
        list(costs.values()),
    )


async def carry_key_limits(con: Connection, old: str, new: str) -> None:
    """A rotated key's limits and budgets go to its successor, which spends the same budgets and
    request window (so rotating never starts them afresh, and the old key in its grace and the
    new one together never get more than one key's)."""
    await con.execute(
        f"""UPDATE api_keys n SET {", ".join(f"{c} = o.{c}" for c in KEY_LIMITS)},
                   limits_key = coalesce(o.limits_key, o.key_id)
            FROM api_keys o WHERE o.key_id = $1 AND n.key_id = $2""",
        old,
        new,
    )


async def create_group(
    con: Connection, name: str, time_zone: str, budgets: Mapping[str, int | None]
) -> asyncpg.Record | None:
    """A new group; None when the name is taken."""
    columns = ["name", "time_zone", *budgets]
    values = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    return await con.fetchrow(
        f"""INSERT INTO llama_groups ({", ".join(columns)}) VALUES ({values})
            ON CONFLICT (name) DO NOTHING RETURNING *""",
        name,
        time_zone,
        *budgets.values(),
    )


async def valid_time_zone(con: Connection, time_zone: str) -> bool:
    return bool(
        await con.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = $1)", time_zone
        )
    )


async def set_group(
    con: Connection, name: str, changes: Mapping[str, Any]
) -> asyncpg.Record | None:
    """Set some of a group's budgets (None: none) or its time zone; the row after, or None."""
    unknown = set(changes) - {*BUDGET_COLUMNS, *GROUP_LIMITS, "time_zone"}
    if unknown:
        raise ValueError(f"not a group setting: {sorted(unknown)}")
    names = list(changes)
    assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(names, start=2))
    return await con.fetchrow(
        f"UPDATE llama_groups SET {assignments} WHERE name = $1 RETURNING *",
        name,
        *(changes[column] for column in names),
    )


async def delete_group(con: Connection, name: str) -> bool:
    return (
        await con.fetchval("DELETE FROM llama_groups WHERE name = $1 RETURNING id", name)
        is not None
    )


async def add_member(con: Connection, group: str, username: str) -> str:
    """'added', 'already', 'no group' or 'no user'."""
    row = await con.fetchrow(
        """SELECT (SELECT id FROM llama_groups WHERE name = $1) AS group_id,
                  (SELECT id FROM users WHERE username = $2) AS user_id""",
        group,
        username,
    )
    assert row is not None
    if row["group_id"] is None:
        return "no group"
    if row["user_id"] is None:
        return "no user"
    added = await con.fetchval(
        """INSERT INTO llama_group_members (group_id, user_id) VALUES ($1, $2)
           ON CONFLICT DO NOTHING RETURNING user_id""",
        row["group_id"],
        row["user_id"],
    )
    return "added" if added is not None else "already"


async def remove_member(con: Connection, group: str, username: str) -> bool:
    return (
        await con.fetchval(
            """DELETE FROM llama_group_members m USING llama_groups g, users u
               WHERE m.group_id = g.id AND m.user_id = u.id AND g.name = $1 AND u.username = $2
               RETURNING m.user_id""",
            group,
            username,
        )
        is not None
    )


async def list_groups(con: Connection, now: datetime | None = None) -> list[asyncpg.Record]:
    """Every group with its members and each budget's use in its current period."""
    return await con.fetch(
        f"""SELECT {_GROUP_COLUMNS},
                   coalesce((SELECT array_agg(u.username ORDER BY u.username)
                             FROM llama_group_members m JOIN users u ON u.id = m.user_id
                             WHERE m.group_id = g.id), '{{}}') AS members,
                   {", ".join(_period_use(per) for per in PERIODS)}
            FROM llama_groups g ORDER BY g.name""",
        now,
    )


def _period_use(per: str, holder: str = "'g:' || g.id", zone: str = "g.time_zone") -> str:
    """A budget's use in the period `$1` (NULL: now) falls in, and when that period ends."""
    zone = "'UTC'" if per == "minute" else zone  # as llama_gate_budget_reserve counts them
    local = f"date_trunc('{per}', coalesce($1::timestamptz, now()) AT TIME ZONE {zone})"
    return f"""coalesce((SELECT s.tokens FROM llama_budget_spend s
                         WHERE s.holder = {holder} AND s.period = '{per}'
                           AND s.starts = {local} AT TIME ZONE {zone}), 0) AS used_{per},
               ({local} + interval '1 {per}') AT TIME ZONE {zone} AS {per}_resets_at"""


async def key_limits(
    con: Connection, key_id: str, now: datetime | None = None
) -> asyncpg.Record | None:
    """A key's own limits and each budget's use in its current period (UTC)."""
    return await con.fetchrow(
        f"""SELECT k.key_id, {", ".join(f"k.{c}" for c in KEY_LIMITS)},
                   {", ".join(_period_use(per, KEY_HOLDER, "'UTC'") for per in PERIODS)}
            FROM api_keys k WHERE k.key_id = $2""",
        now,
        key_id,
    )


async def groups_of(
    con: Connection, user_id: int, now: datetime | None = None
) -> list[asyncpg.Record]:
    """The groups `user_id` is in, as `list_groups` shows them."""
    return await con.fetch(
        f"""SELECT {_GROUP_COLUMNS},
                   {", ".join(_period_use(per) for per in PERIODS)}
            FROM llama_groups g JOIN llama_group_members m ON m.group_id = g.id
            WHERE m.user_id = $2 ORDER BY g.name""",
        now,
        user_id,
    )


async def group_usage_daily(con: Connection, since: date, group: str) -> list[asyncpg.Record]:
    """The group's members' use per UTC day (`llama_usage_daily_by_group`)."""
    return await con.fetch(
        """SELECT day, group_name, username, requests, errors, prompt_tokens, completion_tokens
           FROM llama_usage_daily_by_group WHERE day >= $1 AND group_name = $2
           ORDER BY day DESC, username""",
        since,
        group,
    )


def budgets_now(group: Mapping[str, Any] | asyncpg.Record) -> list[dict[str, Any]]:
    """A row of `list_groups` or `groups_of` as its budgets: period, budget, used, resets_at."""
    return [
        {
            "period": per,
            "budget": group[f"tokens_per_{per}"],
            "used": group[f"used_{per}"],
            "resets_at": group[f"{per}_resets_at"],
        }
        for per in PERIODS
        if group[f"tokens_per_{per}"] is not None
    ]


async def groups_daily_tokens(con: Connection, since: date) -> list[asyncpg.Record]:
    """Each group's tokens per UTC day since `since` (for the dashboard's charts)."""
    return await con.fetch(
        """SELECT group_name, day, sum(prompt_tokens + completion_tokens) AS tokens,
                  sum(requests) AS requests
           FROM llama_usage_daily_by_group WHERE day >= $1
           GROUP BY 1, 2 ORDER BY 1, 2""",
        since,
    )
