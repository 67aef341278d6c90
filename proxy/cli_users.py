"""Admin commands for users: create, list, enable/disable, delete, and per-user rate limits."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import click

from proxy import store
from proxy.cli_keys import announce_key, issue_key
from proxy.cli_support import Duration, print_json, print_table, run_db, state, username_arg
from proxy.keys import NewKey

_POSITIVE = click.IntRange(min=1)


@click.command("create-user")
@click.option("--username", required=True, callback=username_arg, help="1-64 of a-z 0-9 . _ -")
@click.option("--rate-limit", type=_POSITIVE, help="Requests per window (default: global).")
@click.option("--window", type=_POSITIVE, help="Window length in seconds (default: global).")
@click.option("--label", help="A note for the first key.")
@click.option("--expires-in", type=Duration(), help="Expire the first key after this long.")
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
                user = await store.create_user(con, username, rate_limit, window)
            except store.DuplicateUser:
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

    Example:

        llama-gate list-users --json
    """
    rows = run_db(store.list_users)
    if as_json:
        print_json(rows)
    else:
        columns = ["username", "enabled", "rate_limit", "rate_window_seconds", "active_keys"]
        print_table(rows, [*columns, "last_used_at", "created_at"])


def _set_enabled(username: str, enabled: bool) -> None:
    if not run_db(lambda con: store.set_user_enabled(con, username, enabled)):
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
    if not run_db(lambda con: store.delete_user(con, username)):
        raise click.ClickException(f"no user named {username!r} (see list-users)")
    click.echo(f"Deleted {username}; their llama_requests rows are kept.")


@click.command("set-limit")
@click.option("--username", required=True, callback=username_arg)
@click.option("--rate-limit", type=_POSITIVE, help="Requests per window.")
@click.option("--window", type=_POSITIVE, help="Window length in seconds.")
@click.option("--default", "use_default", is_flag=True, help="Drop the overrides: use the global.")
def set_limit(
    username: str, rate_limit: int | None, window: int | None, use_default: bool
) -> None:
    """Set a user's own rate limit (admitted requests in any WINDOW-second span).

    An option left out keeps the global default (LLAMA_PROXY_RATE_LIMIT,
    LLAMA_PROXY_RATE_WINDOW_SECONDS).

    Example:

        llama-gate set-limit --username alice --rate-limit 10 --window 60
    """
    if use_default and (rate_limit or window):
        raise click.UsageError("--default cannot be combined with --rate-limit or --window")
    if not use_default and rate_limit is None and window is None:
        raise click.UsageError("give --rate-limit and/or --window, or --default")
    if not run_db(lambda con: store.set_user_limit(con, username, rate_limit, window)):
        raise click.ClickException(f"no user named {username!r} (see list-users)")
    settings = state().settings()
    limit = rate_limit or settings.rate_limit
    seconds = window or settings.rate_window_seconds
    click.echo(f"{username}: at most {limit} requests per {seconds} s.")
