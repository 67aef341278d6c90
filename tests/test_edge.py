"""The HTTP edge: path tricks, browsers' CORS, slow or stalled clients, and malformed HTTP never
cost another user anything and never reach a backend unchecked."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fake_upstream import FakeUpstream
from tests.proxy_harness import (
    BACKEND_KEY,
    Harness,
    bearer,
    make_user,
    proxy_environ,
    proxy_process,
    running_proxy,
)
from tests.sharing_helpers import set_limits

CHAT = {"model": "smollm2-test", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    upstream = FakeUpstream(
        expected_key=BACKEND_KEY,
        # What llama_cpp.server's own CORS middleware sends: never to reach a client.
        response_headers={
            "Access-Control-Allow-Origin": "http://evil.example",
            "Access-Control-Allow-Credentials": "true",
        },
    )
    settings = {"LLAMA_PROXY_BODY_TIMEOUT_SECONDS": "1", "LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS": "1"}
    async with running_proxy(db_dsn, tmp_path, upstream, **settings) as harness:
        yield harness


async def _raw(port: int, data: bytes, read: bool = True) -> bytes:
    """Bytes a client library would not send (it normalizes paths, refuses control bytes);
    the answer's head and body (read by its Content-Length, or to the connection's end)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = b""
    if read:
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b"\r\n\r\n")
            length = [
                int(line.split(b":", 1)[1])
                for line in answer.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            answer += await (reader.readexactly(length[0]) if length else reader.read())
    writer.close()
    return answer


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/../chat/completions",
        "/v1/./chat/completions",
        "/v1/..%2Fchat/completions",
        "/v1/%2e%2e/chat/completions",
        "/v1/%2E%2E%2Fchat/completions",
        "/v1/models/%252e%252e/x",
        "/v1/models/..\\x",
    ],
)
async def test_dot_segments_in_any_spelling_are_a_400_the_backend_never_sees(
    proxy: Harness, path: str
) -> None:
    key = await proxy.user("alice")
    body = json.dumps(CHAT).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    answer = await _raw(proxy.server.port or 0, request)
    assert _status(answer) == 400, answer
    assert b"'.' or '..' segments" in answer
    assert proxy.upstream.seen == []
    (row,) = await proxy.wait_for_records(1)
    assert row.status_code == 400


async def test_a_trailing_slash_is_a_404_never_a_redirect(proxy: Harness) -> None:
    key = await proxy.user("alice")
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            proxy.url("/v1/chat/completions/"), json=CHAT, headers=bearer(key),
            allow_redirects=False,
        ) as r,
    ):  # fmt: skip
        assert r.status == 404
        assert "Location" not in r.headers
    assert proxy.upstream.seen == []


# -- browsers ------------------------------------------------------------------------------------


