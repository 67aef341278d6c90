"""The audit journal: a proxy killed with SIGKILL, under load or while Postgres is away, loses no
answered request's row, and the next start writes each row exactly once."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.audit.journal import Journal
from proxy.audit.row import COLUMNS, AuditRow
from proxy.audit.writer import AuditWriter
from proxy.db import ledger
from proxy.db.localpg import LocalPostgres, free_port
from tests.fake_upstream import FakeUpstream
from tests.proxy_harness import (
    BACKEND_KEY,
    ROOT,
    bearer,
    eventually,
    make_user,
    proxy_environ,
    wait_for_health,
)

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


@contextmanager
def _proxy(environ: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m proxy` as a real process, for a test to kill; ended if the test does not."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env={**os.environ, **environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


async def _ask(
    client: aiohttp.ClientSession, url: str, key: str, request_id: str, stream: bool
) -> bool:
    """Whether the request was answered: a 200 whose whole body arrived (a stream to its end)."""
    headers = {**bearer(key), "X-Request-Id": request_id}
    try:
        async with client.post(
            f"{url}/v1/chat/completions", json={**CHAT, "stream": stream}, headers=headers
        ) as response:
            body = await response.read()
    except aiohttp.ClientError:
        return False  # cut off by the kill, or refused after it
    return response.status == 200 and (not stream or body.endswith(b"data: [DONE]\r\n\r\n"))


async def _client_ids(dsn: str, expected: set[str], within: float = 20.0) -> list[str]:
    """Every row's client_request_id, once all of `expected` are there (or `within` is over)."""
    deadline = time.monotonic() + within
    while True:
        con = await asyncpg.connect(dsn)
        try:
            found = [
                r["client_request_id"] for r in await con.fetch("SELECT * FROM llama_requests")
            ]
        finally:
            await con.close()
        if expected <= set(found) or time.monotonic() > deadline:
            await asyncio.sleep(0.5)  # a straggler written twice would show up now
            con = await asyncpg.connect(dsn)
            try:
                rows = await con.fetch("SELECT client_request_id FROM llama_requests")
            finally:
                await con.close()
            return [r["client_request_id"] for r in rows]
        await asyncio.sleep(0.1)


async def test_sigkill_under_load_loses_no_answered_row(db_dsn: str, tmp_path: Path) -> None:
    _, alice = await make_user(db_dsn, "alice", rate_limit=100_000)
    # A stream's backend lingers after [DONE] (as sse-starlette does): answers end all the time.
    upstream = FakeUpstream(expected_key=BACKEND_KEY, event_delay=0.01)
    await upstream.start()
    wide = {"LLAMA_BACKEND_SLOTS": "500", "LLAMA_PROXY_MAX_CONCURRENT": "500"}
    environ = proxy_environ(db_dsn, upstream.port, tmp_path, **wide)
    answered: set[str] = set()
    sent: list[str] = []
    try:
        with _proxy(environ) as (process, url):
            await asyncio.to_thread(wait_for_health, url, process)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

                async def one(number: int) -> None:
                    request_id = f"load-{number}"
                    sent.append(request_id)
                    if await _ask(client, url, alice, request_id, stream=number % 2 == 0):
                        answered.add(request_id)

                async def load() -> None:
                    tasks, started = [], time.monotonic()
                    for number in range(600):  # 150 requests a second, until the kill and after
                        tasks.append(asyncio.create_task(one(number)))
                        await asyncio.sleep(max(0.0, started + number / 150 - time.monotonic()))
                    await asyncio.gather(*tasks)

                assert await _ask(client, url, alice, "warm-up", stream=False)
                sent.append("warm-up")
                answered.add("warm-up")
                loader = asyncio.create_task(load())
                async with asyncio.timeout(20):  # however busy the machine: mid-load
                    while len(answered) < 80:  # noqa: ASYNC110 - the answers are counted
                        await asyncio.sleep(0.01)
                process.send_signal(signal.SIGKILL)
                await loader
            await asyncio.to_thread(process.wait, 10)

        assert len(answered) < len(sent), "the kill did not come in the middle of the load"
        with _proxy(environ) as (process, url):  # the next start replays the journal
            await asyncio.to_thread(wait_for_health, url, process)
            recorded = await _client_ids(db_dsn, answered)
    finally:
        await upstream.stop()
    assert answered <= set(recorded), f"{len(answered - set(recorded))} answered rows lost"
    assert len(recorded) == len(set(recorded)), "a row was written twice"
    assert set(recorded) <= set(sent)
    assert not list((tmp_path / "runtime" / "audit-spill").glob("journal-*.jsonl"))


