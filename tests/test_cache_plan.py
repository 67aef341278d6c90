"""`backend.cache_plan`: the prompt cache a setting asks for, and the budget's rule."""

from __future__ import annotations

import shutil
from pathlib import Path

from backend.cache_plan import MIN_BUDGET_BYTES, default_budget, memory_bytes, plan_cache

GIB = 1 << 30


def test_off_is_no_cache() -> None:
    plan = plan_cache("off", None, GIB, Path("/nowhere"))
    assert (plan.on, plan.capacity_bytes, plan.directory) == (False, 0, None)
    assert plan.describe() == "prompt cache off"


def test_auto_in_ram_is_a_quarter_of_the_memory_beside_the_model(tmp_path: Path) -> None:
    model = 2 * GIB
    plan = plan_cache("ram", None, model, tmp_path)
    assert plan.capacity_bytes == max(MIN_BUDGET_BYTES, (memory_bytes() - model) // 4)
    assert (plan.directory, plan.derived) == (None, True)
    assert "in RAM" in plan.describe()
    assert "derived from this machine" in plan.describe()
    # A model as large as the machine's memory still leaves the smallest useful budget.
    assert default_budget("ram", memory_bytes(), tmp_path) == MIN_BUDGET_BYTES


def test_auto_on_disk_is_a_quarter_of_the_free_space_where_the_states_go(tmp_path: Path) -> None:
    directory = tmp_path / "runtime" / "cache" / "prompt-states"  # not there yet
    plan = plan_cache("disk", None, GIB, directory)
    free = shutil.disk_usage(tmp_path).free
    assert abs(plan.capacity_bytes - max(MIN_BUDGET_BYTES, free // 4)) < 64 << 20
    assert plan.directory == directory
    assert str(directory) in plan.describe()


def test_a_budget_that_is_set_is_taken_as_it_is(tmp_path: Path) -> None:
    plan = plan_cache("ram", 3 << 20, GIB, tmp_path)
    assert (plan.capacity_bytes, plan.derived) == (3 << 20, False)
    assert "budget 3 MiB (LLAMA_PROMPT_CACHE_BYTES)" in plan.describe()
