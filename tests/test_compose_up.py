"""`docker compose up`, run for real: README's compose commands against a Docker engine.

Where no image registry is reachable, the base images are stand-ins made from Debian's packages
(tests/compose/standins.sh: debootstrap, Debian's python3 and PostgreSQL). The stack runs under its
own project name, env file (the two secrets, the stand-in images, free ports, this machine's CA
bundle for the build) and image tag, so it touches no stack of the user's. The tests run in order:
the first brings the stack up (the first build takes minutes), the last ones restart it, take it
down and up again, and delete its data.

Skipped, saying why, where no Docker engine can be started (runtime/install.sh --dev installs
Debian's docker.io, debootstrap and compose v2 as root; this test starts dockerd if it is not
running, and stops it again).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from tests.cli_helpers import KEY_RE
from tests.docker_helpers import compose_argv, docker_env, running_engine, why_compose_is_missing

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parent.parent
STANDINS = ROOT / "tests" / "compose" / "standins.sh"
PROJECT = "llama-gate-compose-test"
IMAGE = "llama-gate:compose-test"
PYTHON_STANDIN = "llama-gate-standin/python:bookworm"
POSTGRES_STANDIN = "llama-gate-standin/postgres:bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
README = ROOT / "README.md"
FIRST_UP_SECONDS = 1800  # the first build compiles nothing when install.sh's wheel fits, but pulls


def readme_commands() -> dict[str, list[str]]:
    """README's `docker compose` commands (its compose section's code block), by subcommand.

    The test runs exactly these, after `docker compose` its own `-p` and `--env-file`, and with
    `-T` after `exec` and `run` (no terminal here).
    """
    section = README.read_text(encoding="utf-8").split("## Docker compose\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands: dict[str, list[str]] = {}
    pending = ""
    for line in block.splitlines():
        pending += line + "\n"
        try:
            words = shlex.split(pending.replace("\\\n", " "), comments=True)
        except ValueError:  # inside a quoted string that goes on over the next line
            continue
        if pending.rstrip().endswith("\\"):
            continue
        pending = ""
        if words[:2] == ["docker", "compose"]:
            rest = words[2:]
            name = "down -v" if rest[:2] == ["down", "-v"] else rest[0]
            commands.setdefault(name, rest)
    return commands


def _terminal_free(args: list[str]) -> list[str]:
    return [args[0], "-T", *args[1:]] if args[0] in {"exec", "run"} else args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    argv: list[str]
    env: dict[str, str]
    proxy_port: int
    backend_port: int
    ca_marker: bytes
    first_up: str = ""

    def compose(
        self, *args: str, timeout: float = 600, check: bool = True, both: bool = False
    ) -> str:
        done = subprocess.run(
            [*self.argv, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done.stdout + done.stderr if both or not check else done.stdout

    def docker(self, *args: str) -> str:
        return subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, check=True, timeout=60
        ).stdout

    def readme(self, name: str, timeout: float = 600) -> str:
        """Run README's `docker compose <name> ...` command; its output, stderr too for `up`."""
        args = _terminal_free(readme_commands()[name])
        return self.compose(*args, timeout=timeout, both=name == "up")

    def usage(self) -> str:
        return self.readme("exec")

    def requests_of(self, username: str) -> int:
        """alice's requests in README's usage query (0 when she has none)."""
        for line in self.usage().splitlines():
            cells = [cell.strip() for cell in line.split("|")]
            if cells[0] == username:
                return int(cells[1])
        return 0

    def chat(self, key: str) -> str:
        """A real answer; two requests (models.list, then the chat), so two rows."""
        client = OpenAI(base_url=f"http://127.0.0.1:{self.proxy_port}/v1", api_key=key)
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=12,
            temperature=0,
        )
        return answer.choices[0].message.content or ""


