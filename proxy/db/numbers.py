"""Postgres `numeric` values (sums, rounded percentiles) as the plain numbers JSON shows."""

from __future__ import annotations

from decimal import Decimal


def plain_number(value: Decimal) -> int | float:
    """A whole number stays whole (a sum of requests or tokens reads 52, not 52.0)."""
    return int(value) if value == value.to_integral_value() else float(value)
