"""The floor: the least a proxy with llama-gate's duties does per request, on llama-gate's stack.

An aiohttp server on uvloop and one aiohttp client session, as llama-gate has, doing what no
design of llama-gate can skip: the key checked (in memory, as llama-gate's cache does), the body
parsed and serialized again (msgspec), the backend asked for a stream, its events parsed (orjson)
and assembled into the one JSON answer a client asked for, and one journal line written. No
rate limits, quotas, queue, metrics or Postgres: what is left between this and llama-gate is
what its pipeline costs beyond its duties. `bench/overhead.py --floor-only` runs it.

    python bench/floor.py PORT BACKEND_URL JOURNAL_FILE
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import orjson
import uvloop
from aiohttp import web

KEY = "Bearer floor-key"
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
JOURNAL = web.AppKey("journal", int)


async def chat(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Authorization") != KEY:
        return web.json_response({"error": {"message": "invalid key"}}, status=401)
    body = msgspec.json.decode(await request.read())
    streamed = bool(body.get("stream"))
    body["stream"], body["stream_options"] = True, {"include_usage": True}
    async with request.app[SESSION].post(
        request.app[UPSTREAM] + "/v1/chat/completions",
        data=msgspec.json.encode(body),
        headers={"Content-Type": "application/json"},
    ) as answer:
        if streamed:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            while piece := await answer.content.readany():
                await response.write(piece)
            await response.write_eof()
        else:
            response = web.Response(
                body=orjson.dumps(await _assembled(answer)), content_type="application/json"
            )
    line = [time.time(), request.path, response.status]
    os.write(request.app[JOURNAL], orjson.dumps(line) + b"\n")
    return response


async def _assembled(answer: aiohttp.ClientResponse) -> dict[str, object]:
    held, text, usage, finish = b"", [], None, None
    while piece := await answer.content.readany():
        *events, held = (held + piece).split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: ") or event[6:] == b"[DONE]":
                continue
            payload = orjson.loads(event[6:])
            usage = payload.get("usage") or usage
            for choice in payload.get("choices") or ():
                text.append((choice.get("delta") or {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
    message = {"role": "assistant", "content": "".join(text)}
    choice = {"index": 0, "message": message, "finish_reason": finish}
    return {"object": "chat.completion", "choices": [choice], "usage": usage}


async def session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        app[SESSION] = client
        yield


def main() -> None:
    port, upstream, journal = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    app = web.Application()
    app[UPSTREAM] = upstream
    app[JOURNAL] = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None,
        loop=uvloop.new_event_loop(),
    )  # fmt: skip


if __name__ == "__main__":
    main()
