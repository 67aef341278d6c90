"""`bin/console.sh` from a clean clone: one command installs and starts the whole stack, a
second start harms nothing, a real user chats through it with curl, a crash and a taken port
are reported with the log line that explains them, and stop stops everything."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from proxy.db.localpg import free_port
from proxy.settings import KNOWN_VARIABLES
from tests.backend_harness import REPO
from tests.cli_helpers import KEY_RE
from tests.hammer import Hammer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone() -> Iterator[tuple[Path, dict[str, str]]]:
    # Not under tmp_path: the local Postgres runs as the postgres user when tests run as root,
    # and pytest's folders are private to root.
    root = Path(tempfile.mkdtemp(prefix="llama-gate-clone-"))
    root.chmod(0o755)
    checkout = root / "llama-gate"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(checkout)], check=True)
    ports = {
        "LLAMA_GATE_LOCAL_PG_PORT": str(free_port()),
        "LLAMA_SERVER_PORT": str(free_port()),
        "LLAMA_PROXY_PORT": str(free_port()),
        "LLAMA_PROXY_METRICS_PORT": "0",
        "LLAMA_PROXY_DASHBOARD_PORT": "0",
        "N_THREADS": "2",
    }
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in KNOWN_VARIABLES and not k.startswith(("POSTGRES_AUTH_", "LLAMA_", "N_"))
    }
    env = {**inherited, **ports}
    try:
        yield checkout, env
    finally:
        _run(checkout, env, "bin/console.sh", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _run(checkout: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=checkout, env=env, capture_output=True, text=True, timeout=900,
        check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _chat(port: str, key: str, check: bool = True) -> dict[str, object]:
    body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8})
    result = subprocess.run(
        [
            "curl", "-sS", "--fail-with-body", f"http://127.0.0.1:{port}/v1/chat/completions",
            "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json",
            "-d", body,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_start_chat_restart_crash_and_stop_from_a_clean_clone(
    clone: tuple[Path, dict[str, str]],
) -> None:
    checkout, env = clone
    started = _run(checkout, env, "bin/console.sh", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    proxy_port = env["LLAMA_PROXY_PORT"]
    assert f"llama-gate is up: http://127.0.0.1:{proxy_port}/v1" in started.stdout
    assert "bin/user_management_cli.sh create-user --username alice" in started.stdout
    config = checkout / "runtime" / "config.env"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    # The local Postgres wants the generated password: nothing else here can log in to it.
    written = config.read_text()
    assert "POSTGRES_AUTH_PASSWORD=" in written
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(
            asyncpg.connect(
                host="127.0.0.1",
                port=int(env["LLAMA_GATE_LOCAL_PG_PORT"]),
                user="postgres",
                password="guess",
                database="postgres",
            )
        )
    assert list((checkout / "models").glob("*.gguf"))

    created = _run(
        checkout, env, "bin/user_management_cli.sh", "create-user", "--username", "alice"
    )
    assert created.returncode == 0, created.stderr
    key = KEY_RE.search(created.stdout)
    assert key
    answer = _chat(proxy_port, key.group(0))
    assert answer["object"] == "chat.completion"

    again = _run(checkout, env, "bin/console.sh", "start")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "backend: already running" in again.stdout
    assert "proxy: already running" in again.stdout
    assert config.read_text() == written  # complete already: not rewritten, keys and all
    status = _run(checkout, env, "bin/console.sh", "status")
    assert status.returncode == 0, status.stdout
    assert "backend: running" in status.stdout

    # A crashed part is reported with the end of its log.
    backend_pid = int((checkout / "runtime" / "run" / "backend.pid").read_text().split()[0])
    os.kill(backend_pid, signal.SIGKILL)
    crashed = _run(checkout, env, "bin/console.sh", "status")
    assert crashed.returncode != 0
    assert "backend: CRASHED" in crashed.stdout
    assert "runtime/logs/backend.log" in crashed.stdout

    # A port taken by someone else is named, with what to do.
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAITs
        squatter.bind(("127.0.0.1", int(env["LLAMA_SERVER_PORT"])))
        squatter.listen()
        blocked = _run(checkout, env, "bin/console.sh", "start")
    assert blocked.returncode != 0
    assert f"port {env['LLAMA_SERVER_PORT']} on 127.0.0.1 is already taken" in blocked.stderr

    restarted = _run(checkout, env, "bin/console.sh", "start")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "backend: healthy" in restarted.stdout
    assert "proxy: already running" in restarted.stdout
    assert config.read_text() == written
    # The proxy probes backends every 2 s, so it takes the restarted one back in by then.
    deadline = time.monotonic() + 10
    while (answer := _chat(proxy_port, key.group(0), check=False)).get("object") is None:
        assert time.monotonic() < deadline, answer
        time.sleep(0.5)
    assert answer["object"] == "chat.completion"

    # Models: list them, switch the default (the backend restarts on it), and pull offline.
    (checkout / "models" / "second.gguf").symlink_to(next((checkout / "models").glob("Smol*.gguf")))
    listed = _run(checkout, env, "bin/console.sh", "models")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^\* SmolLM2\S*\s+\d", listed.stdout, flags=re.MULTILINE), listed.stdout
    assert re.search(r"^  second\s", listed.stdout, flags=re.MULTILINE), listed.stdout
    switched = _run(checkout, env, "bin/console.sh", "use-model", "second")
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert "backend: healthy" in switched.stdout
    health = urllib.request.urlopen(f"http://127.0.0.1:{env['LLAMA_SERVER_PORT']}/health")
    assert json.load(health)["default"] == "second"
    assert "LLAMA_MODEL=second" in config.read_text()
    unknown = _run(checkout, env, "bin/console.sh", "use-model", "nonesuch")
    assert unknown.returncode != 0
    assert "no models/nonesuch.gguf" in unknown.stderr
    offline = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    pulled = _run(checkout, offline, "bin/console.sh", "pull", "some/repo", "model.gguf")
    assert pulled.returncode != 0
    assert "is not reachable" in pulled.stderr

    stopped = _run(checkout, env, "bin/console.sh", "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    after = _run(checkout, env, "bin/console.sh", "status")
    assert after.returncode != 0
    assert "backend: stopped" in after.stdout
    assert "proxy: stopped" in after.stdout
    assert "db: stopped" in after.stdout
    for port in (proxy_port, env["LLAMA_SERVER_PORT"], env["LLAMA_GATE_LOCAL_PG_PORT"]):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", int(port))) != 0, f"port {port} still open"


def test_without_the_proxy_the_backend_serves_alone_on_its_key(
    clone: tuple[Path, dict[str, str]],
) -> None:
    checkout, env = clone
    alone = {**env, "LLAMA_PROXY_ENABLED": "0"}
    started = _run(checkout, alone, "bin/console.sh", "start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "LLAMA_PROXY_ENABLED=0" in started.stdout
        assert not (checkout / "runtime" / "run" / "proxy.pid").exists()
        key = next(
            line.split("=", 1)[1]
            for line in (checkout / "runtime" / "config.env").read_text().splitlines()
            if line.startswith("LLAMA_SERVER_API_KEY=")
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{env['LLAMA_SERVER_PORT']}/v1/models",
            headers={"Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - ours
            assert response.status == 200
    finally:
        _run(checkout, alone, "bin/console.sh", "stop")


def _processes_of(checkout: Path, marker: str) -> list[int]:
    """Our parts' processes: run in this clone (the backend moves to runtime/cache), with `marker`
    in their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        here = cwd == str(checkout) or cwd.startswith(f"{checkout}/")
        if marker in cmdline and here and _running(int(entry.name)):
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Running, and no zombie: nobody may reap an orphaned part here at once (as console.sh)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s*Z", status, flags=re.MULTILINE)


