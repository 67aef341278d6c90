"""A key's scope (`create-key --models/--apis`), held in the walk of each request: the API is
checked as the caller is known, the model as the body is checked; either refusal spends nothing.
"""

from __future__ import annotations

from dataclasses import replace

from proxy.auth.cache import Principal
from proxy.errors import KeyOutOfScope
from proxy.pipeline.endpoint import Prepared


def refuse_other_apis(caller: Principal, api: str) -> None:
    """`KeyOutOfScope` when the caller's key is limited to APIs and `api` is not one of them
    ("" is a route every key may use, such as /v1/me)."""
    if api and caller.apis is not None and api not in caller.apis:
        raise KeyOutOfScope(f"the {api} API", sorted(caller.apis))


def model_call(
    served: list[str] | None, caller: Principal, model: str | None, prepared: Prepared
) -> Prepared:
    """A key limited to some models asks the model it may use, and only that one.

    Refused when what would answer cannot be told (no model named and no default known; or a
    backend that does not list its models, since llama_cpp.server answers any unknown name with
    its own model) or is outside the scope. A request that named no model gets the model it was
    checked against written into its body, so no backend answers it with another default.
    """
    scope = caller.models or ()
    if model is None:
        raise KeyOutOfScope("a model it does not name", scope, param="model")
    if not caller.may_use(model):
        raise KeyOutOfScope.model(model, scope)
    if served is None:
        raise KeyOutOfScope(
            f"the model {model!r} here: a backend does not list its models, so which model "
            "answers cannot be checked",
            scope,
            param="model",
        )
    call, ask = prepared.call, prepared.ask
    if call is None or call.json is None or call.json.get("model") == model:
        return prepared
    named = replace(call, json={**call.json, "model": model})
    asked = replace(ask, call=named, model=model) if ask is not None and ask.call is call else ask
    return replace(prepared, call=named, ask=asked)
