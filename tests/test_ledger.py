"""The ledger is exact: every answer recorded with the status the client saw and its tokens,
one admission step that spends nothing for a refused request, and an audit writer that no row
and no failure can stop or make write a row twice."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from prometheus_client.exposition import generate_latest

from proxy.appkeys import ADMISSION, AUDIT_WRITER
from proxy.audit.row import COLUMNS, AuditRow
from proxy.audit.writer import AuditWriter
from proxy.metrics import Metrics
from tests.proxy_harness import Harness, bearer, running_proxy
from tests.sharing_helpers import set_limits, until

CHAT = {"model": "smollm2-test", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        yield harness


async def _db(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetch(sql, *args)
    finally:
        await con.close()


async def _rows_in_db(dsn: str, count: int) -> list[asyncpg.Record]:
    for _ in range(200):
        rows = await _db(dsn, "SELECT * FROM llama_requests ORDER BY id")
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(rows)} rows, not {count}")


# -- what the client received is what the row says ---------------------------------------------


async def test_fifty_sdk_streams_are_fifty_complete_rows_with_the_sdks_token_counts(
    proxy: Harness,
) -> None:
    """The OpenAI SDK closes its connection right after reading [DONE], while the backend's
    response ends a moment later: that is a complete answer, not a client leaving."""
    key = await proxy.user("alice")
    proxy.upstream.event_delay, proxy.upstream.tail_delay = 0.0, 0.05
    reported = []
    async with openai.AsyncOpenAI(
        base_url=proxy.url("/v1"), api_key=key, max_retries=0, timeout=10
    ) as client:
        for _ in range(50):
            stream = await client.chat.completions.create(
                model="smollm2-test",
                messages=[{"role": "user", "content": "Hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    reported.append((chunk.usage.prompt_tokens, chunk.usage.completion_tokens))
    rows = await proxy.wait_for_records(50)
    assert len(reported) == 50
    assert [(row.status_code, row.prompt_tokens, row.completion_tokens) for row in rows] == [
        (200, prompt, completion) for prompt, completion in reported
    ]
    assert {row.error for row in rows} == {None}


async def test_a_client_that_leaves_early_is_499_and_charged_what_was_generated(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.pieces = ["one", " two", " three", " four"]
    proxy.upstream.gate, proxy.upstream.gate_after = asyncio.Event(), 3  # stalls after " two"
    async with aiohttp.ClientSession() as client:
        body = {**CHAT, "stream": True}
        r = await client.post(proxy.url("/v1/chat/completions"), json=body, headers=bearer(key))
        received = b""
        while b" two" not in received:
            received += await asyncio.wait_for(r.content.readany(), 5)
        r.close()
        await asyncio.wait_for(proxy.upstream.client_left.wait(), 5)
        # Asked for one JSON answer, and left while it was generated: the same.
        proxy.upstream.client_left.clear()
        waiting = asyncio.create_task(
            client.post(proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key))
        )
        await asyncio.sleep(0.5)  # " two" has been generated: the backend waits at the gate
        assert len(proxy.upstream.seen) == 2
        waiting.cancel()
        await asyncio.wait_for(proxy.upstream.client_left.wait(), 5)
    streamed, whole = await proxy.wait_for_records(2)
    # The prompt is known from the backend's first usage event, before any answer token.
    assert (streamed.status_code, streamed.prompt_tokens, streamed.completion_tokens) == (
        499, 5, 2,
    )  # fmt: skip
    assert (whole.status_code, whole.prompt_tokens, whole.completion_tokens) == (499, 5, 2)
    assert streamed.error == whole.error == "client closed the connection"


async def test_answers_of_any_size_are_counted_in_bounded_memory(proxy: Harness) -> None:
    key = await proxy.user("alice")
    proxy.upstream.pieces = ["x" * 100_000] * 30  # a 3 MB answer
    async with aiohttp.ClientSession() as client:
        async with client.post(
            proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)
        ) as r:
            answer = await r.json()
        assert len(answer["choices"][0]["message"]["content"]) == 3_000_000
        assert answer["usage"]["total_tokens"] == 7
        proxy.upstream.embedding_size = 1000
        inputs = ["a"] * 128  # an embeddings answer well over a megabyte
        async with client.post(
            proxy.url("/v1/embeddings"), json={"input": inputs}, headers=bearer(key)
        ) as r:
            raw = await r.read()
        assert len(raw) > 1 << 20
    chat, embeddings = await proxy.wait_for_records(2)
    assert (chat.status_code, chat.prompt_tokens, chat.completion_tokens) == (200, 5, 2)
    assert (embeddings.status_code, embeddings.prompt_tokens) == (200, 3)


async def test_a_backend_that_breaks_off_a_stream_leaves_a_failed_row(proxy: Harness) -> None:
    key = await proxy.user("alice")
    async with aiohttp.ClientSession() as client:
        for mode in ("close-mid-stream", "end-mid-stream"):
            proxy.upstream.mode = mode
            body = {**CHAT, "stream": True}
            async with client.post(
                proxy.url("/v1/chat/completions"), json=body, headers=bearer(key)
            ) as r:
                assert r.status == 200  # the headers had gone: the client sees a cut
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
        proxy.upstream.mode = "close-mid-stream"
        async with client.post(
            proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)
        ) as r:
            assert r.status == 502  # nothing was sent yet: a plain error
    rows = await proxy.wait_for_records(3)
    assert [row.status_code for row in rows] == [502, 502, 502]
    assert all("broke off" in str(row.error) or "[DONE]" in str(row.error) for row in rows)
    # ... and the audit writer puts all three in Postgres, as failures.
    failed = await _rows_in_db(proxy.dsn, 3)
    assert [row["status_code"] for row in failed] == [502, 502, 502]


# -- one admission step --------------------------------------------------------------------------


async def _all_but(left: int, tasks: list[asyncio.Task[int]]) -> None:
    """Return once all but `left` of `tasks` are done."""
    pending = set(tasks)
    while len(pending) > left:
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)


async def _admissions(dsn: str, username: str) -> int:
    """Admissions in the user's window; places still leased (stamped at the lease's end, in the
    future) are not admissions until given back (migration 0019)."""
    rows = await _db(
        dsn,
        """SELECT count(*) AS n FROM rate_admissions a JOIN users u ON u.id = a.user_id
           WHERE u.username = $1 AND a.admitted_at <= clock_timestamp()""",
        username,
    )
    return int(rows[0]["n"])


async def test_parallel_requests_take_places_atomically_and_refusals_spend_nothing_after(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    # A 12 s window: a lease of places (1 s) is given back well within the waits below.
    await set_limits(proxy.dsn, "alice", max_concurrent=2, rate_window_seconds=12)
    proxy.upstream.gate = asyncio.Event()
    url = proxy.url("/v1/chat/completions")
    async with aiohttp.ClientSession() as client:
        refusals: list[dict[str, Any]] = []

        async def call(**kwargs: Any) -> int:
            async with client.post(url, headers=bearer(key), **kwargs) as r:
                if r.status == 429:
                    refusals.append(await r.json())
                await r.read()
                return r.status

        body = {**CHAT, "stream": True}
        flood = [asyncio.create_task(call(json=body)) for _ in range(10)]
        await asyncio.wait_for(_all_but(2, flood), 5)
        assert sorted(task.result() for task in flood if task.done()) == [429] * 8
        # Only the two admitted requests spent a rate-limit admission (theirs may still be on
        # the way to Postgres as the refusals come back).
        async with asyncio.timeout(5):
            while await _admissions(proxy.dsn, "alice") < 2:  # noqa: ASYNC110 - Postgres is polled
                await asyncio.sleep(0.02)
        assert await _admissions(proxy.dsn, "alice") == 2
        proxy.upstream.gate.set()
        assert sorted(await asyncio.gather(*flood)) == [200] * 2 + [429] * 8
        # A stream's place is given back as its backend's response ends, a moment after [DONE].
        await until(lambda: not proxy.app[ADMISSION].places.by_user())
        # Refused at the body: no quota read, no admission spent.
        assert await call(data=b"{not json") == 400
        assert await call(json={**CHAT, "stream": "yes"}) == 400
        assert await _admissions(proxy.dsn, "alice") == 2
        # Refused at the quota: no admission spent either (the two answers used 14 tokens).
        await set_limits(proxy.dsn, "alice", tokens_per_minute=14)
        await asyncio.sleep(2.1)  # the quota figures are re-read at most every 2 s
        assert await call(json=CHAT) == 429
        # The quota's refusal, not the concurrency cap's (type "requests"): had the two 400s
        # kept their places, alice would have none of her two left.
        assert refusals[-1]["error"]["type"] == "tokens", refusals[-1]
        assert "tokens per minute" in refusals[-1]["error"]["message"]
        assert await _admissions(proxy.dsn, "alice") == 2
    rows = await proxy.wait_for_records(13)
    assert sorted(row.status_code for row in rows) == [200] * 2 + [400] * 2 + [429] * 9


# -- an audit writer nothing can stop ---------------------------------------------------------


async def _raw(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes no well-behaved client library would (it refuses to); the answer's bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_hostile_text_in_every_field_reaches_the_ledger(proxy: Harness) -> None:
    key = await proxy.user("alice")
    port = proxy.server.port
    assert port is not None
    # A NUL in the model, and an end user (OpenAI's `user`) far longer than a column should
    # hold; invalid UTF-8 in a header. The model is unknown: a 404 that spent nothing.
    end_user = "who\x00" + "u" * 100_000
    body = json.dumps({**CHAT, "model": "bad\x00model", "user": end_user}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\nX-Request-Id: \xff\xfe\xed\xa0\x80\r\n"
    )
    assert b" 404 " in (await _raw(port, head, body)).split(b"\r\n", 1)[0]
    # A lone surrogate (a JSON escape) is no text at all: a 400 naming the field.
    lone = json.dumps({**CHAT, "user": "\ud800who"}).encode()
    answer = await _raw(port, head.replace(b"\xff\xfe\xed\xa0\x80", b"x"), lone)
    assert b" 400 " in answer.split(b"\r\n", 1)[0]
    assert b'"param": "user"' in answer
    async with aiohttp.ClientSession() as client:
        for path in ("/v1/%ED%A0%80", "/v1/%00%FF", "/v1/" + "%F0%9F%A6%99" * 400):
            async with client.get(proxy.url(path), headers=bearer(key)) as r:
                assert r.status == 404
    rows = await _rows_in_db(proxy.dsn, 2)
    assert len(rows) == 2
    assert rows[0]["model"] == "bad\ufffdmodel"
    assert rows[0]["end_user"] == "who\ufffd" + "u" * 508  # cut at 512 characters
    assert rows[0]["client_request_id"] is None  # not an id we can give back: not recorded
    assert rows[1]["status_code"] == 400
    # Paths no route has are counted, not recorded one by one; and stored as text can be.
    [counted] = await proxy.strangers()
    paths = json.loads(counted["paths"])
    assert sum(paths.values()) == 3
    assert all("\x00" not in path and len(path) <= 512 for path in paths)
    writer = proxy.app[AUDIT_WRITER]
    assert (writer.rows_rejected, writer.restarts) == (0, 0)


def _row(index: int, **changes: Any) -> AuditRow:
    row = AuditRow(
        f"req-{index}", datetime.now(UTC), None, "alice", None, "POST", "/v1/chat/completions",
        None, False, 200, 1.0, None, None, 10, 20, 5, 2, "127.0.0.1", None,
    )  # fmt: skip
    return row._replace(**changes)


class FlakyPool:
    """A real pool whose `acquire` fails as an outage on the calls numbered in `fail_on`."""

    def __init__(self, pool: asyncpg.Pool, fail_on: set[int], error: Exception) -> None:
        self._pool = pool
        self._fail_on = fail_on
        self._error = error
        self.calls = 0

    def acquire(self, timeout: float | None = None) -> Any:
        self.calls += 1
        if self.calls in self._fail_on:
            raise self._error
        return self._pool.acquire(timeout=timeout)


async def test_a_writer_that_fails_is_restarted_reported_and_loses_nothing(
    db_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await asyncpg.create_pool(db_dsn)
    flaky = FlakyPool(pool, {1}, RuntimeError("a bug in the writer"))
    writer = AuditWriter(lambda: flaky, tmp_path / "spill", flush_interval=0.05)  # type: ignore[arg-type, return-value]
    metrics = Metrics(())
    metrics.watch_audit(writer)
    task = asyncio.create_task(writer.run())
    try:
        for index in range(3):
            writer.submit(_row(index))
        rows = await _rows_in_db(db_dsn, 3)
    finally:
        writer.stop()
        await task
        await pool.close()
    assert [row["request_id"] for row in rows] == ["req-0", "req-1", "req-2"]
    assert writer.restarts == 1
    assert "the audit writer failed (restart 1)" in caplog.text
    assert (
        "llama_gate_audit_writer_restarts_total 1.0" in generate_latest(metrics.registry).decode()
    )


async def test_isolating_a_refused_row_writes_every_other_row_exactly_once(
    db_dsn: str, tmp_path: Path
) -> None:
    """The batch is split to find the row Postgres refuses; an outage in the middle of that
    makes the whole batch go again, and the halves already written are not written twice."""
    pool = await asyncpg.create_pool(db_dsn)
    # 1: the batch (refused), 2: its first half (refused), 3: the first quarter (written),
    # 4: an outage: everything is retried later.
    flaky = FlakyPool(pool, {4}, OSError("connection refused"))
    writer = AuditWriter(  # type: ignore[arg-type]
        lambda: flaky,
        tmp_path / "spill",
        batch_size=6,
        flush_interval=0.05,  # type: ignore[return-value]
    )
    task = asyncio.create_task(writer.run())
    try:
        for index in range(6):
            # NUL is no text to Postgres (rows made by the pipeline never hold one).
            writer.submit(_row(index, path="/v1/\x00") if index == 2 else _row(index))
        rows = await _rows_in_db(db_dsn, 5)
        await asyncio.sleep(0.3)
        rows = await _db(db_dsn, "SELECT request_id FROM llama_requests ORDER BY request_id")
    finally:
        writer.stop()
        await task
        await pool.close()
    assert [row["request_id"] for row in rows] == ["req-0", "req-1", "req-3", "req-4", "req-5"]
    assert flaky.calls > 4
    assert writer.rows_rejected == 1
    rejected = (tmp_path / "spill" / "rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["row"]["request_id"] for line in rejected] == ["req-2"]


async def test_spill_files_from_before_a_schema_change_replay_and_unreadable_ones_are_kept(
    db_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    spill = tmp_path / "spill"
    spill.mkdir()
    created = datetime.now(UTC).isoformat()
    first_format = ["req-old", created, *list(_row(0))[2:19]]  # rows as lists, 19 columns
    by_name = {k: v for k, v in _row(1)._asdict().items() if k not in ("client_request_id",)}
    by_name.update(request_id="req-named", created_at=created, backend="gpu2")
    (spill / "spill-1-1.jsonl").write_text(
        json.dumps({"batch": str(uuid.uuid4()), "rows": [first_format]}) + "\n"
    )
    (spill / "spill-2-2.jsonl").write_text(
        json.dumps({"batch": str(uuid.uuid4()), "rows": [by_name]}) + "\n"
    )
    good = {**by_name, "request_id": "req-beside-garbage"}
    (spill / "spill-3-3.jsonl").write_text(
        "this is not JSON\n" + json.dumps({"batch": str(uuid.uuid4()), "rows": [good]}) + "\n"
    )
    pool = await asyncpg.create_pool(db_dsn)
    writer = AuditWriter(lambda: pool, spill, flush_interval=0.05)
    task = asyncio.create_task(writer.run())
    try:
        rows = await _rows_in_db(db_dsn, 3)
    finally:
        writer.stop()
        await task
        await pool.close()
    by_id = {row["request_id"]: row for row in rows}
    assert sorted(by_id) == ["req-beside-garbage", "req-named", "req-old"]
    assert by_id["req-named"]["backend"] == "gpu2"
    assert by_id["req-old"]["backend"] is None
    assert sorted(path.name for path in spill.iterdir()) == ["spill-3-3.jsonl.unreadable"]
    assert writer.unreadable_files == 1
    assert "cannot be read" in caplog.text
    assert set(COLUMNS) >= set(by_name)


async def test_a_row_names_the_model_that_served_or_would_have_when_the_client_names_none(
    proxy: Harness,
) -> None:
    """README's own curl example names no model: its row names the backend's model; a request
    refused before its body was read names it too (there is only one it could have been)."""
    key = await proxy.user("alice")
    unnamed = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/chat/completions", "/v1/messages"):
            body = {**unnamed, "model": "smollm2-test"} if path == "/v1/messages" else unnamed
            async with http.post(proxy.url(path), json=body, headers=bearer(key)) as r:
                assert r.status == 200
        async with http.post(proxy.url("/v1/responses"), json={"input": "Hi"},
                             headers=bearer(key)) as r:  # fmt: skip
            assert r.status == 200
            assert (await r.json())["model"] == "smollm2-test"  # the answer says so too
        # Refused before any model could be read from its body.
        async with http.post(proxy.url("/v1/chat/completions"), data=b"{",
                             headers=bearer(key)) as r:  # fmt: skip
            assert r.status == 400
    rows = await proxy.wait_for_records(4)
    assert [(r.path, r.model) for r in rows] == [
        ("/v1/chat/completions", "smollm2-test"),
        ("/v1/messages", "smollm2-test"),
        ("/v1/responses", "smollm2-test"),
        ("/v1/chat/completions", "smollm2-test"),
    ]