def _closed(port: str) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", int(port))) != 0


def test_restart_refuses_no_connection(clone: tuple[Path, dict[str, str]]) -> None:
    checkout, env = clone
    # With the dashboard's and the metrics' listeners on: the new proxy binds them while the old
    # one still serves.
    env = {
        **env,
        "LLAMA_PROXY_METRICS_PORT": str(free_port()),
        "LLAMA_PROXY_DASHBOARD_PORT": str(free_port()),
    }
    started = _run(checkout, env, "bin/console.sh", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "BuildBackendWarning" not in started.stdout + started.stderr  # no setuptools banners
    assert "deprecated" not in started.stdout + started.stderr
    run = checkout / "runtime" / "run"
    old_proxy = int((run / "proxy.pid").read_text().split()[0])
    # The new proxy gets the database as a keyword DSN with the local password in it.
    config = (checkout / "runtime" / "config.env").read_text()
    password = re.findall(r"^POSTGRES_AUTH_PASSWORD=(.+)$", config, flags=re.MULTILINE)[0]
    keyword = (
        f"host=127.0.0.1 port={env['LLAMA_GATE_LOCAL_PG_PORT']} user=postgres "
        f"password={password} dbname=llama_gate"
    )
    with Hammer(int(env["LLAMA_PROXY_PORT"])) as hammer:
        time.sleep(1)
        restarted = _run(
            checkout, {**env, "POSTGRES_AUTH_DSN": keyword}, "bin/console.sh", "restart"
        )
        time.sleep(1)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "proxy: restarted" in restarted.stdout
    assert "without refusing a connection" in restarted.stdout
    assert "backend: healthy" in restarted.stdout
    print(f"during the restart: {hammer.answered} answered {dict(hammer.statuses)}, "
          f"{len(hammer.failures)} refused or cut")  # fmt: skip
    assert hammer.failures == [], hammer.failures
    assert hammer.answered >= 120, hammer.statuses
    assert set(hammer.statuses) == {200, 401}, hammer.statuses
    new_proxy = int((run / "proxy.pid").read_text().split()[0])
    assert new_proxy != old_proxy
    assert not _running(old_proxy)
    assert _processes_of(checkout, "llama-gate serve") == [new_proxy]
    # Nothing the stack printed or logged holds the database password.
    logs = [path.read_text() for path in (checkout / "runtime" / "logs").glob("*.log")]
    for text in (started.stdout, started.stderr, restarted.stdout, restarted.stderr, *logs):
        assert password not in text
    assert "keys in postgresql://postgres:***@127.0.0.1:" in "".join(logs)

    # README's psql line, as printed there, reaches the local database with its password.
    readme = (REPO / "README.md").read_text()
    line = next(text for text in readme.splitlines() if text.startswith("PGPASSWORD="))
    line = line.replace("-p 55432", f"-p {env['LLAMA_GATE_LOCAL_PG_PORT']}")
    psql = subprocess.run(
        ["bash", "-c", f"{line} -Atc 'SELECT count(*) FROM users'"], cwd=checkout, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert psql.returncode == 0, psql.stderr
    assert psql.stdout.strip().isdigit()


def test_stop_works_when_the_settings_no_longer_load(clone: tuple[Path, dict[str, str]]) -> None:
    checkout, env = clone
    started = _run(checkout, env, "bin/console.sh", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    config = checkout / "runtime" / "config.env"
    kept = config.read_text()
    config.write_text(kept + "LLAMA_PROXY_RATE_LIMIT=lots\n")
    try:
        assert _run(checkout, env, "bin/console.sh", "status").returncode != 0
        stopped = _run(checkout, env, "bin/console.sh", "stop")
    finally:
        config.write_text(kept)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "settings do not load (LLAMA_PROXY_RATE_LIMIT='lots'" in stopped.stderr
    assert "proxy: stopping" in stopped.stdout
    assert "backend: stopping" in stopped.stdout
    assert "db: stopping" in stopped.stdout
    for port in (
        env["LLAMA_PROXY_PORT"],
        env["LLAMA_SERVER_PORT"],
        env["LLAMA_GATE_LOCAL_PG_PORT"],
    ):
        assert _closed(port), f"port {port} still open"


def test_two_concurrent_starts_launch_one_stack(clone: tuple[Path, dict[str, str]]) -> None:
    checkout, env = clone
    assert not _processes_of(checkout, "backend serve")
    starts = [
        subprocess.Popen(
            ["bin/console.sh", "start"],
            cwd=checkout,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [start.communicate(timeout=900)[0] for start in starts]
    try:
        assert [start.returncode for start in starts] == [0, 0], outputs
        assert any("waiting for another bin/console.sh" in output for output in outputs), outputs
        assert sum("proxy: already running" in output for output in outputs) == 1, outputs
        assert len(_processes_of(checkout, "-m backend serve")) == 1
        assert len(_processes_of(checkout, "llama-gate serve")) == 1
    finally:
        stopped = _run(checkout, env, "bin/console.sh", "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_a_pid_file_naming_another_program_is_never_signalled(
    clone: tuple[Path, dict[str, str]],
) -> None:
    checkout, env = clone
    run = checkout / "runtime" / "run"
    run.mkdir(parents=True, exist_ok=True)
    # Programs that now hold the pids our stopped parts once had (the system reuses pids).
    strangers = [
        subprocess.Popen(["sleep", "300"], cwd=checkout),
        subprocess.Popen(["sleep", "300"], cwd=checkout),
    ]
    try:
        start_time = Path(f"/proc/{strangers[0].pid}/stat").read_text().rsplit(") ", 1)[1]
        wrong_start = int(start_time.split()[19]) - 100
        (run / "proxy.pid").write_text(f"{strangers[0].pid} {wrong_start}\n")
        (run / "backend.pid").write_text(f"{strangers[1].pid}\n")  # written before start times
        status = _run(checkout, env, "bin/console.sh", "status")
        assert "proxy: CRASHED" in status.stdout
        assert "now belongs to another program" in status.stdout
        stopped = _run(checkout, env, "bin/console.sh", "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "is no longer ours but another program's; leaving it alone" in stopped.stdout
        time.sleep(0.5)
        assert [stranger.poll() for stranger in strangers] == [None, None]
        assert not (run / "proxy.pid").exists()
        assert not (run / "backend.pid").exists()
    finally:
        for stranger in strangers:
            stranger.kill()
            stranger.wait()
