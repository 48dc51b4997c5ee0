"""The opt-in per-user request counter (``[metrics] per_user_top_n``, issue 7) through the real
app: absent by default; when on, ``comfygate_user_requests_total{user}`` for the N busiest users
only; with two workers, the supervisor's listener sums both workers' counts."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ProxyFactory, bearer, make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.test_workers import fresh_connection_get
from tests.proxy_process import ProxyProcess, proxy_command

NAME = "comfygate_user_requests_total"
WORKLOAD = {"alice": 20, "bob": 12, "carol": 4}
"""Enough fresh connections that both workers serve some (SO_REUSEPORT spreads connections by
hash: all 36 on one worker is a 1 in 3e10 chance)."""
SCRAPE = {"Authorization": "Bearer scrape-me"}


def users(text: str) -> dict[str, float]:
    """``{user: value}`` of the per-user series in an exposition."""
    return {
        s.labels["user"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == NAME
    }


async def test_absent_by_default(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    metrics = {"on_main_port": True, "bearer_token": "scrape-me"}
    client = await make_proxy(fake_comfy.url, token=None, metrics=metrics)
    assert (await client.get("/queue", headers=bearer("alice"))).status == 200
    text = await (await client.get("/metrics", headers=SCRAPE)).text()
    assert "comfygate_user_requests" not in text


async def test_the_top_n_users_in_one_process(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    metrics = {"on_main_port": True, "bearer_token": "scrape-me", "per_user_top_n": 2}
    client = await make_proxy(fake_comfy.url, token=None, metrics=metrics)
    for user, times in WORKLOAD.items():
        for _ in range(times):
            assert (await client.get("/queue", headers=bearer(user))).status == 200
    assert (await client.get("/queue")).status == 401  # no principal: nobody's request
    text = await (await client.get("/metrics", headers=SCRAPE)).text()
    assert users(text) == {"alice": 20, "bob": 12}  # carol is not among the top 2


async def scrape_users(proxy: ProxyProcess) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(proxy.metrics_url) as resp:
        assert resp.status == 200
        return users(await resp.text())


async def test_the_top_n_users_over_two_workers(fake_comfy: FakeComfyUI) -> None:
    env = {
        "COMFYGATE_METRICS__PER_USER_TOP_N": "2",
        "COMFYGATE_METRICS__UPSTREAM_POLL_SECONDS": "0",
        "COMFYGATE_RATE_LIMITS__ENABLED": "false",
    }
    async with proxy_command(
        fake_comfy.url, args=["--workers", "2"], capture_logs=True, env=env
    ) as proxy:
        await proxy.wait_log(lambda line: line.get("event") == "supervisor_started")
        for user, times in WORKLOAD.items():
            headers = {"Authorization": f"Bearer {make_token(user, ('user',))}"}
            for _ in range(times):
                assert await fresh_connection_get(f"{proxy.url}/queue", headers) == 200
        lines = await proxy.wait_log(
            lambda line: line.get("event") == "request_finished" and line.get("rule") == "queue",
            count=sum(WORKLOAD.values()),
        )
        assert {line["worker"] for line in lines} == {0, 1}  # both counted some
        # Each worker publishes its counts every few seconds (FLUSH_SECONDS) to files the
        # listener sums: another process's schedule, observable only by scraping - so the
        # scrape is polled until it shows the sum (bounded).
        expected = {"alice": 20.0, "bob": 12.0}
        seen: dict[str, float] = {}
        async with asyncio.timeout(30):
            while (seen := await scrape_users(proxy)) != expected:  # noqa: ASYNC110
                await asyncio.sleep(0.25)
        assert seen == expected, json.dumps(seen)
