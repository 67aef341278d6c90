"""What this deployment offers the local-server APIs: its models and its declared tools.

The models are those the backends' health probes name (no backend is asked, so nothing waits
for the model lock); a plain llama_cpp.server names none, and then its own model list is asked
for, through a fair turn like any request.
"""

from __future__ import annotations

from aiohttp import web

from proxy.appkeys import BACKENDS, DECLARED_TOOLS, SETTINGS
from proxy.dialects.collect import ModelList
from proxy.errors import ModelNotFound
from proxy.pipeline.endpoint import Context
from proxy.tools import Tool
from proxy.upstream.forward import UpstreamCall

GGUF = ".gguf"


def declared_tools(app: web.Application) -> tuple[Tool, ...]:
    return app[DECLARED_TOOLS]


def iteration_cap(app: web.Application) -> int:
    return app[SETTINGS].max_tool_iterations


def known_models(app: web.Application) -> list[str] | None:
    """The models the backends say they serve; None when one does not say."""
    return app[BACKENDS].models()


def server_default(app: web.Application) -> str | None:
    return app[BACKENDS].default_model()


def check_model(app: web.Application, model: str | None) -> None:
    """`ModelNotFound` (listing the models) when the backends say they do not serve `model`."""
    known = known_models(app)
    if model is not None and known is not None and model not in known:
        raise ModelNotFound(model, ", ".join(known) or "none", known)


async def model_names(context: Context) -> list[str]:
    """Every model there is that the caller's key may use: as the probes say, or else as the
    backend's list says (a key limited to some models never learns the others' names)."""
    known = known_models(context.delivery.request.app)
    if known is None:
        listing = ModelList()
        await context.send(UpstreamCall("GET", "/v1/models"), listing)
        known = listing.names
    return [name for name in known if context.caller.may_use(name)]


def match_model(name: str, names: list[str]) -> str | None:
    """The model `name` means, with or without `.gguf`, in any case when that is unambiguous."""
    stem = name[: -len(GGUF)] if name.lower().endswith(GGUF) else name
    if stem in names:
        return stem
    folded = [known for known in names if known.lower() == stem.lower()]
    return folded[0] if len(folded) == 1 else None
