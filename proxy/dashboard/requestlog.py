"""Requests: the audit log filtered by user, status, path and time, newest first, a page at a
time (keyset pagination: each page is one index range scan, however far back), and the same
rows as CSV.

The CSV is streamed in pages of the same query, so an export of millions of rows holds no long
transaction and little memory. Text a client chose (paths, model names, errors, its request id)
is written so that a spreadsheet shows it as text and never runs it as a formula.
"""

from __future__ import annotations

import csv
import io
import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from proxy.appkeys import DATABASE, SETTINGS
from proxy.dashboard import forms
from proxy.dashboard.keys import PROXY
from proxy.dashboard.render import NO_STORE, error_page, render
from proxy.db import ledger
from proxy.db.connect import Connection, DatabaseUnavailable
from proxy.routes import build_routes

log = logging.getLogger(__name__)

PAGE_ROWS = 50
EXPORT_CHUNK_ROWS = 2000
STATUS_CHOICES = ("", "2xx", "4xx", "5xx", "errors", "401", "429", "499", "502", "503")
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


async def page(request: web.Request) -> web.StreamResponse:
    """One page of the audit log, newest first."""
    try:
        query = forms.log_query(request.query)
    except forms.FormError as exc:
        return error_page(request, 400, str(exc))

    columns = ledger.REQUEST_LOG_COLUMNS

    async def work(con: Connection) -> list[Any]:
        return await ledger.request_log(con, query.where, query.before, PAGE_ROWS + 1, columns)

    try:
        rows = await request.app[PROXY][DATABASE].run(work)
    except DatabaseUnavailable as exc:
        return error_page(request, 503, f"{exc}. Try again in a moment.")
    older = None
    if len(rows) > PAGE_ROWS:
        rows = rows[:PAGE_ROWS]
        last = rows[-1]
        older = "?" + urlencode(
            {**query.given, "before": forms.cursor(last["created_at"], last["id"])}
        )
    return render(
        request,
        "requests.html",
        rows=rows,
        cached=True,
        given=query.given,
        paged=query.before is not None,
        older=older,
        first="?" + urlencode(query.given),
        export="/requests.csv?" + urlencode(query.given),
        statuses=STATUS_CHOICES,
        paths=sorted({route.path for route in build_routes(request.app[PROXY][SETTINGS])}),
    )


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value  # shown as text by spreadsheets, not evaluated
    return value


async def export(request: web.Request) -> web.StreamResponse:
    """Every row the filters match, newest first, as CSV."""
    try:
        query = forms.log_query(request.query)
    except forms.FormError as exc:
        return error_page(request, 400, str(exc))
    database = request.app[PROXY][DATABASE]
    try:
        columns = ledger.REQUEST_LOG_COLUMNS
        before = query.before

        async def chunk(con: Connection) -> list[Any]:
            return await ledger.request_log(con, query.where, before, EXPORT_CHUNK_ROWS, columns)

        rows = await database.run(chunk)
    except DatabaseUnavailable as exc:
        return error_page(request, 503, f"{exc}. Try again in a moment.")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="llama-requests-{stamp}.csv"',
            **NO_STORE,
        }
    )
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    while True:
        writer.writerows([_cell(row[c]) for c in columns] for row in rows)
        await response.write(buffer.getvalue().encode())
        buffer.seek(0)
        buffer.truncate()
        if len(rows) < EXPORT_CHUNK_ROWS:
            break
        before = (rows[-1]["created_at"], rows[-1]["id"])
        try:
            rows = await database.run(chunk)
        except DatabaseUnavailable as exc:
            # The headers are out: break the connection, so the client sees a failed download
            # rather than a file that looks complete.
            log.warning("dashboard: CSV export cut short: %s", exc)
            if request.transport is not None:
                request.transport.abort()
            return response
    await response.write_eof()
    return response
