"""Home-instance routes while the home instance is down (issue 14, finding 5).

Three fake instances, ``fakes[0]`` the home one. Stopped, it used to turn ``/system_stats``
(which the frontend calls on load), model lists and the frontend's files into 502s although
two instances were up. Now the reads any instance answers alike go to another instance (at
once, from the first refused connection), settings and user data answer 503
``home_unavailable`` (they are on the home instance's disk), and everything goes home again
once it is back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.multi.registry import REGISTRY
from proxy.upstream.pool import POOL
from tests.integration.multi_support import (
    ADMIN,
    ALICE,
    A,
    Client,
    Fakes,
    fakes,
    multi_proxy,
    relayed,
    requests_to,
)
from tests.integration.support import sample

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name

READS = (
    "/system_stats",
    "/api/system_stats",
    "/features",
    "/models",
    "/models/checkpoints",
    "/embeddings",
    "/experiment/models",
    "/object_info",
    "/object_info/SaveImage",
    "/extensions",
    "/",
)


class Clock:
    """The breakers' time: moved on instead of waiting out ``open_seconds``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def start(multi_proxy: Callable[..., Any]) -> tuple[Client, Clock]:
    client: Client = await multi_proxy()
    clock = Clock()
    client.app[POOL].clock = clock
    return client, clock


async def test_reads_move_to_another_instance_from_the_first_refusal(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client, _ = await start(multi_proxy)
    pool = client.app[POOL]
    home = fakes.name(0)
    await fakes[0].stop()
    assert pool.is_healthy(home)  # nobody noticed yet: the breaker is closed

    async with client.get("/system_stats", headers=A) as resp:
        assert resp.status == 200, await resp.text()
        stats = await resp.json()
    assert "system" in stats
    # The refused connection moved the request and told the pool (a refusal ejects at once).
    assert len(requests_to(fakes[1], "GET", "/system_stats")) == 1
    assert not pool.is_healthy(home)
    assert sample(client, "comfygate_home_failovers_total", rule="system_stats") == 1

    for path in READS:
        async with client.get(path, headers=A) as resp:
            assert resp.status == 200, (path, resp.status, await resp.text())
            await resp.read()
        async with client.head(path, headers=A) as resp:
            assert resp.status == 200, (path, resp.status)
    served = [r.path for f in (fakes[1], fakes[2]) for r in relayed(f)]
    for path in ("/system_stats", "/api/system_stats", "/features", "/models", "/extensions", "/"):
        assert path in served, path
    assert sample(client, "comfygate_home_failovers_total", rule="static") >= 1


async def test_home_state_answers_503_while_down_and_everything_goes_home_when_back(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client, clock = await start(multi_proxy)
    pool, health = client.app[POOL], client.app[REGISTRY].health
    home = fakes.name(0)
    await fakes[0].stop()
    await health.check_all()  # the active check finds it refusing
    assert not pool.is_healthy(home)
    async with client.get("/readyz") as resp:
        assert resp.status == 200  # two instances are up

    for method, path, body in (
        ("GET", "/settings", None),
        ("GET", "/api/settings/Comfy.ColorPalette", None),
        ("POST", "/settings", {"Comfy.ColorPalette": "light"}),
        ("GET", "/userdata?dir=workflows", None),
        ("GET", "/api/userdata/user.css", None),
        ("POST", "/userdata/workflows%2Fa.json", {"nodes": []}),
    ):
        async with client.request(method, path, headers=A, json=body) as resp:
            assert resp.status == 503, (path, resp.status, await resp.text())
            error = (await resp.json())["error"]
            assert error["type"] == "home_unavailable"
            assert home in error["message"]
            assert int(resp.headers["Retry-After"]) >= 1
    for fake in (fakes[1], fakes[2]):
        assert not relayed(fake)  # never someone else's copy

    # A write, a custom route: nothing to fail over to, the home instance or its failure.
    async with client.post("/free", headers=ADMIN, json={}) as resp:
        assert resp.status == 502
    for fake in (fakes[1], fakes[2]):
        assert not relayed(fake)

    await fakes.restart(0)
    clock.now += 3600  # past open_seconds: the next check may bring it back
    await health.check_all()
    assert pool.is_healthy(home)
    async with client.get("/settings", headers=A) as resp:
        assert resp.status == 200, await resp.text()
    async with client.get("/system_stats", headers=A) as resp:
        assert resp.status == 200
    settings_read, stats_read = (r.path for r in relayed(fakes[0]))
    assert ALICE in settings_read  # her own settings file, in her folder on the home instance
    assert stats_read == "/system_stats"
    assert not [r for r in relayed(fakes[1]) if r.path == "/system_stats"]
