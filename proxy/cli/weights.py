"""Admin commands for model weights: what a token of a model counts for against budgets."""

from __future__ import annotations

from typing import Any

import click

from proxy.cli.support import print_json, print_table, run_db
from proxy.db import limits

WEIGHT_MAX = 1_000_000.0


class _Weight(click.ParamType[float | None]):
    name = "W|default"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float | None:
        text = str(value).strip().lower()
        if text in {"default", "none"}:
            return None
        try:
            weight = float(text)
        except ValueError:
            self.fail(f"{value!r} is neither a number above 0 nor 'default'", param, ctx)
        if not 0 < weight <= WEIGHT_MAX:  # NaN fails this too
            self.fail(f"{value!r}: a weight is above 0 and at most {WEIGHT_MAX:g}", param, ctx)
        return weight


@click.command("set-model-weight")
@click.option("--model", required=True, help="The model's name, as requests and rows name it.")
@click.option(
    "--weight",
    required=True,
    type=_Weight(),
    help="What one of its tokens counts for against token quotas and budgets ('default': 1).",
)
def set_model_weight(model: str, weight: float | None) -> None:
    """Make a model's tokens count more (or less) against token quotas and budgets.

    A 70B model may cost 10 per token where a small one costs 1. Rows keep the raw tokens and
    the weight applied (llama_requests.weight); every proxy applies a change at once.

    Example:

        llama-gate set-model-weight --model llama-3-70b --weight 10
    """
    model = model.strip()
    if not model:
        raise click.BadParameter("give the model's name", param_hint="--model")
    run_db(lambda con: limits.set_model_weight(con, model, weight))
    click.echo(f"{model}: each token counts for {weight if weight is not None else 1:g}.")


@click.command("list-model-weights")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_model_weights(as_json: bool) -> None:
    """Models with a weight other than 1.

    Example:

        llama-gate list-model-weights
    """
    weights = run_db(limits.model_weights)
    rows = [{"model": model, "weight": weight} for model, weight in sorted(weights.items())]
    if as_json:
        print_json(rows)
    else:
        print_table(rows, ["model", "weight"])
