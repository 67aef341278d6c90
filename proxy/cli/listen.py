"""The proxy's listening sockets: bound afresh, or taken over from the proxy it replaces.

`bin/console.sh restart` starts the new proxy while the old one still serves, then stops the old
one. A second socket on the same port (SO_REUSEPORT) is not enough: when a listening socket
closes, the kernel resets the connections still waiting in its own accept queue, so the old
proxy's exit would drop a few. Instead the old proxy hands its very sockets to the new one over a
Unix socket (SCM_RIGHTS, the way HAProxy and Envoy hand over): both accept from one queue, the old
one stops accepting, and the queue never closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from pathlib import Path

log = logging.getLogger(__name__)

BACKLOG = 128  # aiohttp's default
HANDOVER_TIMEOUT_SECONDS = 5.0
_GREETING = b"llama-gate listening sockets"
_MAX_SOCKETS = 16


def _addresses(host: str, port: int) -> list[tuple[int, tuple[str, int]]]:
    """Where `host:port` listens: one address per family, as asyncio's create_server binds."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: dict[tuple[int, tuple[str, int]], None] = {}
    for family, _type, _proto, _name, address in infos:
        seen[(family, (str(address[0]), int(address[1])))] = None
    return list(seen)


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for `host:port`; an OSError (port taken, no such address) binds none."""
    sockets: list[socket.socket] = []
    try:
        for family, address in _addresses(host, port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # each family gets its own socket, as in asyncio
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def take_over(path: Path, host: str, port: int) -> list[socket.socket] | None:
    """The listening sockets of the proxy serving handovers at `path`, if they are `host:port`.

    None when no proxy answers there (none runs, or an old one without handovers) or when it
    listens elsewhere (the port setting changed): then the caller binds its own.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(HANDOVER_TIMEOUT_SECONDS)
            conn.connect(str(path))
            greeting, fds, _flags, _address = socket.recv_fds(conn, 64, _MAX_SOCKETS)
    except (FileNotFoundError, ConnectionRefusedError):
        return None  # nothing serves there: no predecessor, or one that is gone
    except OSError as exc:
        log.warning("could not take the listening sockets over from %s: %s", path, exc)
        return None
    sockets = [socket.socket(fileno=fd) for fd in fds]
    try:
        wanted = {address for _family, address in _addresses(host, port)}
    except OSError:  # no such host: binding says so, in its own words
        wanted = set()
    got = {tuple(sock.getsockname()[:2]) for sock in sockets}
    if greeting != _GREETING or not sockets or got != wanted:
        for sock in sockets:
            sock.close()
        return None
    for sock in sockets:
        sock.setblocking(False)
    return sockets


def _peer_uid(conn: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", credentials)[1])


class Handover:
    """Serves `sockets` at `path` to a successor, which takes `path` over in turn."""

    def __init__(self, path: Path, sockets: list[socket.socket]) -> None:
        self._path = path
        self._sockets = sockets
        self._server: socket.socket | None = None
        self._inode = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Offer the sockets at `path` (in the running event loop)."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staging = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        try:
            server.bind(str(staging))
            staging.chmod(0o600)
            server.listen()
            # One atomic step: whoever connects to `path` now reaches this process.
            staging.replace(self._path)
        except OSError as exc:
            server.close()
            log.warning(
                "no handover socket at %s (%s): a restart will refuse connections", self._path, exc
            )
            return
        server.setblocking(False)
        self._server = server
        self._inode = self._path.stat().st_ino
        self._task = asyncio.create_task(self._serve(server), name="listener-handover")

    async def _serve(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(server)
            with conn:
                uid = _peer_uid(conn)
                if uid is not None and uid != os.getuid():
                    log.warning("refused to hand the listening sockets to user id %d", uid)
                    continue
                conn.setblocking(True)
                conn.settimeout(HANDOVER_TIMEOUT_SECONDS)
                try:
                    socket.send_fds(conn, [_GREETING], [s.fileno() for s in self._sockets])
                except OSError as exc:
                    log.warning("handing the listening sockets over failed: %s", exc)
                    continue
                log.info("handed the listening sockets to a successor")

    async def close(self) -> None:
        """Stop offering the sockets (safe to call twice)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server, self._server = self._server, None
        if server is not None:
            server.close()
            # A successor has put its own socket there: leave that one be.
            with contextlib.suppress(FileNotFoundError):
                if self._path.stat().st_ino == self._inode:
                    self._path.unlink()