def _wait_for_rows(stack: Stack, username: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while (have := stack.requests_of(username)) < count and time.monotonic() < deadline:
        time.sleep(1)
    assert have == count, stack.usage()


def _marked_ca_bundle(folder: Path) -> tuple[Path, bytes]:
    """This machine's CA bundle (this network intercepts TLS: pip in the build needs it) plus a
    certificate made here, whose body must turn up in no layer of the image."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=llama-gate compose test marker", "-keyout", str(folder / "marker.key"),
         "-out", str(folder / "marker.pem")],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    marker = (folder / "marker.pem").read_bytes()
    host = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else b""
    bundle = folder / "ca-bundle.pem"
    bundle.write_bytes(host + b"\n" + marker)
    body = marker.splitlines()[5]  # a line of the certificate itself, 64 base64 characters
    return bundle, body


def _env_file(path: Path, proxy_port: int, backend_port: int, ca_bundle: Path) -> None:
    lines = [
        f"POSTGRES_AUTH_PASSWORD=compose-test-{os.urandom(8).hex()}",
        f"LLAMA_SERVER_API_KEY=compose-test-{os.urandom(8).hex()}",
        f"LLAMA_GATE_IMAGE={IMAGE}",
        f"LLAMA_GATE_PYTHON_IMAGE={PYTHON_STANDIN}",
        f"LLAMA_GATE_POSTGRES_IMAGE={POSTGRES_STANDIN}",
        f"LLAMA_PROXY_PORT={proxy_port}",
        f"LLAMA_SERVER_PORT={backend_port}",
        f"LLAMA_GATE_CA_BUNDLE={ca_bundle}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = docker_env()
    argv = compose_argv(env)
    if argv is None or argv[0] != "docker":
        pytest.skip(why_compose_is_missing())
    with running_engine(env) as missing:
        if missing is not None:
            pytest.skip(missing)
        if shutil.which("debootstrap") is None:
            pytest.skip("debootstrap is missing: runtime/install.sh --dev installs it as root")
        built = subprocess.run(
            [str(STANDINS)], env=env, capture_output=True, text=True, timeout=1200, check=False
        )
        assert built.returncode == 0, built.stdout + built.stderr
        folder = tmp_path_factory.mktemp("compose")
        ca_bundle, marker = _marked_ca_bundle(folder)
        env_file = folder / "env"
        proxy_port, backend_port = _free_port(), _free_port()
        _env_file(env_file, proxy_port, backend_port, ca_bundle)
        clean = {
            k: v
            for k, v in env.items()
            if not k.startswith(("LLAMA_", "POSTGRES_", "COMPOSE_", "N_"))
        }
        stack = Stack(
            [*argv, "-p", PROJECT, "--env-file", str(env_file)],
            clean,
            proxy_port,
            backend_port,
            marker,
        )
        stack.compose("down", "-v", "--remove-orphans", check=False)  # a previous run's leftovers
        try:
            stack.first_up = stack.readme("up", timeout=FIRST_UP_SECONDS)
            yield stack
        finally:
            stack.compose("down", "-v", "--remove-orphans", check=False)
            # The image goes too (BuildKit's cache rebuilds it in seconds); the stand-ins stay.
            subprocess.run(
                ["docker", "image", "rm", IMAGE], env=env, capture_output=True, check=False
            )


@pytest.fixture(scope="module")
def alice_key(stack: Stack) -> str:
    out = stack.readme("run")
    assert "alice" in readme_commands()["run"]
    keys = KEY_RE.findall(out)
    assert keys, out
    return keys[0]


def test_readme_shows_the_commands_this_test_runs() -> None:
    commands = readme_commands()
    assert commands["up"] == ["up", "-d", "--wait"]
    assert commands["run"][:3] == ["run", "--rm", "proxy"]
    assert commands["run"][3:5] == ["llama-gate", "create-user"]
    assert commands["exec"][:3] == ["exec", "postgres", "psql"]
    assert "llama_usage_daily" in commands["exec"][-1]
    assert {"restart", "down", "down -v"} <= set(commands)


def test_migrations_ran_once(stack: Stack) -> None:
    log = stack.compose("logs", "--no-log-prefix", "migrate")
    assert len(re.findall(r"Applied \d+ migration\(s\): 0001, ", log)) == 1, log
    assert "is at the newest schema" in log
    versions = stack.compose(
        "exec", "-T", "postgres", "psql", "-U", "postgres", "-d", "llama_gate", "-tAc",
        "SELECT version_num FROM alembic_version",
    )  # fmt: skip
    newest = max(p.name[:4] for p in (ROOT / "proxy/db/migrations/versions").glob("0*.py"))
    assert versions.split() == [newest]


def test_a_user_made_with_readmes_command_gets_a_real_answer_and_a_row(
    stack: Stack, alice_key: str
) -> None:
    answer = stack.chat(alice_key)
    assert answer.strip(), "SmolLM2 answered nothing"
    _wait_for_rows(stack, "alice", 2)


def test_a_wrong_key_is_refused_at_the_published_port(stack: Stack) -> None:
    status = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
         f"http://127.0.0.1:{stack.proxy_port}/v1/models", "-H", "Authorization: Bearer nope"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    assert status == "401"


def test_only_the_proxy_is_published_on_the_host(stack: Stack) -> None:
    ids = stack.compose("ps", "-q").split()
    published: dict[str, list[str]] = {}
    for inspected in json.loads(stack.docker("inspect", *ids)):
        service = inspected["Config"]["Labels"]["com.docker.compose.service"]
        ports = inspected["NetworkSettings"]["Ports"] or {}
        published[service] = sorted(
            f"{b['HostIp']}:{b['HostPort']}" for bindings in ports.values() for b in bindings or []
        )
    assert {"postgres", "backend", "proxy"} <= set(published)
    assert published["postgres"] == []
    assert published["backend"] == []
    assert all(p.endswith(f":{stack.proxy_port}") for p in published["proxy"]), published
    # The backend runs (healthy, just answered) and still nothing answers at its port on the host.
    with socket.socket() as sock:
        sock.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            sock.connect(("127.0.0.1", stack.backend_port))


def test_the_proxy_runs_as_an_unprivileged_user(stack: Stack) -> None:
    status = stack.compose("exec", "-T", "proxy", "cat", "/proc/1/status")
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.MULTILINE)
    assert uids is not None, status
    assert uids.groups() != ("0", "0")
    assert "0" not in uids.groups()
    assert stack.compose("exec", "-T", "proxy", "id", "-un").strip() == "llama-gate"


def test_the_ca_bundle_given_to_the_build_is_in_no_layer_of_the_image(stack: Stack) -> None:
    control = b"def init_db() -> None:"  # in /app/proxy/cli/main.py: the scan does see files
    seen: set[bytes] = set()
    tail = b""
    with subprocess.Popen(
        ["docker", "save", IMAGE], env=stack.env, stdout=subprocess.PIPE
    ) as saved:
        assert saved.stdout is not None
        while chunk := saved.stdout.read(1 << 20):
            seen.update(n for n in (stack.ca_marker, control) if n in tail + chunk)
            tail = chunk[-64:]
    assert saved.returncode == 0
    assert control in seen
    assert stack.ca_marker not in seen, "the build's CA bundle was written into a layer"


def test_the_build_compiled_no_llama_cpp_python(stack: Stack) -> None:
    # install.sh's wheel (runtime/wheels, or BuildKit's cache of an earlier build) was installed.
    assert "Building llama-cpp-python" not in stack.first_up
    install_step = re.search(
        r"#\d+ \[migrate build [^\]]*\] RUN --mount=type=cache", stack.first_up
    )
    assert install_step is not None, stack.first_up[-3000:]
    step = install_step.group().split()[0]
    done = [line for line in stack.first_up.splitlines() if line.startswith(f"{step} ")]
    assert any(
        "CACHED" in line or "Installing llama-cpp-python[server] from" in line for line in done
    ), done


def test_restart_keeps_users_keys_and_rows(stack: Stack, alice_key: str) -> None:
    stack.readme("restart")
    stack.readme("up")
    assert stack.chat(alice_key).strip()
    _wait_for_rows(stack, "alice", 4)
    # The migration ran again (at the restart, and `up` starts the finished one-shot once more)
    # and found nothing to do.
    log = stack.compose("logs", "--no-log-prefix", "migrate")
    assert len(re.findall(r"Applied \d+ migration\(s\)", log)) == 1, log
    assert log.count("is at the newest schema") >= 2, log


def test_down_and_up_keep_users_keys_and_rows(stack: Stack, alice_key: str) -> None:
    stack.readme("down")
    stack.readme("up")
    log = stack.compose("logs", "--no-log-prefix", "migrate")
    assert "Applied" not in log, log
    assert "is at the newest schema" in log, log
    assert stack.chat(alice_key).strip()
    _wait_for_rows(stack, "alice", 6)


def test_down_v_deletes_the_data(stack: Stack) -> None:
    label = f"label=com.docker.compose.project={PROJECT}"
    assert stack.docker("volume", "ls", "-q", "--filter", label).split()  # pgdata, audit-spill
    stack.readme("down -v")
    assert stack.docker("volume", "ls", "-q", "--filter", label).split() == []
