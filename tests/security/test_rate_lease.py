"""Token leases (``proxy.limits.lease``) through two real proxies sharing one real Redis: a
user flooding both replicas is admitted no more than Redis counted for it, another user's
lease buys it nothing, and what it was refused never reached ComfyUI.

The read class is 4 per second with a burst of 64 and leases of 4 (``lease_seconds`` 10): a
lease is used, and the refill while the test runs is small and accounted for.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI

Client = TestClient[Any, Any]
ALICE, BOB = bearer("alice"), bearer("bob")
BURST, RATE = 64, 4
SETTINGS: dict[str, Any] = {
    "rate_limits": {
        "redis_budget_ms": 5000,  # exactness under test, not latency: no fail-open on a slow box
        "lease_tokens": 4,
        "lease_seconds": 10.0,
        "default": {"read": {"rate": f"{RATE}/second", "burst": BURST}},
    }
}


async def _get(client: Client, headers: dict[str, str]) -> tuple[int, str]:
    async with client.get("/system_stats", headers=headers) as resp:
        body = await resp.json()
        error = body.get("error", {}).get("type", "") if resp.status != 200 else ""
        return resp.status, error


async def test_flooding_two_replicas_admits_no_more_than_redis_counted(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    one = await make_proxy(fake_comfy.url, token=None, redis={"url": redis_url}, **SETTINGS)
    two = await make_proxy(fake_comfy.url, token=None, redis={"url": redis_url}, **SETTINGS)
    # Alice is busy on replica one first: it holds a lease of hers.
    for _ in range(12):
        assert (await _get(one, ALICE))[0] == 200
    fake_comfy.reset()

    started = time.monotonic()
    answers = await asyncio.gather(*(_get(one if i % 2 else two, BOB) for i in range(400)))
    elapsed = time.monotonic() - started
    admitted = sum(1 for status, _ in answers if status == 200)
    refused = [error for status, error in answers if status != 200]
    # Bob gets his burst and what refilled meanwhile, no more: Alice's lease is hers, and
    # tokens a replica holds were counted in Redis when leased.
    assert admitted <= BURST + RATE * elapsed + 1, (admitted, elapsed)
    assert admitted >= BURST - 2 * 3  # at most a lease's spare tokens per replica unspent
    assert refused
    assert set(refused) == {"rate_limited"}
    assert all(status in (200, 429) for status, _ in answers)
    # Nothing refused reached ComfyUI (reset before the flood: every request since is Bob's).
    assert sum(1 for r in fake_comfy.received if r.path == "/system_stats") == admitted
    # Alice's allowance was not spent by Bob's flood.
    assert (await _get(two, ALICE))[0] == 200
