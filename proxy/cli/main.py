"""The `llama-gate` admin command: one click group; each command's docstring is its --help."""

from __future__ import annotations

import asyncio

import click

from proxy.cli import admins as cli_admins
from proxy.cli import groups as cli_groups
from proxy.cli import keys as cli_keys
from proxy.cli import serve as cli_serve
from proxy.cli import usage as cli_usage
from proxy.cli import users as cli_users
from proxy.cli import weights as cli_weights
from proxy.cli.support import OneLineGroup, configure_logging, state
from proxy.db import migrate
from proxy.db.connect import DatabaseUnavailable, ensure_database


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--dsn",
    metavar="URL",
    help="Postgres DSN (overrides POSTGRES_AUTH_*). Prefer the POSTGRES_AUTH_DSN variable: "
    "a flag is visible to other users in `ps`.",
)
@click.version_option(package_name="llama-gate")
def cli(dsn: str | None) -> None:
    """Share one local LLM with many people: users, API keys, limits and usage.

    Settings come from command-line options, then the environment, then
    runtime/config.env, then .env (see README.md for every variable).

    Example:

        llama-gate init-db && llama-gate create-user --username alice
    """
    state().overrides["POSTGRES_AUTH_DSN"] = dsn


@cli.command("init-db")
def init_db() -> None:
    """Create the database if needed and migrate it to the newest schema (safe to re-run).

    Example:

        llama-gate init-db
    """
    settings = state().settings()
    try:
        created = asyncio.run(ensure_database(settings))
    except DatabaseUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    if created:
        click.echo(f"Created database {settings.database_label}.")
    try:
        applied = migrate.upgrade(settings.database_dsn.reveal())
    except Exception as exc:  # alembic surfaces driver errors as many types; none may leak a DSN
        raise click.ClickException(
            f"migrating {settings.database_label} failed: {type(exc).__name__}: {exc}"
        ) from None
    if applied:
        click.echo(f"Applied {len(applied)} migration(s): {', '.join(applied)}.")
    click.echo(f"Database {settings.database_label} is at the newest schema.")


for command in (
    cli_users.create_user,
    cli_users.list_users,
    cli_users.disable_user,
    cli_users.enable_user,
    cli_users.delete_user,
    cli_users.set_limit,
    cli_groups.create_group,
    cli_groups.list_groups,
    cli_groups.add_to_group,
    cli_groups.remove_from_group,
    cli_groups.delete_group,
    cli_weights.set_model_weight,
    cli_weights.list_model_weights,
    cli_keys.create_key,
    cli_keys.list_keys,
    cli_keys.revoke_key,
    cli_keys.rotate_key,
    cli_usage.usage,
    cli_usage.prune_logs,
    cli_serve.serve,
    cli_admins.create_admin_token,
    cli_admins.list_admin_tokens,
    cli_admins.revoke_admin_token,
):
    cli.add_command(command)


def main() -> None:
    configure_logging()
    cli(prog_name="llama-gate")
