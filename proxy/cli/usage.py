"""Admin commands over the audit log: the daily usage view and retention."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import click

from proxy.cli.groups import group_arg, group_usage
from proxy.cli.support import Duration, SinceDate, print_json, print_table, run_db, username_arg
from proxy.db import ledger, stored_responses
from proxy.db.usage import quota_usage, usage_daily, usage_daily_totals

PRUNE_BATCH_SIZE = 5000
PRUNE_BATCH_MAX = 1_000_000
# A retention job keeps days; a cutoff closer than this is more likely a slip than a policy.
ASK_BELOW = timedelta(days=1)


@click.command("usage")
@click.option("--user", "username", callback=username_arg, help="Only this user.")
@click.option(
    "--group",
    callback=group_arg,
    help="A group's members per day, then its budgets' use in their current periods.",
)
@click.option(
    "--since",
    type=SinceDate(),
    default="30d",
    show_default=True,
    help="First day (UTC) to show: a date like 2026-11-01 or a duration back like 7d.",
)
@click.option(
    "--quotas",
    "only_quotas",
    is_flag=True,
    help="Show only token use against quotas: today (UTC) and the last minute.",
)
@click.option(
    "--totals",
    is_flag=True,
    help="One row per day for all users together (what the dashboard charts): requests, "
    "errors, tokens, p50/p95 latency and time to first token, cached prompt tokens.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def usage(
    username: str | None,
    group: str | None,
    since: date,
    only_quotas: bool,
    totals: bool,
    as_json: bool,
) -> None:
    """Requests, errors, tokens, bytes and latency per user per day (the llama_usage_daily view),
    then each user's tokens today and in the last minute against their token quotas.

    Rows with no username are requests that failed authentication. Quota rows list users with
    a quota (or the --user given); tokens reach the log about a second after a request ends.

    Example:

        llama-gate usage --user alice --since 7d
        llama-gate usage --group research
    """
    if group is not None:
        if username or totals or only_quotas:
            raise click.UsageError("--group shows the group's members; leave out --user, "
                                   "--totals and --quotas")  # fmt: skip
        group_usage(group, since, as_json)
        return
    if totals and username:
        raise click.UsageError("--totals sums every user; leave out --user")
    now = datetime.now(UTC)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    minute_start = now - timedelta(minutes=1)

    async def work(con: asyncpg.Connection) -> tuple[Sequence[Any], list[asyncpg.Record]]:
        daily: Sequence[Any]
        if only_quotas:
            daily = []
        elif totals:
            daily = await usage_daily_totals(con, since)
        else:
            daily = await usage_daily(con, since, username)
        quotas = await quota_usage(con, day_start, minute_start, username)
        return daily, quotas

    daily, quotas = run_db(work)
    if as_json:
        print_json(quotas if only_quotas else daily)
        return
    if totals and not only_quotas:
        columns = ["day", "requests", "errors", "prompt_tokens", "completion_tokens", "p50_ms"]
        latency = ["p95_ms", "ttfb_p50_ms", "ttfb_p95_ms"]
        print_table(daily, [*columns, *latency, "cached_tokens"])
    elif not only_quotas:
        columns = ["day", "username", "requests", "errors", "prompt_tokens", "completion_tokens"]
        print_table(daily, [*columns, "bytes_in", "bytes_out", "p50_ms", "p95_ms"])
        if not quotas:
            return
        click.echo(f"\nToken quotas, today ({day_start:%Y-%m-%d} UTC) and the last minute:")
    print_table(
        quotas,
        ["username", "tokens_today", "tokens_per_day", "tokens_last_minute", "tokens_per_minute"],
    )


@click.command("prune-logs")
@click.option(
    "--older-than",
    type=Duration(),
    required=True,
    help="Delete llama_requests rows older than this, e.g. 90d.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, PRUNE_BATCH_MAX),
    default=PRUNE_BATCH_SIZE,
    show_default=True,
    help="Rows deleted per statement; small batches never lock the table for long.",
)
@click.option("--yes", is_flag=True, help="Do not ask before deleting rows from today.")
def prune_logs(older_than: timedelta, batch_size: int, yes: bool) -> None:
    """Delete old audit rows in small batches (retention), the batch ids that guarded them, the
    per-minute counts of requests that had no valid key, and the stored Responses API answers
    whose retention (LLAMA_PROXY_RESPONSES_RETENTION days) is over.

    A cutoff less than a day back (e.g. --older-than 0d, which empties the audit log) is
    asked about first; --yes skips the question.

    Example:

        llama-gate prune-logs --older-than 90d
    """
    cutoff = datetime.now(UTC) - older_than
    if older_than < ASK_BELOW and not yes:
        _confirm_recent_cutoff(cutoff, older_than)

    async def work(con: asyncpg.Connection) -> tuple[int, int, int, int]:
        total = 0
        while deleted := await ledger.prune_requests_batch(con, cutoff, batch_size):
            total += deleted
        # A batch id only guards replays of its rows: it goes with them.
        batches = await ledger.prune_audit_batches(con, cutoff)
        minutes = await ledger.prune_unauthenticated(con, cutoff)
        # Stored responses go when their own retention is over, whatever --older-than says.
        return (
            total,
            batches,
            minutes,
            await stored_responses.prune_responses(con, datetime.now(UTC)),
        )

    total, batches, minutes, responses = run_db(work)
    click.echo(
        f"Deleted {total} llama_requests rows, {batches} audit batch ids and {minutes} "
        f"llama_unauthenticated rows from before {cutoff:%Y-%m-%d %H:%M} UTC, and {responses} "
        "stored responses past LLAMA_PROXY_RESPONSES_RETENTION."
    )


def _confirm_recent_cutoff(cutoff: datetime, older_than: timedelta) -> None:
    """Ask before deleting today's rows; with no one to ask (cron, a pipe), refuse."""
    what = "every audit row" if not older_than else "every audit row, today's included"
    deletes = (
        f"--older-than {_shown(older_than)} deletes {what} (from before {cutoff:%H:%M:%S} UTC)"
    )
    if not sys.stdin.isatty():
        raise click.ClickException(f"{deletes}; add --yes to delete them without a question")
    if not click.confirm(f"{deletes}. Delete them?", err=True):
        raise click.ClickException("nothing deleted")


def _shown(duration: timedelta) -> str:
    seconds = int(duration.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
