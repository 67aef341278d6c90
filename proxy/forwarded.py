"""The client's address behind a reverse proxy: `X-Forwarded-For`, believed only from trusted peers.

Behind nginx or a load balancer every connection comes from the proxy's address, so the failure
limiter would count every client as one, audit rows would name the proxy, and `/ready` would
tell its details to anyone the proxy forwards. With LLAMA_PROXY_TRUSTED_PROXIES set, a request
whose peer is one of those addresses takes its client address from `X-Forwarded-For`, read by
aiohttp-remotes from the right: the first address that is not a trusted proxy is the client
(what is left of it may be whatever the client wrote). From any other peer the header is the
client's own claim, and ignored. Everything after this middleware sees `request.remote` as the
client's address.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import NoReturn

from aiohttp import hdrs, web
from aiohttp_remotes import XForwardedFiltered
from multidict import MultiMapping

from proxy.errors import INVALID_REQUEST, error_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TrustedProxies(XForwardedFiltered):
    def __init__(self, trusted: Sequence[str]) -> None:
        networks = [ip_network(item, strict=False) for item in trusted]
        super().__init__(networks)
        self._networks = networks

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self._trusts(request.remote):
            return await handler(request)
        return await super().middleware(request, handler)

    def _trusts(self, peer: str | None) -> bool:
        try:
            address = ip_address(peer or "")
        except ValueError:
            return False  # no IP peer (a Unix socket)
        return any(address in network for network in self._networks)

    def get_forwarded_for(self, headers: MultiMapping[str]) -> list[IPv4Address | IPv6Address]:
        """The header's addresses from the right, up to the first that is none: left of it is
        the client's own writing, which the trusted proxy passed on and nobody vouches for."""
        values: list[str] = headers.getall(hdrs.X_FORWARDED_FOR, [])
        if len(values) != 1:
            return super().get_forwarded_for(headers)  # none, or several: the library decides
        addresses: list[IPv4Address | IPv6Address] = []
        for item in reversed(values[0].split(",")):
            try:
                addresses.append(ip_address(item.strip()))
            except ValueError:
                break
        return addresses[::-1]

    async def raise_error(self, request: web.Request) -> NoReturn:
        """A trusted proxy sent an X-Forwarded-* header twice (aiohttp-remotes logs which)."""
        body = error_body(
            "The reverse proxy in front of llama-gate sent an X-Forwarded-For, -Proto or -Host "
            "header more than once; configure it to send each once.",
            INVALID_REQUEST,
            "invalid_forwarded_header",
        )
        raise web.HTTPBadRequest(text=json.dumps(body), content_type="application/json")
