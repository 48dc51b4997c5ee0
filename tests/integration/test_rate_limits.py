"""Rate limits through the real app in front of the fake ComfyUI: headers on allowed responses
(buffered, streamed, the WebSocket 101), refusals in the shape each client expects, the login
form, two replicas sharing one real Redis, unlimited admins, and the switch.

Limits are slow (per minute or hour) so that a burst is exact whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestClient

from proxy.limits.enforce import limit_key
from proxy.observability.metrics import METRICS
from proxy.principal import comfy_user_id
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.support import sample
from tests.redis_server import RedisServer
from tests.support.gateway_queue import settled

Client = TestClient[Any, Any]
ALICE, BOB, ADMIN = bearer("alice"), bearer("bob"), bearer("root", ("admin",))
IETF = ("RateLimit-Policy", "RateLimit")
LEGACY = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
GRAPH = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
    },
    "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "rl"}},
}


def limits(**classes: tuple[str, int]) -> dict[str, Any]:
    """``rate_limits`` settings overriding the default of some classes."""
    return {"default": {c: {"rate": r, "burst": b} for c, (r, b) in classes.items()}}


def write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def decisions(client: Client, route_class: str, outcome: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(
        "comfygate_ratelimit_decisions_total", {"route_class": route_class, "outcome": outcome}
    )
    return value or 0.0


async def test_headers_on_allowed_buffered_responses(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, rate_limits=limits(read=("1/minute", 3)))
    resp = await client.get("/api/history", headers=ALICE)  # rewritten by isolation: buffered
    assert resp.status == 200
    # Burst 3 refilled one per minute: full again 3 minutes after a standing start.
    assert resp.headers["RateLimit-Policy"] == '"read";q=3;w=180'
    assert resp.headers["RateLimit"] == '"read";r=2;t=60'
    assert resp.headers["X-RateLimit-Limit"] == "3"
    assert resp.headers["X-RateLimit-Remaining"] == "2"
    assert resp.headers["X-RateLimit-Reset"] == "60"
    assert "Retry-After" not in resp.headers
    resp = await client.get("/object_info", headers=ALICE)  # plain forward
    assert resp.headers["RateLimit"] == '"read";r=1;t=120'
    # The frontend's files spend a generous class of their own.
    for path in ("/", "/extensions/core/x.js"):
        resp = await client.get(path, headers=ALICE)
        assert resp.headers["RateLimit-Policy"].startswith('"static";'), path


async def test_headers_on_a_streamed_response(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    payload = os.urandom(1024 * 1024)  # above the proxy's buffering threshold
    write_file(os.path.join(fake_comfy.paths.input, "shared", "big.bin"), payload)
    client = await make_proxy(fake_comfy.url, token=None, rate_limits=limits(view=("1/minute", 2)))
    resp = await client.get("/view?filename=big.bin&subfolder=shared&type=input", headers=ALICE)
    assert resp.status == 200  # relayed chunk by chunk (over 256 KiB), headers sent first
    assert resp.headers["RateLimit"] == '"view";r=1;t=60'
    assert resp.headers["X-RateLimit-Remaining"] == "1"
    assert await resp.read() == payload


async def test_submit_over_the_limit_is_429_in_comfyui_shape(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(
        fake_comfy.url, token=None, rate_limits=limits(submit=("1/minute", 2))
    )
    for _ in range(2):
        resp = await client.post("/prompt", json={"prompt": GRAPH}, headers=ALICE)
        assert resp.status == 200, await resp.text()
    await settled(client, fake_comfy)
    fake_comfy.reset()
    resp = await client.post("/api/prompt", json={"prompt": GRAPH}, headers=ALICE)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "60"
    assert resp.headers["RateLimit"] == '"submit";r=0;t=60'
    body = await resp.json()
    assert body["node_errors"] == {}
    assert body["error"]["type"] == "rate_limited"
    assert body["error"]["retry_after"] == 60
    assert body["error"]["message"].startswith("Too many prompts queued in a short time")
    assert set(body["error"]) == {"type", "message", "details", "extra_info", "retry_after"}
    assert fake_comfy.received == []  # refused before ComfyUI
    # Bob's allowance is his own; Alice's other classes are untouched.
    assert (await client.post("/prompt", json={"prompt": GRAPH}, headers=BOB)).status == 200
    assert (await client.get("/prompt", headers=ALICE)).status == 200
    assert decisions(client, "submit", "limited") == 1


async def test_read_over_the_limit_is_429_json(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, rate_limits=limits(read=("1/hour", 1)))
    assert (await client.get("/history", headers=ALICE)).status == 200
    resp = await client.get("/api/queue", headers=ALICE)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "3600"
    body = await resp.json()
    assert "node_errors" not in body
    assert body["error"]["type"] == "rate_limited"
    assert body["error"]["retry_after"] == 3600


async def test_every_token_of_one_user_shares_one_allowance(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, rate_limits=limits(read=("1/hour", 2)))
    statuses = [(await client.get("/history", headers=bearer("alice"))).status for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_websocket_handshake_over_the_limit_is_429_before_the_upgrade(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(
        fake_comfy.url, token=None, rate_limits=limits(ws_connect=("1/minute", 1))
    )
    ws = await client.ws_connect("/ws?clientId=one", headers=ALICE)
    # The 101 carries the headers too (on_response_prepare runs for the upgrade).
    assert ws._response.headers["RateLimit"] == '"ws_connect";r=0;t=60'
    assert len(fake_comfy.sockets) == 1
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws?clientId=two", headers=ALICE)
    assert info.value.status == 429
    assert info.value.headers is not None
    assert info.value.headers["Retry-After"] == "60"
    assert len(fake_comfy.sockets) == 1  # ComfyUI never saw the second socket
    await ws.close()


async def test_unlimited_admin_never_touches_redis(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, redis={"url": redis_url})
    for _ in range(20):
        resp = await client.get("/history", headers=ADMIN)
        assert resp.status == 200
        assert "RateLimit" not in resp.headers
    resp = await client.post("/prompt", json={"prompt": GRAPH}, headers=ADMIN)
    assert resp.status == 200
    sync = redis.Redis.from_url(redis_url)
    try:
        assert sync.keys("comfygate:rl:*") == []
    finally:
        sync.close()
    assert decisions(client, "read", "unlimited") == 20
    # A user's request does reach Redis, on one key per class and user.
    assert (await client.get("/history", headers=ALICE)).status == 200
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = [str(k) for k in sync.keys("comfygate:rl:*")]
    finally:
        sync.close()
    assert keys == [limit_key("read", f"u:{comfy_user_id('alice')}")]


async def test_two_replicas_sharing_redis_admit_exactly_the_limit(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    # Exactness is under test, not latency: on a loaded test machine a check over the 50 ms
    # budget would fail open (by design), so the budget is generous. Auth is off (one anonymous
    # client, keyed by IP) so that nothing but the limiter talks to Redis.
    settings = {
        "redis": {"url": redis_url},
        "auth": {"enabled": False, "anonymous_role": "user"},
        "rate_limits": {"redis_budget_ms": 5000, **limits(read=("1/hour", 50))},
    }
    one = await make_proxy(fake_comfy.url, token=None, **settings)
    two = await make_proxy(fake_comfy.url, token=None, **settings)

    async def get(client: Client) -> int:
        async with client.get("/object_info") as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(get(one if i % 2 else two) for i in range(200)))
    assert sorted(set(statuses)) == [200, 429], statuses
    assert statuses.count(200) == 50
    assert statuses.count(429) == 150
    allowed = decisions(one, "read", "allowed") + decisions(two, "read", "allowed")
    assert allowed == 50
    for replica in (one, two):  # each decided its own hundred (how they split is a race)
        assert decisions(replica, "read", "allowed") + decisions(replica, "read", "limited") == 100


async def test_memory_backend_is_exact_within_one_process(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, rate_limits=limits(read=("1/hour", 30)))

    async def get() -> int:
        async with client.get("/object_info", headers=ALICE) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(get() for _ in range(100)))
    assert statuses.count(200) == 30


async def test_allowance_returns_on_schedule(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    """5 per second, burst 2, Redis TIME: two pass, the third is refused, and one more passes
    once the emission interval (0.2 s) has gone by."""
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        redis={"url": redis_url},
        rate_limits=limits(read=("5/second", 2)),
    )
    statuses = [(await client.get("/object_info", headers=ALICE)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    await asyncio.sleep(0.2)  # the scheduled time itself, not a synchronisation
    assert (await client.get("/object_info", headers=ALICE)).status == 200
    assert (await client.get("/object_info", headers=ALICE)).status == 429


async def test_switched_off(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    client = await make_proxy(
        fake_comfy.url, token=None, rate_limits={"enabled": False, **limits(read=("1/hour", 1))}
    )
    for _ in range(5):
        resp = await client.get("/object_info", headers=ALICE)
        assert resp.status == 200
        assert "RateLimit" not in resp.headers


async def test_header_families_can_be_switched_off(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(
        fake_comfy.url, token=None, rate_limits={"ietf_headers": False, **limits()}
    )
    resp = await client.get("/object_info", headers=ALICE)
    assert not any(h in resp.headers for h in IETF)
    assert all(h in resp.headers for h in LEGACY)
    client = await make_proxy(fake_comfy.url, token=None, rate_limits={"legacy_headers": False})
    resp = await client.get("/object_info", headers=ALICE)
    assert all(h in resp.headers for h in IETF)
    assert not any(h in resp.headers for h in LEGACY)


async def test_readyz_reports_the_rate_limiter(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url)
    body = await (await client.get("/readyz")).json()
    assert body["rate_limiter"] == "ok"
    client = await make_proxy(fake_comfy.url, rate_limits={"enabled": False})
    assert "rate_limiter" not in await (await client.get("/readyz")).json()


# -------------------------------------------------------------------------------- login


async def login_post(client: Client, *, accept: str = "text/html") -> aiohttp.ClientResponse:
    return await client.post(
        "/login",
        data={"username": "alice", "password": "wrong"},
        headers={"Accept": accept},
        allow_redirects=False,
    )


async def test_login_over_the_limit_is_429_on_the_page(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, rate_limits=limits(login=("1/minute", 2)))
    for _ in range(2):
        resp = await login_post(client)
        assert resp.status == 403  # no CSRF cookie: refused, but it counted
    resp = await login_post(client)
    assert resp.status == 429
    assert resp.content_type == "text/html"
    assert resp.headers["Retry-After"] == "60"
    assert resp.headers["RateLimit"] == '"login";r=0;t=60'
    assert "Too many sign-in attempts. Try again in 60 seconds." in await resp.text()
    # An API client gets JSON.
    resp = await login_post(client, accept="application/json")
    assert resp.status == 429
    body = await resp.json()
    assert body["error"]["type"] == "rate_limited"
    assert body["error"]["retry_after"] == 60
    # The page itself (GET) is not limited.
    assert (await client.get("/login")).status == 200


async def test_login_failure_throttle_still_applies_below_the_rate_limit(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(
        fake_comfy.url, token=None, auth={"login": {"max_failures": 2}}
    )  # login rate limit: the default 5 at once
    page = await client.get("/login")
    csrf = page.cookies["comfygate_csrf"].value
    statuses = []
    for _ in range(3):
        resp = await client.post(
            "/login",
            data={"token": "not-a-token", "csrf": csrf},
            headers={"Accept": "text/html", "Origin": str(client.make_url("/")).rstrip("/")},
            allow_redirects=False,
        )
        statuses.append(resp.status)
    assert statuses == [401, 401, 429]
    assert "Too many failed sign-in attempts" in await resp.text()  # the throttle's own page


async def test_login_attempts_are_keyed_by_client_ip(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        server={"trusted_proxies": ["127.0.0.0/8"]},
        rate_limits=limits(login=("1/minute", 1)),
    )

    async def post(ip: str) -> int:
        resp = await client.post(
            "/login", data={"token": "x"}, headers={"X-Forwarded-For": ip}, allow_redirects=False
        )
        return resp.status

    assert await post("203.0.113.1") == 403
    assert await post("203.0.113.1") == 429
    assert await post("203.0.113.2") == 403  # another client


# --------------------------------------------------------------------- fault injection
# (``own_redis``: a redis-server of the test alone, from tests/conftest.py)


async def test_redis_stopped_mid_test_fail_modes_then_recovery(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, own_redis: RedisServer
) -> None:
    """Auth off (the anonymous principal, keyed by IP) so that only the limiter needs Redis:
    token revocation checks fail closed on their own when Redis is down."""
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        auth={"enabled": False, "anonymous_role": "user"},
        redis={"url": own_redis.url},
        rate_limits={"breaker_failures": 2, "breaker_open_seconds": 0.3},
    )
    assert (await client.get("/object_info")).status == 200
    assert (await client.post("/prompt", json={"prompt": GRAPH})).status == 200
    own_redis.stop()

    # read fails open: served, uncounted, without headers.
    resp = await client.get("/object_info")
    assert resp.status == 200
    assert "RateLimit" not in resp.headers
    # submit fails closed: 503 in ComfyUI's shape, never reaching ComfyUI.
    fake_comfy.reset()
    resp = await client.post("/prompt", json={"prompt": GRAPH})
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    body = await resp.json()
    assert body["error"]["type"] == "rate_limit_unavailable"
    assert body["node_errors"] == {}
    assert fake_comfy.received == []
    # Two consecutive failures: the breaker is open and checks no longer wait on Redis.
    assert sample(client, "comfygate_redis_breaker_state") == 2
    assert decisions(client, "read", "failed_open") == 1
    assert decisions(client, "submit", "failed_closed") == 1
    resp = await client.post("/upload/image", data=b"x", headers={"Content-Type": "image/png"})
    assert resp.status == 503
    assert sample(client, "comfygate_redis_errors_total", op="ratelimit", kind="breaker_open") == 1
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["rate_limiter"] == "degraded"

    own_redis.start()
    await asyncio.sleep(0.3)  # breaker_open_seconds: the scheduled probe time itself
    resp = await client.post("/prompt", json={"prompt": GRAPH})  # the probe
    assert resp.status == 200, await resp.text()
    assert resp.headers["RateLimit"].startswith('"submit";r=')
    assert sample(client, "comfygate_redis_breaker_state") == 0
    ready = await client.get("/readyz")
    assert (await ready.json())["rate_limiter"] == "ok"


async def test_signed_in_reads_fail_open_on_the_denylist_too(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, own_redis: RedisServer
) -> None:
    """With auth on, the token denylist lives in Redis as well: a fail-open class still serves
    a valid token (logged and counted), a fail-closed class is refused before ComfyUI, and a
    read whose answer needs the ownership records (a user's history) degrades to nothing."""
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        redis={"url": own_redis.url},
        auth={"revocation_cache_seconds": 0},  # every lookup goes to Redis
        rate_limits={"breaker_failures": 1, "breaker_open_seconds": 60},
    )
    assert (await client.get("/object_info", headers=ALICE)).status == 200
    own_redis.stop()
    try:
        resp = await client.get("/object_info", headers=ALICE)
        assert resp.status == 200, await resp.text()
        assert sample(client, "comfygate_redis_errors_total", op="revocation", kind="failed_open")
        # Isolation cannot tell alice's entries from others' without Redis: an empty history
        # marked degraded (issue 15), never anyone's entries.
        resp = await client.get("/history", headers=ALICE)
        assert resp.status == 200
        assert resp.headers["Comfygate-Degraded"] == "state"
        assert await resp.json() == {}
        fake_comfy.reset()
        resp = await client.post("/prompt", json={"prompt": GRAPH}, headers=ALICE)
        assert resp.status == 503
        assert (await resp.json())["error"]["type"] == "revocation_unavailable"
        assert fake_comfy.received == []
    finally:
        own_redis.start()
