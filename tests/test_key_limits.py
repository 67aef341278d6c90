"""A key's own request limit and token budgets, beside its user's; model weights in quotas and
budgets; the CLI that sets them."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp

from proxy.appkeys import ADMISSION
from tests.cli_helpers import KEY_RE, failure, invoke, new_key, ok
from tests.fake_upstream import MODEL
from tests.proxy_harness import bearer, eventually, running_proxy
from tests.sharing_helpers import set_limits
from tests.test_groups import _sql

HI = [{"role": "user", "content": "Hi"}]


def _key_id(key: str) -> str:
    return key.split("_")[1]


async def test_a_keys_own_request_limit_and_budget_hold_beside_its_users(
    db_dsn: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        full = await asyncio.to_thread(new_key, cli_env, "alice")  # no limits of its own
        out = await asyncio.to_thread(
            ok, cli_env, "create-key", "--username", "alice", "--rate-limit", "2", "--window", "60"
        )
        limited = KEY_RE.search(out).group(0)  # type: ignore[union-attr]
        assert "Limits of this key: 2 requests per 60 s, no token budget" in out
        budgeted = KEY_RE.search(  # type: ignore[union-attr]
            await asyncio.to_thread(
                ok, cli_env, "create-key", "--username", "alice", "--tokens-per-day", "10"
            )
        ).group(0)
        url = proxy.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as client:

            async def chat(key: str, **extra: Any) -> tuple[int, Any, Any]:
                body = {"messages": HI, "max_tokens": 2, **extra}
                async with client.post(url, json=body, headers=bearer(key)) as r:
                    return r.status, await r.json(), r.headers

            limited_runs = [await chat(limited) for _ in range(3)]
            unlimited = await chat(full)
            first = await chat(budgeted)
            await proxy.wait_for_records(5)
            second = await chat(budgeted)
            async with client.get(proxy.url("/v1/me"), headers=bearer(budgeted)) as r:
                me = await r.json()
    assert [s for s, _, _ in limited_runs] == [200, 200, 429]
    _, refused, headers = limited_runs[2]
    assert (
        f"Rate limit of key {_key_id(limited)} reached: at most 2 requests per 60 s"
        in (refused["error"]["message"])
    )
    assert headers["x-ratelimit-limit-requests"] == "2"  # the tightest limit is told
    assert unlimited[0] == 200  # the user's other key is not held by it
    assert first[0] == 200
    assert first[2]["x-ratelimit-limit-tokens"] == "10"
    assert second[0] == 429
    assert second[1]["error"]["code"] == "key_budget_exceeded"
    assert (
        f"key {_key_id(budgeted)} used 7 of its 10 tokens per day" in second[1]["error"]["message"]
    )
    [day] = me["key"]["budgets"]
    assert (day["period"], day["budget"], day["used"]) == ("day", 10, 7)
    assert day["resets_at"].endswith("T00:00:00+00:00")


async def test_a_rotated_key_and_its_successor_share_one_budget_and_window_in_the_grace(
    db_dsn: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:

        async def made(*limits: str) -> str:
            out = await asyncio.to_thread(ok, cli_env, "create-key", "--username", "alice", *limits)
            return KEY_RE.search(out).group(0)  # type: ignore[union-attr]

        async def rotated(key: str) -> str:
            out = await asyncio.to_thread(ok, cli_env, "rotate-key", _key_id(key), "--grace", "1h")
            return KEY_RE.search(out).group(0)  # type: ignore[union-attr]

        await asyncio.to_thread(new_key, cli_env, "alice")
        windowed = await made("--rate-limit", "2", "--window", "60")
        budgeted = await made("--tokens-per-day", "16")
        url = proxy.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as client:

            async def chat(key: str) -> tuple[int, Any]:
                body = {"messages": HI, "max_tokens": 2}
                async with client.post(url, json=body, headers=bearer(key)) as r:
                    return r.status, await r.json()

            window_runs = [await chat(windowed)]
            windowed_new = await rotated(windowed)
            window_runs += [
                await chat(windowed_new),
                await chat(windowed),
                await chat(windowed_new),
            ]
            first = await chat(budgeted)
            await proxy.wait_for_records(5)
            budgeted_new = await rotated(budgeted)
            budget_runs = [await chat(budgeted_new)]
            await proxy.wait_for_records(6)
            budget_runs.append(await chat(budgeted))
            async with client.get(proxy.url("/v1/me"), headers=bearer(budgeted_new)) as r:
                me = await r.json()
    # Two requests per 60 s between the old key (working for an hour yet) and the new one.
    assert [s for s, _ in window_runs] == [200, 200, 429, 429]
    assert first[0] == 200  # 7 of the 16 tokens, then 7 more with the new key:
    assert [s for s, _ in budget_runs] == [200, 429]  # the old key has not 16 more of its own
    assert budget_runs[1][1]["error"]["code"] == "key_budget_exceeded"
    [day] = me["key"]["budgets"]
    assert (day["budget"], day["used"]) == (16, 14)


async def test_a_models_weight_multiplies_what_its_tokens_cost(
    db_dsn: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        key = await asyncio.to_thread(new_key, cli_env, "alice")
        await set_limits(db_dsn, "alice", tokens_per_day=30)
        assert "counts for 2" in await asyncio.to_thread(
            ok, cli_env, "set-model-weight", "--model", MODEL, "--weight", "2"
        )
        budgets = proxy.app[ADMISSION].budgets
        await eventually(lambda: budgets.weight_of(MODEL) == 2.0)  # told by NOTIFY
        url = proxy.url("/v1/chat/completions")
        statuses = []
        async with aiohttp.ClientSession() as client:
            for count in (1, 2, 3):
                body = {"model": MODEL, "messages": HI, "max_tokens": 2}
                async with client.post(url, json=body, headers=bearer(key)) as r:
                    statuses.append((r.status, await r.json(), r.headers))
                if r.status == 200:
                    await proxy.wait_for_records(count)
    # Each request is 5 + 2 tokens, 14 weighted: two fit in 30, a third (5 x 2 + 2) does not.
    assert [s for s, _, _ in statuses] == [200, 200, 429]
    assert statuses[0][2]["x-ratelimit-remaining-tokens"] == "16"  # 30 - (5 + 2) x 2
    assert "28 of your 30 tokens per day" in statuses[2][1]["error"]["message"]
    rows = await _sql(
        db_dsn, "SELECT prompt_tokens, completion_tokens, weight FROM llama_requests ORDER BY id"
    )
    assert [tuple(r) for r in rows[:2]] == [(5, 2, 2.0)] * 2  # raw tokens, and the weight
    usage = json.loads(await asyncio.to_thread(ok, cli_env, "usage", "--quotas", "--json"))
    assert usage[0]["tokens_today"] == 28
    listed = json.loads(await asyncio.to_thread(ok, cli_env, "list-model-weights", "--json"))
    assert listed == [{"model": MODEL, "weight": 2.0}]
    reset = ("set-model-weight", "--model", MODEL, "--weight", "default")
    await asyncio.to_thread(ok, cli_env, *reset)
    assert (await asyncio.to_thread(ok, cli_env, "list-model-weights")).strip() == "(none)"


def test_limits_of_keys_groups_and_weights_with_the_cli(cli_env: dict[str, str]) -> None:
    key = new_key(cli_env, "alice")
    key_id = _key_id(key)
    out = ok(cli_env, "set-limit", "--key", key_id, "--rate-limit", "5", "--tokens-per-month", "9")
    assert f"key {key_id}: 5 requests per default s, 9 tokens per month" in out
    out = ok(cli_env, "set-limit", "--key", f"lgk_{key_id}", "--tokens-per-month", "none")
    assert "no token budget" in out
    assert (
        "a key has --rate-limit, --window and token budgets"
        in invoke(cli_env, "set-limit", "--key", key_id, "--max-concurrent", "2").output
    )
    assert "no key with id 0123456789abcdef" in failure(
        cli_env, "set-limit", "--key", "0123456789abcdef", "--rate-limit", "1"
    )
    assert (
        "give one of --username, --group or --key"
        in invoke(
            cli_env, "set-limit", "--key", key_id, "--username", "alice", "--rate-limit", "1"
        ).output
    )
    out = ok(cli_env, "create-group", "--name", "team", "--max-concurrent", "2",
             "--rate-limit", "30", "--window", "60")  # fmt: skip
    assert "30 requests per 60 s, 2 requests at once, no token budget" in out
    out = ok(cli_env, "set-limit", "--group", "team", "--max-concurrent", "none",
             "--tokens-per-day", "100")  # fmt: skip
    assert "requests at once" not in out
    assert "100 tokens per day" in out
    for bad in ("0", "-1", "nan", "x"):
        assert invoke(cli_env, "set-model-weight", "--model", "m", "--weight", bad).exit_code == 2
    # Rotating a key carries its limits.
    ok(cli_env, "set-limit", "--key", key_id, "--tokens-per-day", "50")
    rotated = re.search(r"lgk_([0-9a-f]{16})_", ok(cli_env, "rotate-key", key_id))
    assert rotated is not None
    listed = json.loads(ok(cli_env, "list-keys", "--json"))
    new = next(k for k in listed if k["key_id"] == rotated.group(1))
    assert (new["rate_limit"], new["tokens_per_day"]) == (5, 50)
