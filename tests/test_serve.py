"""`llama-gate serve` and `python -m proxy`: flags over settings, and a graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from click.testing import CliRunner

from proxy.cli.main import cli
from proxy.db.localpg import free_port
from tests.fake_upstream import FakeUpstream
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
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
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
