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
from proxy.cli.keys import announce_key
from proxy.cli.support import (
    USERNAME_RULE,
    Duration,
    print_json,
    print_table,
    run_db,
    state,
    username_arg,
)
from proxy.db import queries
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
                user = await queries.create_user(con, username, rate_limit, window)
            except queries.DuplicateUser:
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
    rows = run_db(queries.list_users)
    if as_json:
        print_json(rows)
    else:
        columns = ["username", "enabled", "rate_limit", "rate_window_seconds", "max_concurrent"]
        quotas = ["max_tokens", "tokens_per_day", "tokens_per_minute", "active_keys"]
        print_table(rows, [*columns, *quotas, "last_used_at", "created_at"])


def _set_enabled(username: str, enabled: bool) -> None:
    if not run_db(lambda con: queries.set_user_enabled(con, username, enabled)):
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
    if not run_db(lambda con: queries.delete_user(con, username)):
        raise click.ClickException(f"no user named {username!r} (see list-users)")
    click.echo(f"Deleted {username}; their llama_requests rows are kept.")


class _Override(click.ParamType[int]):
    """A whole number from 1 to `most`, or `default` (also `none`) to drop the override: 0 then.

    `most` is what the column and the proxy's arithmetic can hold, so no value set here can
    fail later as a 500.
    """

    name = "N|default"

    def __init__(self, most: int) -> None:
        self._most = most

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text in {"default", "none"}:
            return 0
        if not text.isdigit() or int(text) == 0:
            self.fail(f"{value!r} is neither a whole number above 0 nor 'default'", param, ctx)
        if int(text) > self._most:
            self.fail(f"{value} is more than this limit can be: at most {self._most}", param, ctx)
        return int(text)


@click.command("set-limit")
@click.option("--username", callback=username_arg, help="The user whose limits to set.")
@click.option(
    "--group",
    callback=group_arg,
    help="Set a group's budgets instead (--tokens-per-minute/day/week/month, --time-zone).",
)
@click.option("--rate-limit", type=_Override(RATE_LIMIT_MAX), help="Requests admitted per window.")
@click.option(
    "--window", type=_Override(RATE_WINDOW_MAX_SECONDS), help="Rate window length in seconds."
)
@click.option(
    "--max-concurrent",
    type=_Override(MAX_CONCURRENT_MAX),
    help="Requests the user may have in flight or queued at once (more get 429).",
)
@click.option(
    "--max-tokens",
    type=_Override(MAX_TOKENS_MAX),
    help="Cap on one request's max_tokens; a request asking for more, or none, gets this.",
)
@click.option(
    "--tokens-per-day",
    type=_Override(TOKEN_QUOTA_MAX),
    help="Token quota (prompt + completion) per UTC day (a group's: per day in its time "
    "zone); 'none' removes it.",
)
@click.option(
    "--tokens-per-minute",
    type=_Override(TOKEN_QUOTA_MAX),
    help="Token quota (prompt + completion) per rolling minute (a group's: per calendar "
    "minute); 'none' removes it.",
)
@click.option(
    "--tokens-per-week",
    type=_Override(TOKEN_QUOTA_MAX),
    help="With --group: tokens per ISO week (from Monday 00:00 in its time zone); 'none' "
    "removes it.",
)
@click.option(
    "--tokens-per-month",
    type=_Override(TOKEN_QUOTA_MAX),
    help="With --group: tokens per calendar month in its time zone; 'none' removes it.",
)
@click.option("--time-zone", help="With --group: the IANA time zone its periods are counted in.")
@click.option("--default", "use_default", is_flag=True, help="Drop every override: use the global.")
def set_limit(
    username: str | None,
    group: str | None,
    time_zone: str | None,
    use_default: bool,
    **given: int | None,
) -> None:
    """Set a user's own limits (rate limit, concurrency, max_tokens cap, token quotas), or a
    group's token budgets.

    Options left out keep their current value; an option given as `default` (or `none`) drops
    that override, and --default drops them all. Without an override a user gets the proxy's
    settings (LLAMA_PROXY_RATE_LIMIT, LLAMA_PROXY_RATE_WINDOW_SECONDS,
    LLAMA_PROXY_MAX_CONCURRENT, MAX_TOKENS_HARD_CAP) and no token quota. Quotas count the
    tokens in llama_requests; proxies apply a change within a second. A group's budgets
    (see create-group) apply at once, on every proxy.

    Example:

    \b
        llama-gate set-limit --username alice --rate-limit 10 --window 60
        llama-gate set-limit --username alice --tokens-per-day 200000 --max-tokens none
        llama-gate set-limit --group research --tokens-per-week 1000000 --time-zone Europe/Berlin
    """
    chosen = {name: value for name, value in given.items() if value is not None}
    if (username is None) == (group is None):
        raise click.UsageError("give either --username or --group")
    if group is not None:
        budgets = {f"tokens_per_{per}" for per in ("minute", "day", "week", "month")}
        others = sorted(set(chosen) - budgets)
        if others or use_default:
            wrong = ", ".join("--" + name.replace("_", "-") for name in others) or "--default"
            raise click.UsageError(
                f"{wrong}: a group has token budgets and a time zone only "
                "(--tokens-per-minute/day/week/month, --time-zone)"
            )
        set_group_limits(group, time_zone, chosen)
        return
    assert username is not None
    for name in ("tokens_per_week", "tokens_per_month"):
        if name in chosen:
            raise click.UsageError(
                f"--{name.replace('_', '-')} is a group budget (use --group); a user's token "
                "quotas are per day and per minute"
            )
    if time_zone is not None:
        raise click.UsageError("--time-zone is a group's (use --group); users' days are UTC days")
    if use_default and chosen:
        raise click.UsageError("--default cannot be combined with other limits")
    if not use_default and not chosen:
        raise click.UsageError("give at least one limit to set, or --default")
    columns = {"window": "rate_window_seconds"}
    if use_default:
        limits: dict[str, int | None] = dict.fromkeys(queries.LIMIT_COLUMNS)
    else:
        limits = {columns.get(name, name): value or None for name, value in chosen.items()}
    row = run_db(lambda con: queries.set_user_limits(con, username, limits))
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