async def test_browsers_get_cors_on_every_answer_and_preflights_need_no_key(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    origin = {"Origin": "https://chat.example.com"}
    url = proxy.url("/v1/chat/completions")
    async with aiohttp.ClientSession() as client:
        preflight = {
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with client.options(url, headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
            assert "Access-Control-Allow-Credentials" not in r.headers
        answers = []
        async with client.post(url, json=CHAT, headers=origin) as r:  # no key: 401
            answers.append(r)
        async with client.post(url, json=CHAT, headers={**origin, **bearer(key)}) as r:
            answers.append(r)
        body = {**CHAT, "stream": True}
        async with client.post(url, json=body, headers={**origin, **bearer(key)}) as r:
            await r.read()
            answers.append(r)
        async with client.get(proxy.url("/v1/models"), headers={**origin, **bearer(key)}) as r:
            answers.append(r)
    assert [r.status for r in answers] == [401, 200, 200, 200]
    for r in answers:
        # Ours, on the proxy's own errors too; the backend's (echoing any origin, with
        # credentials) never passes through.
        assert r.headers.getall("Access-Control-Allow-Origin") == ["*"], r.url
        assert "Access-Control-Allow-Credentials" not in r.headers
        assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]
    rows = await proxy.wait_for_records(4)
    assert len(rows) == 4  # the preflight is no API request


@pytest.mark.parametrize(
    ("origins", "admitted"),
    [
        ("https://chat.example.com, http://localhost:3000", True),
        ("", False),  # empty: no browser at all (clients that are not browsers are unaffected)
    ],
)
async def test_a_list_of_origins_admits_those_alone(
    db_dsn: str, tmp_path: Path, origins: str, admitted: bool
) -> None:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_CORS_ORIGINS=origins) as proxy:
        key = await proxy.user("alice")
        url = proxy.url("/v1/models")
        async with aiohttp.ClientSession() as client:
            for origin, allowed in (
                ("http://localhost:3000", admitted),
                ("https://CHAT.example.com", admitted),
                ("https://evil.example", False),
            ):
                ask = {"Origin": origin, "Access-Control-Request-Method": "GET"}
                async with client.options(url, headers=ask) as r:
                    assert r.status == (204 if allowed else 403), origin
                async with client.get(url, headers={"Origin": origin, **bearer(key)}) as r:
                    assert r.status == 200
                    shown = r.headers.get("Access-Control-Allow-Origin")
                    assert shown == (origin if allowed else None), origin


async def test_the_proxys_own_429_and_5xx_answers_carry_its_cors_and_never_the_backends(
    db_dsn: str, tmp_path: Path
) -> None:
    """A browser page can read why it was refused or failed only if the error is labelled."""
    upstream = FakeUpstream(
        expected_key=BACKEND_KEY,
        response_headers={
            "Access-Control-Allow-Origin": "http://evil.example",
            "Access-Control-Allow-Credentials": "true",
        },
    )
    allowed, other = "https://chat.example.com", "http://evil.example"
    # A stopped backend is waited for 1 s (not the default 30 s) before the 503.
    settings = {
        "LLAMA_PROXY_CORS_ORIGINS": allowed,
        "LLAMA_PROXY_BACKEND_RESTART_WAIT_SECONDS": "1",
    }
    async with running_proxy(db_dsn, tmp_path, upstream, **settings) as proxy:
        limited = await proxy.user("limited", rate_limit=1, rate_window_seconds=3600)
        alice = await proxy.user("alice")
        url = proxy.url("/v1/chat/completions")
        answers: list[tuple[str, int, str | None, dict[str, str]]] = []
        async with aiohttp.ClientSession() as client:

            async def ask(case: str, key: str) -> None:
                for origin in (allowed, other):
                    headers = {"Origin": origin, **bearer(key)}
                    async with client.post(url, json=CHAT, headers=headers) as r:
                        shown = r.headers.getall("Access-Control-Allow-Origin", [])
                        assert len(shown) <= 1, (case, shown)
                        labelled = shown[0] if shown else None
                        answers.append((case, r.status, labelled, dict(r.headers)))

            async with client.post(url, json=CHAT, headers=bearer(limited)) as r:
                assert r.status == 200  # the one request of its hour
            await ask("rate limited", limited)
            upstream.mode, upstream.error_status = "error", 503
            await ask("backend refused", alice)
            upstream.mode = "close-before-headers"
            await ask("backend cut off", alice)
            await upstream.stop()
            await ask("backend down", alice)
    assert [(case, status, shown) for case, status, shown, _ in answers] == [
        ("rate limited", 429, allowed),
        ("rate limited", 429, None),
        ("backend refused", 502, allowed),  # its own 503, answered as the proxy's 502
        ("backend refused", 502, None),
        ("backend cut off", 502, allowed),
        ("backend cut off", 502, None),
        ("backend down", 503, allowed),
        ("backend down", 503, None),
    ]
    for case, _, shown, headers in answers:
        assert "Access-Control-Allow-Credentials" not in headers, case
        assert ("X-Request-Id" in headers.get("Access-Control-Expose-Headers", "")) == (
            shown is not None
        ), case
        assert "evil.example" not in str(headers), case


# -- slow, stalled and stopped clients -----------------------------------------------------------


async def test_a_stalled_body_is_a_408_and_holds_its_senders_place_meanwhile(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    await set_limits(proxy.dsn, "alice", max_concurrent=1)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    ).encode()
    stalled = asyncio.create_task(_raw(proxy.server.port or 0, head + b'{"model": '))
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as client:
        async with client.post(
            proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)
        ) as r:
            assert r.status == 429  # the stalled request still holds alice's one place
        answer = await stalled
        assert _status(answer) == 408
        assert b"did not arrive within 1 s" in answer
        async with client.post(
            proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)
        ) as r:
            assert r.status == 200
    assert proxy.upstream.seen[0].path == "/v1/chat/completions"
    assert len(proxy.upstream.seen) == 1


async def test_100_continue_is_promised_only_after_the_key_is_checked(proxy: Harness) -> None:
    key = await proxy.user("alice")
    port = proxy.server.port or 0
    body = json.dumps(CHAT).encode()

    def head(token: str) -> bytes:
        return (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n"
        ).encode()

    refused = await _raw(port, head("lgk_0000000000000000_" + "x" * 43))
    assert refused.startswith(b"HTTP/1.1 401"), refused[:40]
    assert b"100 Continue" not in refused
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(key))
    await writer.drain()
    promise = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert promise == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:40]


