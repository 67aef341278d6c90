"""An aiohttp app served on 127.0.0.1 by a test's fake backend, stopped without leaking a socket.

Python 3.11's asyncio leaks a connection accepted in the same turn of the loop as its server
closes: the new transport cannot attach to the closed server, the error is swallowed, and
nothing closes its socket. The proxy probes its backend every two seconds, so a test that stops
its fake backend now and then met one, reported as an unclosed socket in that test. Here
accepting stops first, whatever was accepted is taken in, and only then does aiohttp close the
server and every connection it has.
"""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web


class Listening:
    def __init__(self, runner: web.AppRunner, sock: socket.socket) -> None:
        self._runner = runner
        self._sock = sock

    @classmethod
    async def start(cls, app: web.Application, port: int) -> Listening:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        sock = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR: a restart takes it again
        await web.SockSite(runner, sock).start()
        return cls(runner, sock)

    async def stop(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())  # no more accepts
        await asyncio.sleep(0.05)  # a few turns: each connection accepted gets its handler
        await self._runner.cleanup()
