"""Replies that keep the backend's answer for the endpoint instead of sending it to the client.

The local-server APIs answer with documents of their own made from the backend's (a JSON-RPC
result, a warm-up report, a model choice), so their endpoints read the backend's answer here,
from the same event stream every API reads, and write their own. Nothing is sent from here: the
`web.Response` a reply must return is a placeholder the endpoint drops.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.dialects.openai_replies import collect, model_list
from proxy.pipeline.delivery import Delivery
from proxy.upstream.events import BackendAnswer, BackendBrokeOff


class ChatAnswer:
    """The backend's chat completion, assembled from its stream into `document`."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {}

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        if answer.streamed:
            self.document = (await collect(answer, "chat")).document()
            return web.Response()
        document = await answer.document(counted=True)  # one piece after all
        if not isinstance(document, dict):
            raise BackendBrokeOff("the backend's answer is not a JSON object")
        self.document = document
        return web.Response()


class ModelList:
    """The entries of the backend's model list, in `entries`."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        self.entries = await model_list(answer)
        return web.Response()

    @property
    def names(self) -> list[str]:
        return [str(entry.get("id")) for entry in self.entries if entry.get("id")]
