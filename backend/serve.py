"""Run the backend: a supervisor that holds the port and keeps one model server process alive.

`serve` checks the settings, writes the config and takes the port (so a bad setting or a taken
port fails at once, with one line), then runs the model server as a child process (`worker`)
that inherits the listening socket. Whatever kills the child (a crash in llama.cpp, the out of
memory killer, SIGKILL) costs seconds, not the service: the supervisor logs it and starts another
after a back-off (0.5 s, doubling to 30 s while it keeps dying within a minute of starting). The
socket stays open and listening all along, so the proxy's connections wait in its queue while the
model loads again instead of being refused. A child that fails before it ever served (a model
that cannot load) ends `serve` with its error, as before: that is for the operator to fix.

SIGTERM or SIGINT stops the child (uvicorn lets streams finish for `GRACEFUL_SHUTDOWN_SECONDS`),
then the supervisor. The child dies with the supervisor too (PR_SET_PDEATHSIG), so a supervisor
killed outright leaves no model server behind holding the port.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from backend.app import create_backend_app
from backend.cache_plan import CachePlan
from backend.config import BackendPlan, check_api_key, config_path, load_config, write_config
from backend.errors import BackendError
from proxy.settings import Settings

logger = logging.getLogger(__name__)

# Long enough for a stream's last tokens, short enough for `docker stop`'s 10 s before SIGKILL.
GRACEFUL_SHUTDOWN_SECONDS = 5
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
STEADY_SECONDS = 60.0  # a child that ran this long resets the back-off
BACKLOG = 2048  # connections that may wait while a new child loads the model
# How the worker finds what the supervisor hands it.
SOCKET_FD_VARIABLE = "LLAMA_GATE_BACKEND_SOCKET_FD"
READY_FD_VARIABLE = "LLAMA_GATE_BACKEND_READY_FD"
CACHE_VARIABLE = "LLAMA_GATE_BACKEND_CACHE"  # the prompt cache, planned once by the supervisor
_PR_SET_PDEATHSIG = 1


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not listening yet), or `BackendError` saying why not.

    Binding before the model loads makes a taken port fail at once and leaves no window in which
    another process could take it between a check and the real bind.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise BackendError(f"LLAMA_SERVER_HOST={host} cannot be resolved: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restart right after a stop must not wait out TIME_WAIT. An address that
    # something still listens on stays refused.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BackendError(
                f"port {port} on {host} is already in use (is a backend already running?); stop "
                f"that process or set another LLAMA_SERVER_PORT"
            ) from None
        raise BackendError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def serve(settings: Settings, plan: BackendPlan) -> None:
    """Write the config, bind, and keep a model server running until SIGINT/SIGTERM."""
    check_api_key(settings)
    path = write_config(settings, plan.config)
    load_config(path, settings.server_api_key.reveal())  # a bad file fails here, once
    sock = bind(settings.server_host, settings.server_port)
    try:
        sock.listen(BACKLOG)
        if os.environ.pop("CONFIG_FILE", None) is not None:
            # llama_cpp.server's create_app would load that file instead of these settings.
            logger.warning("ignoring CONFIG_FILE: the backend runs %s", path)
        env = {
            **os.environ,
            "LLAMA_SERVER_API_KEY": settings.server_api_key.reveal(),
            "LLAMA_GATE_HOME": str(settings.home),
            CACHE_VARIABLE: _cache_json(plan.cache),
        }
        logger.info("%s", plan.cache.describe())
        command = [sys.executable, "-m", "backend", "worker"]
        Supervisor(sock, command, env, plan.default.alias).run()
    finally:
        sock.close()


class Supervisor:
    """Starts the worker and starts it again whenever it dies, until told to stop."""

    def __init__(
        self,
        sock: socket.socket,
        command: list[str],
        env: dict[str, str],
        model: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sock = sock
        self._command = command
        self._env = env
        self._model = model
        self._clock = clock
        self._stopping = False
        self._child: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def run(self) -> None:
        """Until SIGTERM/SIGINT; `BackendError` when the first worker fails before serving."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        served_once = False
        while not self._stopping:
            started = self._clock()
            ready, status = self._run_child()
            if self._stopping:
                return
            if not ready and not served_once:
                raise WorkerFailed(status)
            served_once = served_once or ready
            if self._clock() - started >= STEADY_SECONDS:
                backoff = FIRST_BACKOFF_SECONDS
            self.restarts += 1
            logger.warning(
                "the model server (%s) died: %s; starting it again in %.1f s (restart %d)",
                self._model,
                _describe(status),
                backoff,
                self.restarts,
            )
            self._sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _run_child(self) -> tuple[bool, int]:
        """Run one worker to its end: whether it became ready, and its exit status."""
        read_end, write_end = os.pipe()
        env = {
            **self._env,
            SOCKET_FD_VARIABLE: str(self._sock.fileno()),
            READY_FD_VARIABLE: str(write_end),
        }
        try:
            self._child = subprocess.Popen(
                self._command,
                env=env,
                pass_fds=(self._sock.fileno(), write_end),
                preexec_fn=_die_with_parent,  # one thread here, so preexec_fn is safe
            )
        finally:
            os.close(write_end)
        ready, listening = False, True
        try:
            while True:
                status = self._child.poll()
                if status is not None:
                    return ready, status
                if self._stopping:
                    self._terminate()
                    continue
                # The pipe, until the child says it is serving (or closes it); then only the
                # child's end is waited for (a closed pipe is always readable: no busy loop).
                readable, _, _ = select.select([read_end] if listening else [], [], [], 0.2)
                if readable:
                    said = os.read(read_end, 16)
                    listening = bool(said) and not ready
                    if said and not ready:
                        ready = True
                        logger.info("the model server (pid %d) is serving", self._child.pid)
        finally:
            os.close(read_end)

    def _terminate(self) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(timeout=GRACEFUL_SHUTDOWN_SECONDS + 5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def _sleep(self, seconds: float) -> None:
        deadline = self._clock() + seconds
        while not self._stopping and self._clock() < deadline:
            time.sleep(0.05)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True


class WorkerFailed(Exception):
    """The first model server process ended before it could serve; it said why."""

    def __init__(self, status: int) -> None:
        super().__init__(_describe(status))
        self.status = status


def _describe(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM if the supervisor dies (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_worker(settings: Settings) -> None:
    """The model server itself, on the socket and config its supervisor hands it."""
    fd = int(os.environ[SOCKET_FD_VARIABLE])
    ready_fd = int(os.environ.get(READY_FD_VARIABLE, "-1"))
    sock = socket.socket(fileno=fd)
    server_settings, model_settings = load_config(
        config_path(settings), settings.server_api_key.reveal()
    )
    default = model_settings[0]
    logger.info("loading model %s from %s", default.model_alias, default.model)
    try:
        app = create_backend_app(server_settings, model_settings, _cache_plan())
    except (ValueError, OSError) as exc:
        raise BackendError(f"cannot load model {default.model_alias}: {exc}") from None
    logger.info(
        "serving %d model(s) on %s:%d (default %s)",
        len(model_settings),
        settings.server_host,
        settings.server_port,
        default.model_alias,
    )
    config = uvicorn.Config(
        app, log_level="info", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS
    )
    server = uvicorn.Server(config)
    if ready_fd >= 0:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    server.run(sockets=[sock])


def _cache_json(plan: CachePlan) -> str:
    directory = str(plan.directory) if plan.directory is not None else None
    return json.dumps([plan.mode, plan.capacity_bytes, directory, plan.derived])


def _cache_plan() -> CachePlan:
    raw = os.environ.get(CACHE_VARIABLE)
    if raw is None:
        return CachePlan("off", 0)
    mode, capacity, directory, derived = json.loads(raw)
    return CachePlan(mode, capacity, Path(directory) if directory else None, derived)