# Large pieces, and small ones (each written without a timer while nothing waits to be sent).
@pytest.mark.parametrize(("size", "count"), [(65536, 400), (1024, 12_000)])
async def test_a_client_that_stops_reading_is_cut_off_and_frees_the_backend(
    proxy: Harness, size: int, count: int
) -> None:
    alice, bob = await proxy.user("alice"), await proxy.user("bob")
    proxy.upstream.pieces = ["x" * size] * count  # 26 or 12 MB: more than socket buffers hold
    proxy.upstream.event_delay = 0.0
    body = json.dumps({**CHAT, "stream": True}).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.server.port or 0))
    sock.sendall(request)  # ... and never reads
    try:
        await asyncio.wait_for(proxy.upstream.client_left.wait(), 10)
        proxy.upstream.pieces = ["ok"]
        async with (
            aiohttp.ClientSession() as client,
            client.post(proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(bob)) as r,
        ):
            assert r.status == 200
    finally:
        sock.close()
    stopped, served = await proxy.wait_for_records(2)
    assert stopped.status_code == 499
    assert "stopped reading" in str(stopped.error)
    assert served.status_code == 200


# -- a real process: its own HTTP server ---------------------------------------------------------


async def test_slow_headers_are_cut_off_and_malformed_http_is_one_quiet_line(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY)
    await upstream.start()
    _, key = await make_user(db_dsn, "alice")
    environ = proxy_environ(db_dsn, upstream.port, tmp_path, LLAMA_PROXY_HEADER_TIMEOUT_SECONDS="1")
    log = tmp_path / "proxy.log"
    try:
        with proxy_process(environ, log=log) as url:
            port = int(url.rsplit(":", 1)[1])
            slow = []
            for _ in range(30):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
                slow.append((reader, writer))
            started = time.monotonic()

            async def dribble(writer: asyncio.StreamWriter) -> None:
                for _ in range(20):  # one byte a while, as a slowloris does
                    writer.write(b"X")
                    await asyncio.sleep(0.2)

            dribblers = [asyncio.create_task(dribble(w)) for _, w in slow]
            async with (
                aiohttp.ClientSession() as client,
                client.get(f"{url}/v1/models", headers=bearer(key)) as r,
            ):
                assert r.status == 200  # served meanwhile
            for reader, _ in slow:
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on them
            assert time.monotonic() - started < 3
            for task in dribblers:
                task.cancel()
            for _, writer in slow:
                writer.close()
            for garbage in (
                b"\x16\x03\x01\x00\xa5<script>alert(1)</script>\r\n\r\n",
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad\x01: <script>secret</script>\r\n\r\n",
                b"FOO<script> / HTTP/1.1\r\n\r\n",
            ):
                answer = await _raw(port, garbage)
                assert _status(answer) == 400
                assert b"<script>" not in answer  # nothing of the client's bytes comes back
                assert b"well-formed HTTP" in answer
    finally:
        await upstream.stop()
    output = log.read_text()
    assert "Traceback" not in output
    malformed = [line for line in output.splitlines() if "malformed HTTP" in line]
    assert len(malformed) == 3, output
    assert all("<script>" not in line for line in malformed)


async def test_no_answer_of_any_kind_carries_the_backends_cors_headers(proxy: Harness) -> None:
    """llama_cpp.server's CORS middleware labels every answer for any origin, with credentials:
    no reply kind copies a backend header, so none reaches a client: each carries the proxy's
    own label only."""
    key = await proxy.user("alice")
    proxy.upstream.event_delay = proxy.upstream.tail_delay = 0.0
    hi = [{"role": "user", "content": "Hi"}]
    asks: list[tuple[str, str, Any]] = [
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
        ("POST", "/v1/completions", {"model": "smollm2-test", "prompt": "Hi"}),
        ("POST", "/v1/embeddings", {"model": "smollm2-test", "input": "Hi"}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/smollm2-test", None),
        ("POST", "/v1/messages", {"model": "smollm2-test", "max_tokens": 5, "messages": hi}),
        ("POST", "/v1/messages", {"model": "smollm2-test", "max_tokens": 5, "messages": hi,
                                  "stream": True}),
        ("POST", "/v1/responses", {"model": "smollm2-test", "input": "Hi"}),
        ("POST", "/v1/responses", {"model": "smollm2-test", "input": "Hi", "stream": True}),
        ("POST", "/rpc", {"jsonrpc": "2.0", "id": 1, "method": "create_message",
                          "params": {"messages": hi}}),
        ("POST", "/stream", {"message": "Hi"}),
    ]  # fmt: skip
    async with aiohttp.ClientSession() as client:
        for method, path, body in asks:
            headers = {"Origin": "http://evil.example", **bearer(key)}
            async with client.request(method, proxy.url(path), json=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, (path, r.status, await r.text())
                # The proxy's own label (LLAMA_PROXY_CORS_ORIGINS, `*` by default), alone.
                shown = r.headers.getall("Access-Control-Allow-Origin", [])
                assert shown == ["*"], (method, path, shown)
                assert "Access-Control-Allow-Credentials" not in r.headers, (method, path)
