"""Admin commands for groups: create, list, members, delete (budgets: `set-limit --group`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
import click

from proxy.cli.limitopts import budget_options, describe_budgets, limit_columns
from proxy.cli.support import USERNAME_RULE, print_json, print_table, run_db, username_arg
from proxy.db import limits as limits_sql
from proxy.settings import MAX_CONCURRENT_MAX, RATE_LIMIT_MAX, RATE_WINDOW_MAX_SECONDS

GROUP_RULE = USERNAME_RULE.replace("username", "group name")


def group_arg(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Group names follow the username rule (case-insensitive, stored lower-case)."""
    try:
        return username_arg(ctx, param, value)
    except click.BadParameter:
        raise click.BadParameter(f"{value!r} is not a valid group name: use {GROUP_RULE}") from None


async def checked_time_zone(con: asyncpg.Connection, time_zone: str) -> None:
    if not await limits_sql.valid_time_zone(con, time_zone):
        raise click.BadParameter(
            f"{time_zone!r} is not a time zone Postgres knows; use an IANA name such as "
            "UTC, Europe/Berlin or America/New_York",
            param_hint="--time-zone",
        )


def describe_group(group: Mapping[str, Any] | asyncpg.Record) -> str:
    """A group's limits and budgets, as one line."""
    row = dict(group)
    limits = []
    if row["rate_limit"] is not None:
        window = row["rate_window_seconds"] or "default"
        limits.append(f"{row['rate_limit']} requests per {window} s")
    if row["max_concurrent"] is not None:
        limits.append(f"{row['max_concurrent']} requests at once")
    return f"group {row['name']!r} ({row['time_zone']}): " + ", ".join(
        [*limits, describe_budgets(row)]
    )


@click.command("create-group")
@click.option("--name", required=True, callback=group_arg, help=GROUP_RULE + ".")
@click.option(
    "--time-zone",
    default="UTC",
    show_default=True,
    help="IANA time zone whose days, weeks and months the budgets count.",
)
@click.option(
    "--rate-limit", type=click.IntRange(1, RATE_LIMIT_MAX), help="Requests per window, together."
)
@click.option(
    "--window",
    type=click.IntRange(1, RATE_WINDOW_MAX_SECONDS),
    help="The rate window in seconds (default: the proxy's).",
)
@click.option(
    "--max-concurrent",
    type=click.IntRange(1, MAX_CONCURRENT_MAX),
    help="Requests the members may have in flight or queued at once, together.",
)
@budget_options
def create_group(name: str, time_zone: str, **limits: int | None) -> None:
    """Create a group (a team, a class, a project) with token budgets its members share.

    A member's request must fit their own limits and every limit and budget of each of their
    groups; a budget reached is a 429 naming the group and when the period resets. Request
    limits, budgets and the cap on requests at once hold across proxy processes. Turns at the
    model go round groups first, then round their users (across processes too). Add
    members with add-to-group, change limits with `set-limit --group`.

    Example:

    \b
        llama-gate create-group --name research --time-zone Europe/Berlin \\
            --tokens-per-day 200000 --tokens-per-month 3000000
    """

    async def work(con: asyncpg.Connection) -> asyncpg.Record | None:
        await checked_time_zone(con, time_zone)
        return await limits_sql.create_group(con, name, time_zone, limit_columns(limits))

    row = run_db(work)
    if row is None:
        raise click.ClickException(f"a group named {name!r} already exists (see list-groups)")
    click.echo(f"Created {describe_group(row)}. Add members with: llama-gate add-to-group "
               f"--group {name} --username NAME")  # fmt: skip


