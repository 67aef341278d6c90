"""The benchmark's fake backend: answers at once, or streams 50 SSE events 20 ms apart.

Each event carries the monotonic time (ns) it was sent at, so the client can tell how much the
path in between stretched the spacing. CLOCK_MONOTONIC is one clock for every process here.

A request for the slow stream says so in its message (`SLOW`). llama-gate asks every backend for a
stream, also for a client that wants one JSON answer: such a stream is answered at once, in one
quick event, as a fast backend would.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiohttp import web

EVENTS = 50
SPACING_SECONDS = 0.020
SLOW = "stream slowly"
# Larger bodies are not parsed: this fake must not take the cores the proxy is measured on.
LARGE = 1 << 20
ANSWER = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()


QUICK_STREAM = (
    b'data: {"id": "cmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, '
    b'"model": "bench", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, '
    b'"finish_reason": "stop"}]}\n\n'
    b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}\n\n'
    b"data: [DONE]\n\n"
)


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    if len(raw) > LARGE:  # a flood's body: answered at once, unread, as a fast backend would
        return web.Response(body=QUICK_STREAM, content_type="text/event-stream")
    payload = json.loads(raw)
    if not payload.get("stream"):
        return web.Response(body=ANSWER, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if payload["messages"][-1]["content"] != SLOW:
        await response.write(QUICK_STREAM)
        await response.write_eof()
        return response
    for index in range(EVENTS):
        if index:
            await asyncio.sleep(SPACING_SECONDS)
        event = {"i": index, "t": time.monotonic_ns(), "choices": [{"delta": {"content": "x"}}]}
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": EVENTS}}
    await response.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
    await response.write_eof()
    return response


def main() -> None:
    app = web.Application(client_max_size=16 << 20)  # the 8 MiB bodies of a flood too
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
