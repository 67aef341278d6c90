"""Model weights: what one token of a model counts for against budgets and quotas (default 1;
`llama-gate set-model-weight`). Rows keep raw tokens and the weight applied."""

from __future__ import annotations

import math


def weighted(tokens: int, weight: float | None) -> int:
    """`tokens` as budgets and quotas count them: times the weight, rounded up."""
    return tokens if weight is None or weight == 1.0 else math.ceil(tokens * weight)
