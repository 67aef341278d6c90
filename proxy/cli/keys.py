"""Admin commands for API keys: create, list, revoke and rotate."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import asyncpg
import click

from proxy.auth import issuing
from proxy.auth.apikeys import KEY_ID_RE, KEY_PREFIX, NewKey
from proxy.auth.issuing import KeyAlreadyRevoked, KeyNotFound, issue_key
from proxy.cli.limitopts import describe_key_limits, key_limit_options, limit_columns
from proxy.cli.support import Duration, print_json, print_table, run_db, state, username_arg
from proxy.db import accounts, limits
from proxy.routes import APIS
from proxy.settings import Settings


def announce_key(settings: Settings, username: str, key: NewKey) -> None:
    """Print the full key: the only time it is ever shown."""
    host = "localhost" if settings.proxy_host in {"0.0.0.0", "::"} else settings.proxy_host  # noqa: S104
    full = key.full.reveal()
    click.echo(f"API key for {username} (key id {key.key_id}); it is shown only this once:")
    click.echo(f"  {full}")
    click.echo("Try it:")
    click.echo(
        f"  curl http://{host}:{settings.proxy_port}/v1/chat/completions "
        f'-H "Authorization: Bearer {full}" -H "Content-Type: application/json" '
        """-d '{"messages": [{"role": "user", "content": "Hello!"}]}'"""
    )


def optional_key_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return None if value is None else key_id_arg(ctx, param, value)


def set_key_limits(key_id: str, given: Mapping[str, int | None]) -> None:
    """`set-limit --key`: its request limit and budgets (0: removed)."""
    if not given:
        raise click.UsageError("give at least one limit to set for the key")
    row = run_db(lambda con: limits.set_key_limits(con, key_id, limit_columns(given)))
    if row is None:
        raise click.ClickException(f"no key with id {key_id} (see list-keys)")
    click.echo(f"key {key_id}: {describe_key_limits(dict(row))}.")


def key_id_arg(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """Accept the bare key id or the `lgk_<id>` form that list-keys users copy."""
    key_id = value.strip().removeprefix(KEY_PREFIX)
    if not KEY_ID_RE.match(key_id):
        raise click.BadParameter(f"{value!r} is not a key id: it is 16 hex digits (see list-keys)")
    return key_id


def _listed(values: tuple[str, ...], option: str) -> list[str] | None:
    """Repeated and comma-separated option values as one list (None when the option was not
    given); given but empty is an error, not "everything" (a script's empty variable)."""
    if not values:
        return None
    items = [item.strip() for value in values for item in value.split(",") if item.strip()]
    if not items:
        raise click.BadParameter(f"{option} was given no names; leave it out for no limit")
    return items


def models_arg(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> list[str] | None:
    models = _listed(value, "--models")
    for model in models or ():
        if len(model) > 200 or any(ch.isspace() or not ch.isprintable() for ch in model):
            raise click.BadParameter(f"{model[:40]!r} is not a model name or glob")
    return models


def apis_arg(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> list[str] | None:
    apis = _listed(value, "--apis")
    unknown = sorted(set(apis or ()) - set(APIS))
    if unknown:
        raise click.BadParameter(
            f"{', '.join(unknown)}: not an API here; choose from {', '.join(APIS)}"
        )
    return sorted(set(apis)) if apis else None


SCOPE_HELP = "APIs: " + "; ".join(f"{name}: {what}" for name, what in APIS.items()) + "."


@click.command("create-key", epilog=SCOPE_HELP)
@click.option("--username", required=True, callback=username_arg, help="Owner of the new key.")
@click.option("--label", help="A note to tell keys apart, e.g. the laptop it lives on.")
@click.option(
    "--expires-in", type=Duration(positive=True), help="Expire the key after this long (e.g. 90d)."
)
@click.option(
    "--models",
    multiple=True,
    callback=models_arg,
    help="Only these models: names or globs, comma-separated or repeated (e.g. 'qwen*,smollm2'). "
    "Default: every model.",
)
@click.option(
    "--apis",
    multiple=True,
    callback=apis_arg,
    help="Only these APIs, comma-separated or repeated (listed below). Default: every API.",
)
@key_limit_options
def create_key(
    username: str,
    label: str | None,
    expires_in: timedelta | None,
    models: list[str] | None,
    apis: list[str] | None,
    **key_limits: int | None,
) -> None:
    """Give a user another API key (users may hold several), optionally scoped.

    The full key is printed once; only its hash is stored. A key used outside its scope
    (another model, another API) is refused with 403 and spends nothing of the user's limits.
    A key may also have its own request limit and token budgets (beside its user's; change
    them with `set-limit --key`). Rotating a key keeps its scope, limits and budgets' use.

    Example:

        llama-gate create-key --username alice --label laptop --expires-in 90d

        llama-gate create-key --username ci --apis embeddings --models 'nomic*'

        llama-gate create-key --username dash --apis models   # read-only: GET /v1/models

        llama-gate create-key --username ci --rate-limit 10 --window 60 --tokens-per-day 50000
    """
    chosen = limit_columns(key_limits)

    async def work(con: asyncpg.Connection) -> NewKey:
        user = await accounts.get_user(con, username)
        if user is None:
            raise click.ClickException(f"no user named {username!r} (see list-users)")
        async with con.transaction():
            key = await issue_key(con, user["id"], label, expires_in, models, apis)
            if chosen:
                await limits.set_key_limits(con, key.key_id, chosen)
            return key

    announce_key(state().settings(), username, run_db(work))
    if models is not None or apis is not None:
        click.echo(
            f"Scope: models {', '.join(models) if models else 'all'}; "
            f"APIs {', '.join(apis) if apis else 'all'}."
        )
    if chosen:
        click.echo(f"Limits of this key: {describe_key_limits(chosen)}.")


@click.command("list-keys")
@click.option("--username", callback=username_arg, help="Only this user's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_keys(username: str | None, as_json: bool) -> None:
    """List API keys by key id (never the secret), with state and last use.

    Example:

        llama-gate list-keys --username alice
    """
    rows = run_db(lambda con: accounts.list_keys(con, username))
    if as_json:
        print_json(rows)
    else:
        columns = ["key_id", "username", "label", "state", "created_at", "last_used_at"]
        print_table(
            [_with_scope(row) for row in rows],
            [*columns, "expires_at", "revoked_at", "scope", "limits"],
        )


def _with_scope(row: asyncpg.Record) -> dict[str, object]:
    """A key's row with its scope in one column: `all`, or what it is limited to."""
    parts = [
        f"{name}={','.join(row[name])}" for name in ("models", "apis") if row[name] is not None
    ]
    own = row["rate_limit"] is not None or any(
        row[f"tokens_per_{per}"] is not None for per in limits.PERIODS
    )
    return {
        **dict(row),
        "scope": " ".join(parts) or "all",
        "limits": describe_key_limits(dict(row)) if own else "-",
    }


@click.command("revoke-key")
@click.argument("key_id", callback=key_id_arg)
def revoke_key(key_id: str) -> None:
    """Revoke the key KEY_ID at once (as shown by list-keys).

    Running proxies stop accepting it within a second.

    Example:

        llama-gate revoke-key 3f9a0c1d2e4b5a69
    """

    async def work(con: asyncpg.Connection) -> bool:
        if await accounts.get_key_owner(con, key_id) is None:
            raise click.ClickException(f"no key with id {key_id!r} (see list-keys)")
        return await accounts.revoke_key(con, key_id)

    if run_db(work):
        click.echo(f"Revoked key {key_id}.")
    else:
        click.echo(f"Key {key_id} was already revoked.")


@click.command("rotate-key")
@click.argument("key_id", callback=key_id_arg)
@click.option(
    "--grace",
    type=Duration(),
    default="0s",
    show_default=True,
    help="Keep the old key working this long (e.g. 1h) so clients can switch without downtime.",
)
@click.option(
    "--expires-in", type=Duration(positive=True), help="Expire the new key after this long."
)
def rotate_key(key_id: str, grace: timedelta, expires_in: timedelta | None) -> None:
    """Replace the key KEY_ID with a new key for the same user.

    The old key is revoked at once, or after --grace.

    Example:

        llama-gate rotate-key 3f9a0c1d2e4b5a69 --grace 24h
    """

    try:
        username, new = run_db(lambda con: issuing.rotate_key(con, key_id, grace, expires_in))
    except KeyNotFound:
        raise click.ClickException(f"no key with id {key_id!r} (see list-keys)") from None
    except KeyAlreadyRevoked:
        raise click.ClickException(
            f"key {key_id} is already revoked; make a fresh one with create-key"
        ) from None
    when = "now" if not grace else f"in {grace}"
    click.echo(f"Old key {key_id} stops working {when}.")
    announce_key(state().settings(), username, new)
