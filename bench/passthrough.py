"""The baseline: the barest sensible aiohttp pass-through, with no auth, limits or audit.

One shared ClientSession, the body and the response streamed, nothing else: what any proxy in
Python pays before doing anything useful, so llama-gate's throughput is judged against it.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    async with request.app[SESSION].request(
        request.method,
        f"{upstream}{request.rel_url}",
        data=request.content,
        headers={"Content-Type": request.headers.get("Content-Type", "")},
    ) as answer:
        response = web.StreamResponse(
            status=answer.status, headers={"Content-Type": answer.headers["Content-Type"]}
        )
        await response.prepare(request)
        while chunk := await answer.content.readany():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        app[SESSION] = client
        yield


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    app = web.Application()
    app[UPSTREAM] = upstream
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
