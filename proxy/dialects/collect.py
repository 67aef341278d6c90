"""Replies that keep the backend's answer for the endpoint instead of sending it to the client.

The local-server APIs answer with documents of their own made from the backend's (a JSON-RPC
result, a warm-up report, a model choice), so their endpoints read the backend's answer here,
counted into the outcome like any other, and write their own. Nothing is sent from here: the
`web.Response` a reply must return is a placeholder the endpoint drops.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from aiohttp import web

from proxy.dialects.openai_replies import Tokens, assemble, model_list
from proxy.upstream.delivery import Delivery
from proxy.upstream.forward import BackendBrokeOff, backend_chunks


class ChatAnswer:
    """The backend's chat completion, assembled from its stream into `document`."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {}

    async def relay(
        self, response: aiohttp.ClientResponse, delivery: Delivery
    ) -> web.StreamResponse:
        if response.content_type == "text/event-stream":
            self.document = await assemble(response, delivery, "chat")
        else:  # a backend that answered in one piece after all
            self.document = await _whole_json(response, delivery)
            Tokens(delivery.outcome).final(self.document.get("usage"))
        return web.Response()


class ModelList:
    """The entries of the backend's model list, in `entries`."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    async def relay(
        self, response: aiohttp.ClientResponse, delivery: Delivery
    ) -> web.StreamResponse:
        self.entries = await model_list(response, delivery)
        return web.Response()

    @property
    def names(self) -> list[str]:
        return [str(entry.get("id")) for entry in self.entries if entry.get("id")]


async def _whole_json(response: aiohttp.ClientResponse, delivery: Delivery) -> dict[str, Any]:
    raw = b""
    async for chunk in backend_chunks(response):
        delivery.first_byte()
        raw += chunk
        delivery.check_size(len(raw))
    try:
        document = json.loads(raw)
    except ValueError:
        raise BackendBrokeOff("the backend's answer is not JSON") from None
    if not isinstance(document, dict):
        raise BackendBrokeOff("the backend's answer is not a JSON object")
    return document
