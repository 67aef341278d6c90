"""Admin commands for users: create, list, enable/disable, delete, and per-user limits."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import asyncpg
import click

from proxy.auth.apikeys import NewKey
from proxy.auth.issuing import issue_key
from proxy.cli.groups import group_arg, set_group_limits
from proxy.cli.keys import announce_key, optional_key_id, set_key_limits
from proxy.cli.limitopts import Override, limit_columns
from proxy.cli.support import (
    USERNAME_RULE,
    Duration,
    print_json,
    print_table,
    run_db,
    state,
    username_arg,
)
from proxy.db import accounts
from proxy.settings import (
    MAX_CONCURRENT_MAX,
    MAX_TOKENS_MAX,
    RATE_LIMIT_MAX,
    RATE_WINDOW_MAX_SECONDS,
    TOKEN_QUOTA_MAX,
    Settings,
)

_RATE_LIMIT = click.IntRange(1, RATE_LIMIT_MAX)
_WINDOW = click.IntRange(1, RATE_WINDOW_MAX_SECONDS)


@click.command("create-user")
@click.option("--username", required=True, callback=username_arg, help=USERNAME_RULE + ".")
@click.option("--rate-limit", type=_RATE_LIMIT, help="Requests per window (default: global).")
@click.option("--window", type=_WINDOW, help="Window length in seconds (default: global).")
@click.option("--label", help="A note for the first key.")
@click.option(
    "--expires-in", type=Duration(positive=True), help="Expire the first key after this long."
)
def create_user(
    username: str,
    rate_limit: int | None,
    window: int | None,
    label: str | None,
    expires_in: timedelta | None,
) -> None:
    """Create a user with a first API key, printed once along with a curl line to try it.

    Usernames are case-insensitive and stored lower-case.

    Example:

        llama-gate create-user --username alice --rate-limit 120 --window 60
    """

    async def work(con: asyncpg.Connection) -> NewKey:
        async with con.transaction():
            try:
                user = await accounts.create_user(con, username, rate_limit, window)
            except accounts.DuplicateUser:
                raise click.ClickException(
                    f"user {username!r} already exists; give them another key with "
                    f"`llama-gate create-key --username {username}`"
                ) from None
            return await issue_key(con, user["id"], label, expires_in)

    key = run_db(work)
    settings = state().settings()
    limit = rate_limit or settings.rate_limit
    seconds = window or settings.rate_window_seconds
    click.echo(f"Created user {username} (at most {limit} requests per {seconds} s).")
    announce_key(settings, username, key)


@click.command("list-users")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_users(as_json: bool) -> None:
    """List users with their limits, number of usable keys and last use.

    A dash is no override: the proxy's setting applies (for token quotas: none).

    Example:

        llama-gate list-users --json
    """
    rows = run_db(accounts.list_users)
    if as_json:
        print_json(rows)
    else:
        columns = ["username", "enabled", "rate_limit", "rate_window_seconds", "max_concurrent"]
        quotas = ["max_tokens", "tokens_per_day", "tokens_per_minute", "active_keys"]
        print_table(rows, [*columns, *quotas, "last_used_at", "created_at"])


def _set_enabled(username: str, enabled: bool) -> None:
    if not run_db(lambda con: accounts.set_user_enabled(con, username, enabled)):
        raise click.ClickException(f"no user named {username!r} (see list-users)")


@click.command("disable-user")
@click.option("--username", required=True, callback=username_arg)
def disable_user(username: str) -> None:
    """Stop a user's keys from working, keeping the user and keys for later.

    Example:

        llama-gate disable-user --username alice
    """
    _set_enabled(username, False)
    click.echo(f"Disabled {username}; their keys are refused until enable-user.")


@click.command("enable-user")
@click.option("--username", required=True, callback=username_arg)
def enable_user(username: str) -> None:
    """Let a disabled user's keys work again.

    Example:

        llama-gate enable-user --username alice
    """
    _set_enabled(username, True)
    click.echo(f"Enabled {username}.")


@click.command("delete-user")
@click.option("--username", required=True, callback=username_arg)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete_user(username: str, yes: bool) -> None:
    """Delete a user and all their keys. Their audit rows stay, with the username.

    Example:

        llama-gate delete-user --username alice --yes
    """
    if not yes:
        click.confirm(f"Delete user {username} and all their keys?", abort=True)
    if not run_db(lambda con: accounts.delete_user(con, username)):
        raise click.ClickException(f"no user named {username!r} (see list-users)")
    click.echo(f"Deleted {username}; their llama_requests rows are kept.")


@click.command("set-limit")
@click.option("--username", callback=username_arg, help="The user whose limits to set.")
@click.option(
    "--group",
    callback=group_arg,
    help="Set a group's limits instead (--rate-limit, --window, --max-concurrent, budgets, "
    "--time-zone).",
)
@click.option(
    "--key",
    "key_id",
    callback=optional_key_id,
    help="Set a key's own limits instead (--rate-limit, --window, budgets).",
)
@click.option("--rate-limit", type=Override(RATE_LIMIT_MAX), help="Requests admitted per window.")
@click.option(
    "--window", type=Override(RATE_WINDOW_MAX_SECONDS), help="Rate window length in seconds."
)
@click.option(
    "--max-concurrent",
    type=Override(MAX_CONCURRENT_MAX),
    help="Requests the user (or the group's members together) may have in flight or queued at "
    "once (more get 429).",
)
@click.option(
    "--max-tokens",
    type=Override(MAX_TOKENS_MAX),
    help="Cap on one request's max_tokens; a request asking for more, or none, gets this.",
)
@click.option(
    "--tokens-per-day",
    type=Override(TOKEN_QUOTA_MAX),
    help="Token quota (prompt + completion, times the model's weight) per UTC day; 'none' "
    "removes it. A group's or key's budget: per calendar day (the group's time zone).",
)
@click.option(
    "--tokens-per-minute",
    type=Override(TOKEN_QUOTA_MAX),
    help="Token quota per rolling minute (a group's or key's: per calendar minute); 'none' "
    "removes it.",
)
@click.option(
    "--tokens-per-week",
    type=Override(TOKEN_QUOTA_MAX),
    help="A group's or key's budget per ISO week (from Monday 00:00); 'none' removes it.",
)
@click.option(
    "--tokens-per-month",
    type=Override(TOKEN_QUOTA_MAX),
    help="A group's or key's budget per calendar month; 'none' removes it.",
)
@click.option("--time-zone", help="With --group: the IANA time zone its periods are counted in.")
@click.option("--default", "use_default", is_flag=True, help="Drop every override: use the global.")
def set_limit(
    username: str | None,
    group: str | None,
    key_id: str | None,
    time_zone: str | None,
    use_default: bool,
    **given: int | None,
) -> None:
    """Set a user's own limits (rate limit, concurrency, max_tokens cap, token quotas), a
    group's, or a key's.

    Options left out keep their current value; an option given as `default` (or `none`) drops
    that override, and --default drops them all. Without an override a user gets the proxy's
    settings (LLAMA_PROXY_RATE_LIMIT, LLAMA_PROXY_RATE_WINDOW_SECONDS,
    LLAMA_PROXY_MAX_CONCURRENT, MAX_TOKENS_HARD_CAP) and no token quota. Quotas count the
    tokens in llama_requests; proxies apply a change within a second. A group's limits (see
    create-group) and a key's (see create-key) apply on every proxy at once, beside the user's.

    Example:

    \b
        llama-gate set-limit --username alice --rate-limit 10 --window 60
        llama-gate set-limit --username alice --tokens-per-day 200000 --max-tokens none
        llama-gate set-limit --group research --tokens-per-week 1000000 --max-concurrent 3
        llama-gate set-limit --key 0123456789abcdef --rate-limit 5 --tokens-per-month 100000
    """
    chosen = {name: value for name, value in given.items() if value is not None}
    if [username, group, key_id].count(None) != 2:
        raise click.UsageError("give one of --username, --group or --key")
    budgets = {f"tokens_per_{per}" for per in ("minute", "day", "week", "month")}
    if group is not None or key_id is not None:
        allowed = {"rate_limit", "window", *budgets}
        if group is not None:
            allowed.add("max_concurrent")
        others = sorted(set(chosen) - allowed)
        if others or use_default or (time_zone is not None and key_id is not None):
            wrong = ", ".join("--" + name.replace("_", "-") for name in others) or (
                "--default" if use_default else "--time-zone"
            )
            what = (
                "a group has --rate-limit, --window, --max-concurrent, token budgets and "
                "--time-zone"
                if group is not None
                else "a key has --rate-limit, --window and token budgets (periods in UTC)"
            )
            raise click.UsageError(f"{wrong}: {what}")
        if group is not None:
            set_group_limits(group, time_zone, chosen)
        else:
            assert key_id is not None
            set_key_limits(key_id, chosen)
        return
    assert username is not None
    for name in ("tokens_per_week", "tokens_per_month"):
        if name in chosen:
            raise click.UsageError(
                f"--{name.replace('_', '-')} is a group's or a key's budget (use --group or "
                "--key); a user's token quotas are per day and per minute"
            )
    if time_zone is not None:
        raise click.UsageError("--time-zone is a group's (use --group); users' days are UTC days")
    if use_default and chosen:
        raise click.UsageError("--default cannot be combined with other limits")
    if not use_default and not chosen:
        raise click.UsageError("give at least one limit to set, or --default")
    if use_default:
        limits: dict[str, int | None] = dict.fromkeys(accounts.LIMIT_COLUMNS)
    else:
        limits = limit_columns(chosen)
    row = run_db(lambda con: accounts.set_user_limits(con, username, limits))
    if row is None:
        raise click.ClickException(f"no user named {username!r} (see list-users)")
    click.echo(f"{username}: {describe_limits(row, state().settings())}.")


def describe_limits(user: Mapping[str, Any] | asyncpg.Record, settings: Settings) -> str:
    """A user's limits in effect, overrides and settings combined, as one line."""
    quotas = [
        f"{user[column]} per {per}"
        for column, per in (("tokens_per_day", "day (UTC)"), ("tokens_per_minute", "minute"))
        if user[column] is not None
    ]
    return (
        f"at most {user['rate_limit'] or settings.rate_limit} requests per "
        f"{user['rate_window_seconds'] or settings.rate_window_seconds} s, "
        f"{user['max_concurrent'] or settings.max_concurrent} at once (in flight or queued), "
        f"max_tokens {user['max_tokens'] or settings.max_tokens_hard_cap}, "
        + ("token quota " + " and ".join(quotas) if quotas else "no token quota")
    )
