"""The proxy's HTTP server: aiohttp's own, with a sturdier edge.

- Malformed HTTP (a bad request line, header or chunk; TLS sent to the plain port) is answered
  with a fixed sentence and logged in one line. aiohttp would log a traceback and answer with its
  parser's message, which quotes the client's bytes back at it.
- A request head must arrive whole within `header_timeout` seconds of the connection opening (or
  of its previous answer): aiohttp's keep-alive timer, which starts with the connection and is
  not reset by bytes dribbling in, cuts off a slow sender at that deadline.

`llama-gate serve` (`proxy.cli.serve`) runs the app on an `EdgeRunner`.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger(__name__)

MALFORMED = "Bad Request: this is not a well-formed HTTP/1.1 request.\n"


class _EdgeHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        log.warning("malformed HTTP from %s: %s (answered 400)", request.remote, type(exc).__name__)
        response = web.Response(status=400, text=MALFORMED)
        response.force_close()
        return response


class _EdgeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _EdgeHandler(self, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """An AppRunner whose connections get `_EdgeHandler`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server (and starts the app) in there; only the handler class it
        # makes per connection differs, and _EdgeServer adds no state of its own.
        server.__class__ = _EdgeServer
        return server
