"""Behind a reverse proxy: `X-Forwarded-For` names the client (failure limit, audit rows,
`/ready`'s details) when, and only when, it comes from a configured proxy address."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.appkeys import AUTHENTICATOR, BACKENDS
from proxy.auth.authenticator import FAILURE_LIMIT
from proxy.settings import SettingsError, load_settings
from tests.proxy_harness import Harness, bearer, eventually, random_key, running_proxy

PROXY = "127.0.0.1"  # the reverse proxy, configured as trusted
STRANGER = "127.0.0.2"  # any other peer on the network


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    settings = {"LLAMA_PROXY_TRUSTED_PROXIES": f"{PROXY}, 10.0.0.0/8"}
    async with running_proxy(db_dsn, tmp_path, **settings) as harness:
        yield harness


async def _get(
    proxy: Harness, path: str, peer: str, headers: CIMultiDict[str] | dict[str, str]
) -> aiohttp.ClientResponse:
    connector = aiohttp.TCPConnector(local_addr=(peer, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as client,
        client.get(proxy.url(path), headers=headers) as response,
    ):
        await response.read()
        return response


async def test_audit_rows_name_the_client_a_trusted_proxy_forwards_for(proxy: Harness) -> None:
    key = await proxy.user("alice")
    sent = [
        (PROXY, "203.0.113.7"),  # the client, as nginx appends it
        (PROXY, "forged-by-the-client, 198.51.100.4"),  # left of the client: the client's own
        (PROXY, "198.51.100.9, 10.1.2.3"),  # through two proxies, both trusted
        (STRANGER, "192.0.2.55"),  # anyone else's header is their own claim: ignored
        (PROXY, None),  # the proxy's own request (a health check, a local script)
    ]
    for peer, forwarded in sent:
        headers = {**bearer(key), **({"X-Forwarded-For": forwarded} if forwarded else {})}
        assert (await _get(proxy, "/v1/models", peer, headers)).status == 200
    rows = await proxy.wait_for_records(len(sent))
    assert [row.client_addr for row in rows] == [
        "203.0.113.7",
        "198.51.100.4",
        "198.51.100.9",
        STRANGER,
        PROXY,
    ]


async def test_the_failure_limit_counts_each_forwarded_client_apart(proxy: Harness) -> None:
    auth = proxy.app[AUTHENTICATOR]

    async def bad_key_from(client: str) -> int:
        headers = {**bearer(random_key()), "X-Forwarded-For": client}
        return (await _get(proxy, "/v1/models", PROXY, headers)).status

    for _ in range(FAILURE_LIMIT):
        assert await bad_key_from("203.0.113.7") == 401
    assert auth.stats.single_file == 0
    assert await bad_key_from("203.0.113.7") == 401
    assert auth.stats.single_file == 1  # this client is past the limit...
    assert await bad_key_from("203.0.113.8") == 401
    assert auth.stats.single_file == 1  # ... and another behind the same proxy is not


async def test_ready_tells_details_only_to_this_machine_not_to_forwarded_clients(
    proxy: Harness,
) -> None:
    await proxy.upstream.stop()
    local = await _get(proxy, "/ready", PROXY, {})
    assert local.status == 503  # it looked now, and says why
    assert (await local.json())["checks"]["backend"].startswith("not reachable: ")
    # From the network: only what the last probe found (it costs the proxy nothing), and no
    # reason: once the probe has seen the backend go, not ready.
    backends = proxy.app[BACKENDS]
    await eventually(lambda: not backends.is_up("default"))
    forwarded = await _get(proxy, "/ready", PROXY, {"X-Forwarded-For": "203.0.113.7"})
    assert forwarded.status == 503
    assert await forwarded.json() == {"status": "not ready"}


async def test_a_header_sent_twice_by_the_proxy_is_a_clear_400(proxy: Harness) -> None:
    headers = CIMultiDict([("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "10.0.0.1")])
    response = await _get(proxy, "/v1/models", PROXY, headers)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_forwarded_header"


async def test_without_trusted_proxies_the_header_is_ignored(db_dsn: str, tmp_path: Path) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        key = await proxy.user("alice")
        headers = {**bearer(key), "X-Forwarded-For": "203.0.113.7"}
        assert (await _get(proxy, "/v1/models", PROXY, headers)).status == 200
        (row,) = await proxy.wait_for_records(1)
    assert row.client_addr == PROXY


def test_a_trusted_proxy_that_is_no_address_stops_startup_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={"LLAMA_PROXY_TRUSTED_PROXIES": "10.0.0.0/8, nginx"}, home=tmp_path)
    assert str(raised.value) == (
        "LLAMA_PROXY_TRUSTED_PROXIES='10.0.0.0/8, nginx' from environment: "
        "'nginx' is not an IP address or network"
    )