async def test_sigkill_during_a_postgres_outage_loses_no_answered_row(
    own_postgres: LocalPostgres, tmp_path: Path
) -> None:
    dsn = own_postgres.dsn
    _, alice = await make_user(dsn, "alice", rate_limit=100_000)
    upstream = FakeUpstream(expected_key=BACKEND_KEY, event_delay=0.01)
    await upstream.start()
    # A small memory bound: some rows go on to a spill file, and both kinds of file replay.
    environ = proxy_environ(dsn, upstream.port, tmp_path, LLAMA_PROXY_AUDIT_MEMORY_ROWS="20")
    folder = tmp_path / "runtime" / "audit-spill"
    answered: list[str] = []
    try:
        with _proxy(environ) as (process, url):
            await asyncio.to_thread(wait_for_health, url, process)
            async with aiohttp.ClientSession() as client:
                for number in range(5):  # verifies alice's key while Postgres is there
                    assert await _ask(client, url, alice, f"before-{number}", stream=False)
                    answered.append(f"before-{number}")
                await asyncio.to_thread(own_postgres.stop)
                for number in range(60):
                    request_id = f"outage-{number}"
                    assert await _ask(client, url, alice, request_id, stream=number % 2 == 0)
                    answered.append(request_id)
                    if number == 30:
                        await asyncio.sleep(2.5)  # the writer gives up waiting and spills
            process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(process.wait, 10)

        assert list(folder.glob("spill-*.jsonl")), "nothing was spilled: the test missed a path"
        files = list(folder.glob("journal-*.jsonl")) + list(folder.glob("spill-*.jsonl"))
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o600}

        await asyncio.to_thread(own_postgres.start, True)
        with _proxy(environ) as (process, url):
            await asyncio.to_thread(wait_for_health, url, process)
            recorded = await _client_ids(dsn, set(answered))
    finally:
        await upstream.stop()
    assert sorted(recorded) == sorted(answered)  # every row, each once
    assert not list(folder.glob("journal-*.jsonl"))
    assert not list(folder.glob("spill-*.jsonl"))


def _row(index: int) -> AuditRow:
    return AuditRow(
        request_id=f"req-{index}", created_at=datetime.now(UTC), user_id=None, username="u",
        key_id=None, method="GET", path="/v1/models", model=None, stream=None, status_code=200,
        duration_ms=1.5, ttfb_ms=1.0, queue_ms=0.0, request_bytes=0, response_bytes=10,
        prompt_tokens=None, completion_tokens=None, client_addr="127.0.0.1", error=None,
    )  # fmt: skip


async def _replay(dsn: str, folder: Path, expected: int) -> tuple[list[str], AuditWriter]:
    """Start a writer on `folder` (which replays what it finds); the request ids in Postgres."""
    pool = await asyncpg.create_pool(dsn)
    try:
        writer = AuditWriter(lambda: pool, folder)
        task = asyncio.create_task(writer.run())
        deadline = time.monotonic() + 10
        while True:
            rows = await pool.fetch("SELECT request_id FROM llama_requests")
            if len(rows) >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # anything written twice would be there now
        rows = await pool.fetch("SELECT request_id FROM llama_requests")
        writer.stop()
        await task
    finally:
        await pool.close()
    return sorted(row["request_id"] for row in rows), writer


async def test_a_batch_committed_just_before_the_kill_is_not_written_again(
    db_dsn: str, tmp_path: Path
) -> None:
    folder = tmp_path / "audit"
    rows = [_row(index) for index in range(5)]
    dead = Journal(folder)
    for row in rows:
        dead.append(row)
    committed = uuid.uuid4()
    dead.mark(committed, 3)  # the batch was formed and sent, and Postgres committed it...
    con = await asyncpg.connect(db_dsn)
    try:
        assert await ledger.write_audit_batch(con, committed, COLUMNS, rows[:3])
    finally:
        await con.close()
    dead.close()  # ... then the process died, its journal still there
    (journal,) = folder.glob("journal-*.jsonl")
    with journal.open("a") as handle:
        handle.write('["req-torn", "2026')  # a line the kill cut short: never an answer
    pid = journal.name.split("-")[1]
    copy = folder / journal.name.replace(f"journal-{pid}-", "journal-1-")
    shutil.copy(journal, copy)  # as if a second process had the same journal: replayed twice

    written, writer = await _replay(db_dsn, folder, 5)
    assert written == [f"req-{index}" for index in range(5)]
    assert writer.rows_written == 2  # the 3 committed rows were not written again
    assert not list(folder.glob("journal-*"))


