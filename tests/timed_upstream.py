"""A fake model server with a fixed service time, for the scheduler's tests and benchmark.

Like llama_cpp.server it answers one request at a time per slot, each after `service_time`
seconds; unlike it, it also notes who was served when (from the OpenAI `user` field of the body)
and how many requests it ever held at once, so tests can see the order the proxy let them in.
`/health` answers at once with the models it serves, as llama-gate's backend does.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.db.localpg import free_port
from tests.listening import Listening

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


@dataclass(frozen=True)
class Served:
    user: str | None
    model: str | None
    started: float  # time.monotonic()
    ended: float
    body: dict[str, Any]


@dataclass
class TimedUpstream:
    service_time: float = 0.1
    models: tuple[str, ...] = ("m",)
    gate: asyncio.Event | None = None  # when given, every request waits for it first
    port: int = field(default_factory=free_port)
    received: list[str | None] = field(default_factory=list)  # the `user` of each arrival
    served: list[Served] = field(default_factory=list)
    active: int = 0
    most_active: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set by each request
    _listening: Listening | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def users(self) -> list[str | None]:
        """Who was served, in the order their service began."""
        return [s.user for s in sorted(self.served, key=lambda s: s.started)]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/v1/{tail:.+}", self._serve)
        self._listening = await Listening.start(app, self.port)

    async def stop(self) -> None:
        if self._listening is not None:
            await self._listening.stop()
            self._listening = None

    async def _health(self, request: web.Request) -> web.Response:
        models = list(self.models)
        return web.json_response({"status": "ok", "models": models, "default": models[0]})

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body: Any = json.loads(raw) if raw else {}
        body = body if isinstance(body, dict) else {}
        self.received.append(body.get("user"))
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.arrived.set()
        started = time.monotonic()
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.service_time)
        finally:
            self.active -= 1
        user, model = body.get("user"), body.get("model")
        self.served.append(Served(user, model, started, time.monotonic(), body))
        if body.get("stream") is True:  # as llama-gate asks: one chunk, usage, [DONE]
            chunk = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                     "model": model or self.models[0],
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"},
                                  "finish_reason": "stop"}]}  # fmt: skip
            events = [chunk, {"choices": [], "usage": USAGE}]
            text = "".join(f"data: {json.dumps(event)}\n\n" for event in events)
            return web.Response(text=text + "data: [DONE]\n\n", content_type="text/event-stream")
        message = {"role": "assistant", "content": "ok"}
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model or self.models[0],
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                "usage": USAGE,
            }
        )