@click.command("list-groups")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_groups(as_json: bool) -> None:
    """Groups, their members, limits, budgets, and each budget's use in its current period.

    Example:

        llama-gate list-groups --json
    """
    rows = run_db(lambda con: limits_sql.list_groups(con))
    if as_json:
        print_json(rows)
        return
    table = [
        {
            "name": row["name"],
            "time_zone": row["time_zone"],
            "members": ",".join(row["members"]) or "-",
            **{
                per: f"{row[f'used_{per}']}/{row[f'tokens_per_{per}']}"
                if row[f"tokens_per_{per}"] is not None
                else "-"
                for per in limits_sql.PERIODS
            },
        }
        for row in rows
    ]
    print_table(table, ["name", "time_zone", "members", *limits_sql.PERIODS])


@click.command("add-to-group")
@click.option("--group", required=True, callback=group_arg)
@click.option("--username", required=True, callback=username_arg)
def add_to_group(group: str, username: str) -> None:
    """Make a user a member of a group: their requests count against its budgets at once.

    Example:

        llama-gate add-to-group --group research --username alice
    """
    result = run_db(lambda con: limits_sql.add_member(con, group, username))
    if result == "no group":
        raise click.ClickException(f"no group named {group!r} (see list-groups)")
    if result == "no user":
        raise click.ClickException(f"no user named {username!r} (see list-users)")
    click.echo(f"{username} is {'already' if result == 'already' else 'now'} a member of {group}.")


@click.command("remove-from-group")
@click.option("--group", required=True, callback=group_arg)
@click.option("--username", required=True, callback=username_arg)
def remove_from_group(group: str, username: str) -> None:
    """Take a user out of a group (what they used stays counted in its current periods).

    Example:

        llama-gate remove-from-group --group research --username alice
    """
    if not run_db(lambda con: limits_sql.remove_member(con, group, username)):
        raise click.ClickException(f"{username!r} is not a member of a group named {group!r}")
    click.echo(f"{username} is no longer a member of {group}.")


@click.command("delete-group")
@click.option("--name", required=True, callback=group_arg)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete_group(name: str, yes: bool) -> None:
    """Delete a group and its limits; its members and their rows stay.

    Example:

        llama-gate delete-group --name research --yes
    """
    if not yes:
        click.confirm(f"Delete group {name!r} and its budgets?", abort=True)
    if not run_db(lambda con: limits_sql.delete_group(con, name)):
        raise click.ClickException(f"no group named {name!r} (see list-groups)")
    click.echo(f"Deleted group {name}.")


def set_group_limits(group: str, time_zone: str | None, given: Mapping[str, int | None]) -> None:
    """`set-limit --group`: limits and budgets given (0: removed) and the time zone."""
    changes: dict[str, Any] = limit_columns(given)
    if time_zone is not None:
        changes["time_zone"] = time_zone
    if not changes:
        raise click.UsageError("give at least one limit, budget or --time-zone for the group")

    async def work(con: asyncpg.Connection) -> asyncpg.Record | None:
        if time_zone is not None:
            await checked_time_zone(con, time_zone)
        return await limits_sql.set_group(con, group, changes)

    row = run_db(work)
    if row is None:
        raise click.ClickException(f"no group named {group!r} (see list-groups)")
    click.echo(f"{describe_group(row)}.")


def group_usage(group: str, since: Any, as_json: bool) -> None:
    """`usage --group`: the members' use per day, then each budget's use in its period."""

    async def work(con: asyncpg.Connection) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        daily = await limits_sql.group_usage_daily(con, since, group)
        budgets = [row for row in await limits_sql.list_groups(con) if row["name"] == group]
        return daily, budgets

    daily, budgets = run_db(work)
    if not budgets:
        raise click.ClickException(f"no group named {group!r} (see list-groups)")
    now = budgets[0]
    periods = limits_sql.budgets_now(now)
    if as_json:
        print_json([{"group": group, "days": [dict(r) for r in daily], "budgets": periods}])
        return
    columns = ["day", "username", "requests", "errors", "prompt_tokens", "completion_tokens"]
    print_table(daily, columns)
    click.echo(f"\nBudgets of {group} ({now['time_zone']}), now:")
    print_table(periods, ["period", "used", "budget", "resets_at"])