async def test_a_journal_in_several_parts_replays_as_one(db_dsn: str, tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    rows = [_row(index) for index in range(6)]
    dead = Journal(folder)
    for row in rows[:3]:
        dead.append(row)
    dead.sync_now()  # each fsync ends a part: what follows goes into the next one
    dead.append(rows[3])
    committed = uuid.uuid4()
    dead.mark(committed, 3)  # its rows are in the part before
    await dead.sync()
    dead.append(rows[4])
    dead.append(rows[5])
    con = await asyncpg.connect(db_dsn)
    try:
        assert await ledger.write_audit_batch(con, committed, COLUMNS, rows[:3])
    finally:
        await con.close()
    dead.close()
    assert len(list(folder.glob("journal-*.jsonl"))) == 3

    written, writer = await _replay(db_dsn, folder, 6)
    assert written == [f"req-{index}" for index in range(6)]
    assert writer.rows_written == 3
    assert not list(folder.glob("journal-*"))
    con = await asyncpg.connect(db_dsn)
    try:
        stored = await con.fetchrow("SELECT * FROM llama_requests WHERE request_id = 'req-5'")
    finally:
        await con.close()
    assert stored is not None
    assert tuple(stored[name] for name in COLUMNS) == tuple(rows[5])  # exactly, time and all


async def test_what_is_left_of_a_journal_deleted_once_caught_up_is_not_replayed(
    db_dsn: str, tmp_path: Path
) -> None:
    folder = tmp_path / "audit"
    dead = Journal(folder)
    dead.append(_row(0))
    dead.sync_now()
    dead.append(_row(1))  # both were written; the writer was deleting the journal, part 0 first,
    dead.close()  # when it died
    part_0, part_1 = sorted(folder.glob("journal-*.jsonl"))
    part_0.unlink()

    unnamed = folder / f".{part_0.name}.new"  # a writer died between making and naming one
    unnamed.touch()

    written, _ = await _replay(db_dsn, folder, 0)
    assert written == []
    assert not part_1.exists()
    assert not unnamed.exists()


async def test_a_journal_with_an_unreadable_line_is_kept_and_the_rest_written(
    db_dsn: str, tmp_path: Path
) -> None:
    folder = tmp_path / "audit"
    dead = Journal(folder)
    dead.append(_row(0))
    dead._write(b"[not json\n")  # damage in the middle (a disk error, a hand edit)
    dead.append(_row(1))
    dead.close()

    written, writer = await _replay(db_dsn, folder, 2)
    assert written == ["req-0", "req-1"]
    assert writer.unreadable_files == 1
    (kept,) = folder.glob("journal-*.jsonl.unreadable")
    assert "not json" in kept.read_text()


async def test_the_journal_holds_only_rows_not_yet_written_and_none_after_a_stop(
    db_dsn: str, tmp_path: Path
) -> None:
    folder = tmp_path / "audit"
    pool = await asyncpg.create_pool(db_dsn)
    try:
        writer = AuditWriter(lambda: pool, folder)
        task = asyncio.create_task(writer.run())
        for index in range(10):
            writer.submit(_row(index))
        (journal,) = folder.glob("journal-*.jsonl")
        assert len(journal.read_text().splitlines()) == 11  # a header and the ten rows
        await eventually(lambda: writer.rows_written == 10)
        assert not journal.exists()  # caught up: the rows are in Postgres, the journal went
        writer.submit(_row(10))
        (journal,) = folder.glob("journal-*.jsonl")  # a new one, from the next row on
        assert len(journal.read_text().splitlines()) == 2
        writer.stop()
        await task
    finally:
        await pool.close()
    assert writer.rows_written == 11
    assert not list(folder.glob("journal-*"))


async def test_under_a_steady_load_rows_go_once_a_second_and_old_journals_go(
    db_dsn: str, tmp_path: Path
) -> None:
    """Rows that keep coming do not make a round (a journal, an fsync, a commit) of every few;
    and the journal on disk holds only the rows of the last round or two, though the writer is
    never caught up."""
    folder = tmp_path / "audit"
    pool = await asyncpg.create_pool(db_dsn)
    try:
        writer = AuditWriter(lambda: pool, folder)
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(0.1)  # its first look for journals to replay is over
        syncs, sent, began = writer.journal_syncs, 0, time.monotonic()
        while time.monotonic() - began < 4.0:  # ~200 rows a second
            writer.submit(_row(sent))
            sent += 1
            await asyncio.sleep(0.005)
        rounds = writer.journal_syncs - syncs
        on_disk = sum(
            len(path.read_text().splitlines()) - 1  # less each part's header
            for path in folder.glob("journal-*.jsonl")
        )
        assert 2 <= rounds <= 7, f"{rounds} rounds in 4 s"  # about one a second
        assert writer.rows_written >= sent / 3  # they do go, round by round
        assert on_disk <= sent * 2.5 / 4, f"{on_disk} of {sent} rows still journaled"
        writer.stop()
        await task
        assert await pool.fetchval("SELECT count(*) FROM llama_requests") == sent
    finally:
        await pool.close()
    assert writer.rows_written == sent
    assert not list(folder.glob("journal-*"))


async def test_a_journal_that_cannot_be_written_loses_no_row_and_says_so(
    db_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "audit"
    folder.write_text("a file where the folder should be")  # as a full or broken disk would
    pool = await asyncpg.create_pool(db_dsn)
    try:
        writer = AuditWriter(lambda: pool, folder)
        task = asyncio.create_task(writer.run())
        for index in range(5):
            writer.submit(_row(index))  # never raises
        await eventually(lambda: writer.rows_written == 5)
        writer.stop()
        await task
    finally:
        await pool.close()
    assert writer.journal_failures >= 1
    complaints = [r for r in caplog.records if "cannot write the audit journal" in r.message]
    assert len(complaints) == 1  # once, not once a row


async def _fsynced_each_row(dsn: str, folder: Path) -> AuditWriter:
    """Submit rows to a writer one by one; each must be fsynced within 2.5 s, with no call."""
    pool = await asyncpg.create_pool(dsn, min_size=0)
    try:
        writer = AuditWriter(lambda: pool, folder)
        task = asyncio.create_task(writer.run(shutdown_timeout=1))
        for index in range(4):
            synced = writer.journal_syncs
            writer.submit(_row(index))
            assert writer.journal_syncs == synced  # appending never waits for the disk
            appended = time.monotonic()
            while writer.journal_syncs == synced:
                assert time.monotonic() - appended < 2.5, f"row {index} is not fsynced yet"
                await asyncio.sleep(0.02)
            await asyncio.sleep(index * 0.3)  # the next row comes at another point of the cycle
        writer.stop()
        await task
    finally:
        await pool.close()
    return writer


async def test_each_row_is_fsynced_within_about_a_second(db_dsn: str, tmp_path: Path) -> None:
    """An fsync about once a second bounds what a machine crash can lose."""
    writer = await _fsynced_each_row(db_dsn, tmp_path / "audit")
    assert writer.rows_written == 4


async def test_while_postgres_is_away_each_row_is_still_fsynced_within_a_second(
    tmp_path: Path,
) -> None:
    """The writer forms no new batches then (whose fsync would cover the rows otherwise)."""
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # refuses connections
    writer = await _fsynced_each_row(nowhere, tmp_path / "audit")
    assert writer.rows_written == 0
    assert writer.rows_spilled == 4  # at the stop, as the journal need not hold them longer


class _Watched(list[AuditRow]):
    """Rows that note how many of them have been read so far."""

    def __init__(self, rows: list[AuditRow]) -> None:
        super().__init__(rows)
        self.read = 0

    def __iter__(self) -> Iterator[AuditRow]:
        for row in super().__iter__():
            self.read += 1
            yield row


async def test_a_batchs_copy_lets_the_loop_run_between_its_rows(db_dsn: str) -> None:
    """COPY encodes a batch in turns: other tasks (every user's stream) run between them, not
    only once all its rows are encoded."""
    rows = _Watched([_row(index) for index in range(5 * ledger.COPY_TURN_ROWS)])
    seen: set[int] = set()
    done = False

    async def stream() -> None:
        while not done:
            seen.add(rows.read)
            await asyncio.sleep(0)

    con = await asyncpg.connect(db_dsn)
    try:
        beside = asyncio.create_task(stream())
        assert await ledger.write_audit_batch(con, uuid.uuid4(), COLUMNS, rows)
        done = True
        await beside
        written = await con.fetchval("SELECT count(*) FROM llama_requests")
    finally:
        await con.close()
    assert written == len(rows)
    midway = sorted(n for n in seen if 0 < n < len(rows))
    assert len(midway) >= 4, midway  # a pass of the loop at each turn
