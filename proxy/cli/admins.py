"""Admin commands for the dashboard's sign-in: admin tokens, made, listed and revoked."""

from __future__ import annotations

import asyncpg
import click

from proxy.auth.admintokens import TOKEN_ID_RE, TOKEN_PREFIX, generate_admin_token
from proxy.auth.apikeys import KeyHasher, NewKey
from proxy.cli.support import print_json, print_table, run_db, state
from proxy.db import admin_tokens


def token_id_arg(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """Accept the bare token id or the `lga_<id>` form."""
    token_id = value.strip().removeprefix(TOKEN_PREFIX)
    if not TOKEN_ID_RE.match(token_id):
        raise click.BadParameter(
            f"{value!r} is not a token id: it is 16 hex digits (see list-admin-tokens)"
        )
    return token_id


@click.command("create-admin-token")
@click.option("--label", help="Whose token this is, e.g. a name: list-admin-tokens shows it.")
def create_admin_token(label: str | None) -> None:
    """Make a token that signs an admin in to the web dashboard; it is printed once.

    Only its hash is stored. Anyone holding it can manage users and keys, so give each admin
    their own and revoke it when they leave.

    Example:

        llama-gate create-admin-token --label alice
    """
    token = generate_admin_token()

    async def work(con: asyncpg.Connection) -> NewKey:
        await admin_tokens.insert_admin_token(
            con, token.key_id, KeyHasher().hash(token.secret), label
        )
        return token

    run_db(work)
    settings = state().settings()
    click.echo(f"Admin token (token id {token.key_id}); it is shown only this once:")
    click.echo(f"  {token.full.reveal()}")
    host, port = settings.dashboard_host, settings.dashboard_port
    if port == 0:
        click.echo("The dashboard is off: set LLAMA_PROXY_DASHBOARD_PORT (e.g. 9102) to serve it.")
        return
    click.echo(f"Sign in at http://{host}:{port}/ on the proxy's machine. From another machine:")
    click.echo(
        f"  ssh -N -L {port}:{host}:{port} you@proxy-host    then open http://localhost:{port}/"
    )


@click.command("list-admin-tokens")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_admin_tokens(as_json: bool) -> None:
    """List admin tokens by token id (never the secret), with state and last sign-in.

    Example:

        llama-gate list-admin-tokens
    """
    rows = run_db(admin_tokens.list_admin_tokens)
    if as_json:
        print_json(rows)
    else:
        columns = ["token_id", "label", "state", "created_at", "last_used_at", "revoked_at"]
        print_table(rows, columns)


@click.command("revoke-admin-token")
@click.argument("token_id", callback=token_id_arg)
def revoke_admin_token(token_id: str) -> None:
    """Revoke the admin token TOKEN_ID: its dashboard sessions end at their next request.

    Example:

        llama-gate revoke-admin-token 3f9a0c1d2e4b5a69
    """
    revoked = run_db(lambda con: admin_tokens.revoke_admin_token(con, token_id))
    if revoked is None:
        raise click.ClickException(f"no admin token with id {token_id!r} (see list-admin-tokens)")
    if revoked:
        click.echo(f"Revoked admin token {token_id}.")
    else:
        click.echo(f"Admin token {token_id} was already revoked.")
