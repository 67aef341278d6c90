"""Admin commands over the audit log: the daily usage view and retention."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import asyncpg
import click

from proxy import store
from proxy.cli_support import Duration, SinceDate, print_json, print_table, run_db, username_arg

PRUNE_BATCH_SIZE = 5000


@click.command("usage")
@click.option("--user", "username", callback=username_arg, help="Only this user.")
@click.option(
    "--since",
    type=SinceDate(),
    default="30d",
    show_default=True,
    help="First day (UTC) to show: a date like 2026-11-01 or a duration back like 7d.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def usage(username: str | None, since: date, as_json: bool) -> None:
    """Requests, errors, tokens, bytes and latency per user per day (the llama_usage_daily view).

    Rows with no username are requests that failed authentication.

    Example:

        llama-gate usage --user alice --since 7d
    """
    rows = run_db(lambda con: store.usage_daily(con, since, username))
    if as_json:
        print_json(rows)
        return
    columns = ["day", "username", "requests", "errors", "prompt_tokens", "completion_tokens"]
    print_table(rows, [*columns, "bytes_in", "bytes_out", "p50_ms", "p95_ms"])


@click.command("prune-logs")
@click.option(
    "--older-than",
    type=Duration(),
    required=True,
    help="Delete llama_requests rows older than this, e.g. 90d.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=PRUNE_BATCH_SIZE,
    show_default=True,
    help="Rows deleted per statement; small batches never lock the table for long.",
)
def prune_logs(older_than: timedelta, batch_size: int) -> None:
    """Delete old audit rows in small batches (retention).

    Example:

        llama-gate prune-logs --older-than 90d
    """
    cutoff = datetime.now(UTC) - older_than

    async def work(con: asyncpg.Connection) -> int:
        total = 0
        while deleted := await store.prune_requests_batch(con, cutoff, batch_size):
            total += deleted
        return total

    total = run_db(work)
    click.echo(f"Deleted {total} llama_requests rows from before {cutoff:%Y-%m-%d %H:%M} UTC.")
