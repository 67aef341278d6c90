"""`llama-gate serve` and `python -m proxy`: flags over settings, and a graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from proxy.cli.main import cli
from proxy.db.localpg import free_port
from tests.fake_upstream import MODEL, FakeUpstream
from tests.hammer import Hammer
from tests.proxy_harness import (
    BACKEND_KEY,
    ROOT,
    bearer,
    make_user,
    proxy_environ,
    proxy_process,
    wait_for_health,
)

LLAMA_GATE = Path(sys.executable).parent / "llama-gate"


def test_serve_help_documents_its_flags() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    assert "--host" in result.output
    assert "--port" in result.output
    assert "Example:" in result.output


def test_llama_gate_serve_listens_where_settings_say_and_stops_on_sigint(
    db_dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    environ = proxy_environ(db_dsn, free_port(), tmp_path)
    environ.update(LLAMA_PROXY_HOST="127.0.0.1", LLAMA_PROXY_PORT=str(port))
    process = subprocess.Popen(
        [str(LLAMA_GATE), "serve"],
        env={**os.environ, **environ},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_health(f"http://127.0.0.1:{port}", process)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    text = output.decode()
    assert f"listening on 127.0.0.1:{port}" in text
    assert "stopped" in text
    assert "Traceback" not in text


def test_port_flag_overrides_the_environment(db_dsn: str, tmp_path: Path) -> None:
    environ = proxy_environ(db_dsn, free_port(), tmp_path)
    environ["LLAMA_PROXY_PORT"] = "1"  # would fail: the flag must win
    with proxy_process(environ) as url:
        assert url.startswith("http://127.0.0.1:")


def test_a_port_in_use_is_one_clear_line(db_dsn: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **proxy_environ(db_dsn, free_port(), tmp_path)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_sigterm_lets_a_stream_in_flight_finish(db_dsn: str, tmp_path: Path) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, gate=asyncio.Event())
    await upstream.start()
    _, key = await make_user(db_dsn, "alice")
    port = free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waits go to threads
        [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **proxy_environ(db_dsn, upstream.port, tmp_path)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await asyncio.to_thread(wait_for_health, f"http://127.0.0.1:{port}", process)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=bearer(key)
            ) as r,
        ):
            await asyncio.wait_for(r.content.readuntil(b"\r\n\r\n"), 10)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert process.poll() is None  # still serving the stream
            assert upstream.gate is not None
            upstream.gate.set()
            rest = await asyncio.wait_for(r.content.read(), 10)
        assert rest.endswith(b"data: [DONE]\r\n\r\n")
        returncode = await asyncio.to_thread(process.wait, 15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        await upstream.stop()
    assert returncode == 0


def _serve(environ: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", *args], env={**os.environ, **environ}, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _wait_for_file(path: Path, content: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text().strip() == content):
        assert process.poll() is None, (process.stdout.read() if process.stdout else b"").decode()
        assert time.monotonic() < deadline, f"{path} never said {content}"
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=45)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return output.decode()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_successor_takes_the_port_over_and_no_connection_is_refused(
    db_dsn: str, tmp_path: Path, workers: str
) -> None:
    port = free_port()
    environ = proxy_environ(db_dsn, free_port(), tmp_path)
    handover = tmp_path / "proxy.sock"
    flags = ["--host", "127.0.0.1", "--port", str(port), "--handover", str(handover)]
    flags += ["--workers", workers]  # with 2, the parents hand over; their workers serve
    old = _serve(environ, *flags, "--ready-file", str(tmp_path / "old.ready"))
    new: subprocess.Popen[bytes] | None = None
    try:
        _wait_for_file(tmp_path / "old.ready", str(old.pid), old)
        assert oct(handover.stat().st_mode & 0o777) == "0o600"
        with Hammer(port) as hammer:
            time.sleep(1)
            new = _serve(environ, *flags, "--ready-file", str(tmp_path / "new.ready"))
            _wait_for_file(tmp_path / "new.ready", str(new.pid), new)
            before = hammer.answered
            old_output = _stop(old)
            time.sleep(1.5)
        assert old.returncode == 0, old_output
        assert "handed the listening sockets to a successor" in old_output
        assert hammer.failures == [], hammer.failures
        assert hammer.answered > before > 20, hammer.statuses
        assert set(hammer.statuses) == {200, 401}, hammer.statuses
        assert new.poll() is None
        # The socket file is the successor's now; the old proxy left it in place.
        assert handover.exists()
    finally:
        _stop(old)
        new_output = _stop(new) if new else ""
    assert "took the listening sockets on 127.0.0.1:" in new_output
    assert not handover.exists()  # the last one removes its own


def test_a_stale_handover_socket_or_another_port_binds_afresh(db_dsn: str, tmp_path: Path) -> None:
    environ = proxy_environ(db_dsn, free_port(), tmp_path)
    handover = tmp_path / "proxy.sock"
    with socket.socket(socket.AF_UNIX) as left_behind:  # a proxy that was SIGKILLed
        left_behind.bind(str(handover))
    first_port, second_port = free_port(), free_port()
    first = _serve(
        environ, "--host", "127.0.0.1", "--port", str(first_port), "--handover", str(handover)
    )
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for_health(f"http://127.0.0.1:{first_port}", first)
        # The port setting changed: the successor listens where it is told, not on the old port.
        second = _serve(
            environ, "--host", "127.0.0.1", "--port", str(second_port), "--handover", str(handover)
        )
        wait_for_health(f"http://127.0.0.1:{second_port}", second)
    finally:
        first_output = _stop(first)
        second_output = _stop(second) if second else ""
    assert "took the listening sockets" not in first_output + second_output
    assert "Traceback" not in first_output + second_output


def test_serve_logs_no_password_of_a_keyword_dsn(tmp_path: Path) -> None:
    """The listening line, the pool's and the listener's complaints all name the database."""
    dsn = f"host=127.0.0.1 port={free_port()} user=postgres password=kw-s3cret dbname=nowhere"
    port = free_port()
    environ = proxy_environ(dsn, free_port(), tmp_path)
    process = _serve(environ, "--host", "127.0.0.1", "--port", str(port))
    try:
        wait_for_health(f"http://127.0.0.1:{port}", process)
        time.sleep(1)  # the auth listener's first attempt and complaint
    finally:
        output = _stop(process)
    assert "kw-s3cret" not in output
    assert output.count("postgres:***@127.0.0.1") >= 3, output
