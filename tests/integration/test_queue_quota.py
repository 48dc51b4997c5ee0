"""Queue quotas end to end: the real app in front of the fake ComfyUI, in process memory and
with a real Redis.

Alice (A) and Bob (B) are ``user``s; the quota is set per test. Prompts are held in the fake's
worker (``hold``/``release``) so they stay unfinished exactly as long as a test needs; ends are
noticed through the WebSocket events (fast path) or the reconciler, which tests drive with
``poll_once`` (its background period is set to an hour) or wait on with ``wait_polls``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.limits.quota.model import MemoryQuotaStore
from proxy.limits.quota.redis_store import RedisQuotaStore
from proxy.limits.quota.service import QUEUE_QUOTA, QueueQuota
from proxy.observability.metrics import METRICS
from proxy.principal import comfy_user_id
from proxy.redis.client import connect
from proxy.settings import RedisSettings
from proxy.tenancy.ownership import OWNERSHIP
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.support import graph

Client = TestClient[Any, Any]
A, B, C = bearer("alice"), bearer("bob"), bearer("carol")
ADMIN = bearer("root", ("admin",))


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Extra settings sections: none (state in process memory) or a real Redis."""
    if request.param == "memory":
        return {}
    return {"redis": {"url": request.getfixturevalue("redis_url")}}


async def make(
    make_proxy: ProxyFactory,
    fake: FakeComfyUI,
    backend: dict[str, Any],
    *,
    quota: int = 2,
    isolation: bool = True,
    **rate_limits: Any,
) -> Client:
    limits = {
        "queue_quota": quota,
        "quota_poll_seconds": 3600.0,  # the tests drive the reconciler
        "default": {"submit": {"rate": "unlimited"}},
        **rate_limits,
    }
    return await make_proxy(
        fake.url,
        token=None,
        rate_limits=limits,
        isolation={"enabled": isolation},
        **backend,
    )


async def submit(
    client: Client, who: dict[str, str], client_id: str | None = None, **extra: Any
) -> tuple[int, dict[str, Any], Any]:
    body: dict[str, Any] = {"prompt": extra.pop("prompt", None) or graph(), **extra}
    if client_id is not None:
        body["client_id"] = client_id
    async with client.post("/prompt", json=body, headers=who) as resp:
        return resp.status, await resp.json(), resp.headers


def quota_of(client: Client) -> QueueQuota:
    quota: QueueQuota = client.app[QUEUE_QUOTA]
    return quota


def refusals(client: Client, reason: str) -> float:
    value = client.app[METRICS].quota_refusals.labels(reason)._value.get()
    return float(value)


def assert_queue_full(status: int, body: dict[str, Any], headers: Any, *, have: int) -> None:
    """429 in ComfyUI's error shape (the stock UI shows ``error.message``)."""
    assert status == 429, body
    error = body["error"]
    assert error["type"] == "queue_full"
    assert f"you have {have} unfinished prompt" in error["message"]
    assert error["retry_after"] >= 1
    assert headers["Retry-After"] == str(error["retry_after"])
    assert body["node_errors"] == {}


@pytest.fixture
def held(fake_comfy: FakeComfyUI) -> Iterator[FakeComfyUI]:
    """The fake's worker stops before the first node of each prompt until released."""
    fake_comfy.hold()
    yield fake_comfy
    fake_comfy.release()


async def finish_next(fake: FakeComfyUI) -> str:
    """Let the prompt waiting at the gate run to its end; the next one stops at the gate."""
    running = await fake.wait_held()
    fake.release()
    fake.hold()
    return running


async def ended_on(ws: aiohttp.ClientWebSocketResponse, prompt_id: str) -> None:
    """Until the socket relayed the prompt's final ``executing {node: null}``."""
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            continue
        data = json.loads(msg.data)
        if data["type"] == "executing" and data["data"] == {"node": None, "prompt_id": prompt_id}:
            return


# -- the quota and its release paths ----------------------------------------------------------


async def test_websocket_end_event_frees_the_slot(
    make_proxy: ProxyFactory, held: FakeComfyUI, backend: dict[str, Any]
) -> None:
    client = await make(make_proxy, held, backend, quota=2)
    ws = await client.ws_connect("/ws?clientId=tab", headers=A)
    first = [await submit(client, A, "tab") for _ in range(2)]
    assert [s for s, _, _ in first] == [200, 200]
    assert_queue_full(*await submit(client, A, "tab"), have=2)
    assert refusals(client, "user_quota") == 1

    done = await finish_next(held)
    assert done == first[0][1]["prompt_id"]
    await ended_on(ws, done)  # released before the client saw it: the next fits at once
    status, answer, _ = await submit(client, A, "tab")
    assert status == 200, answer
    assert_queue_full(*await submit(client, A, "tab"), have=2)
    assert await quota_of(client).store.in_use(f"u:{comfy_user_id('alice')}") == 2
    await ws.close()


async def test_reconciler_frees_the_slot_of_an_api_client_without_socket(
    make_proxy: ProxyFactory, held: FakeComfyUI, backend: dict[str, Any]
) -> None:
    client = await make(make_proxy, held, backend, quota=1)
    status, answer, _ = await submit(client, A)
    assert status == 200, answer
    assert_queue_full(*await submit(client, A), have=1)
    reconciler = quota_of(client).reconciler
    assert reconciler is not None
    assert await reconciler.poll_once() == 0  # still running: nothing to release
    gauge = client.app[METRICS].queue_quota_in_use.labels(f"{held.host}:{held.port}")
    assert gauge._value.get() == 1

    held.release()
    await held.wait_idle()
    # Nobody saw it end, but a refusal has the queue read once more first (refresh).
    status, answer, _ = await submit(client, A)
    assert status == 200, answer
    assert gauge._value.get() == 0


async def test_reconciler_loop_runs_on_its_own(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, backend: dict[str, Any]
) -> None:
    client = await make(make_proxy, fake_comfy, backend, quota=1, quota_poll_seconds=0.05)
    status, answer, _ = await submit(client, A)
    assert status == 200, answer
    await fake_comfy.wait_idle()
    reconciler = quota_of(client).reconciler
    assert reconciler is not None
    await asyncio.wait_for(reconciler.wait_polls(reconciler.polls + 2), timeout=10)
    status, answer, _ = await submit(client, A)
    assert status == 200, answer


async def test_deleted_pending_prompt_is_released_by_the_reconciler(
    make_proxy: ProxyFactory, held: FakeComfyUI, backend: dict[str, Any]
) -> None:
    client = await make(make_proxy, held, backend, quota=2)
    ids = [(await submit(client, A))[1]["prompt_id"] for _ in range(2)]
    assert await held.wait_held() == ids[0]
    async with client.post("/queue", json={"delete": [ids[1]]}, headers=A) as resp:
        assert resp.status == 200
    reconciler = quota_of(client).reconciler
    assert reconciler is not None
    assert await reconciler.poll_once() == 1  # the pending one; the running one stays
    assert (await submit(client, A))[0] == 200
    assert_queue_full(*await submit(client, A), have=2)


async def test_users_quotas_are_independent(
    make_proxy: ProxyFactory, held: FakeComfyUI, backend: dict[str, Any]
) -> None:
    client = await make(make_proxy, held, backend, quota=1)
    assert (await submit(client, A))[0] == 200
    assert_queue_full(*await submit(client, A), have=1)
    assert (await submit(client, B))[0] == 200
    assert_queue_full(*await submit(client, B), have=1)
    for _ in range(3):  # admins: queue_quota = 0, unlimited
        assert (await submit(client, ADMIN))[0] == 200


async def test_a_prompt_comfyui_refuses_is_not_counted(
    make_proxy: ProxyFactory, held: FakeComfyUI, backend: dict[str, Any]
) -> None:
    client = await make(make_proxy, held, backend, quota=1)
    no_output = {"1": graph()["1"]}  # nothing to save or preview: ComfyUI refuses it
    for _ in range(3):
        status, answer, _ = await submit(client, A, prompt=no_output)
        assert status == 400, answer
        assert answer["error"]["type"] == "prompt_no_outputs"
    assert (await submit(client, A))[0] == 200


async def test_entries_expire(
    make_proxy: ProxyFactory, held: FakeComfyUI, backend: dict[str, Any]
) -> None:
    client = await make(make_proxy, held, backend, quota=1, quota_entry_ttl_seconds=60.0)
    assert (await submit(client, A))[0] == 200
    assert_queue_full(*await submit(client, A), have=1)
    store = quota_of(client).store
    assert isinstance(store, MemoryQuotaStore | RedisQuotaStore)
    later = time.time() + 61
    store.clock = lambda: later  # Redis: the scripts take this time instead of TIME
    assert (await submit(client, A))[0] == 200


async def test_upstream_cap(
    make_proxy: ProxyFactory, held: FakeComfyUI, backend: dict[str, Any]
) -> None:
    client = await make(make_proxy, held, backend, quota=5, upstream_max_pending=2)
    assert (await submit(client, A))[0] == 200
    assert (await submit(client, B))[0] == 200
    status, body, headers = await submit(client, C)
    assert status == 429, body
    assert body["error"]["type"] == "queue_full"
    assert "GPU queue is full" in body["error"]["message"]
    assert headers["Retry-After"] == str(body["error"]["retry_after"])
    assert refusals(client, "upstream_cap") == 1
    assert refusals(client, "user_quota") == 0


async def test_a_refused_submission_leaves_nothing_owned_or_counted(
    make_proxy: ProxyFactory, held: FakeComfyUI, backend: dict[str, Any]
) -> None:
    """The reservation and the ownership record are written together (one round trip); each
    is undone when the other refuses."""
    client = await make(make_proxy, held, backend, quota=1)
    store, quota = client.app[OWNERSHIP], quota_of(client)
    alice, bob = comfy_user_id("alice"), comfy_user_id("bob")
    first, over = str(uuid.uuid4()), str(uuid.uuid4())
    assert (await submit(client, A, prompt_id=first))[0] == 200
    # Over the quota: the record written alongside the reservation is forgotten.
    assert_queue_full(*await submit(client, A, prompt_id=over), have=1)
    assert await store.prompt(over) is None
    assert await store.prompts_of(alice) == {first}
    # A taken id: the reservation made alongside is released, the record stays Alice's.
    status, answer, _ = await submit(client, B, prompt_id=first)
    assert (status, answer["error"]["type"]) == (400, "prompt_id_taken")
    assert await quota.store.in_use(f"u:{bob}") == 0
    assert await store.prompts_of(bob) == set()
    record = await store.prompt(first)
    assert record is not None
    assert record.owner == alice
    assert (await submit(client, B))[0] == 200  # Bob's slot is free
    assert sum(1 for r in held.received if r.path.endswith("/prompt")) == 2


# -- isolation off: the quota guard counts the prompt itself ----------------------------------


async def test_quota_without_isolation(
    make_proxy: ProxyFactory, held: FakeComfyUI, backend: dict[str, Any]
) -> None:
    client = await make(make_proxy, held, backend, quota=1, isolation=False)
    ws = await client.ws_connect("/ws?clientId=plain", headers=A)
    status, answer, _ = await submit(client, A, "plain")
    assert status == 200, answer
    sent = [json.loads(r.body) for r in held.received if r.path.endswith("/prompt")]
    assert sent[-1]["prompt_id"] == answer["prompt_id"]  # minted by the proxy, used by ComfyUI
    assert_queue_full(*await submit(client, A, "plain"), have=1)
    own_id = "my-own-id"
    assert_queue_full(*await submit(client, A, "plain", prompt_id=own_id), have=1)

    done = await finish_next(held)
    await ended_on(ws, done)
    status, answer, _ = await submit(client, A, "plain", prompt_id=own_id)
    assert (status, answer["prompt_id"]) == (200, own_id)  # the client's own id is kept
    # A counted id cannot be queued twice (that would queue a second prompt for one slot).
    status, answer, _ = await submit(client, B, prompt_id=own_id)
    assert (status, answer["error"]["type"]) == (400, "prompt_id_taken")
    await ws.close()


# -- replicas and Redis failures --------------------------------------------------------------


async def test_two_proxies_sharing_redis_never_exceed_the_quota(
    make_proxy: ProxyFactory, held: FakeComfyUI, redis_url: str
) -> None:
    backend = {"redis": {"url": redis_url}}
    first = await make(make_proxy, held, backend, quota=3)
    second = await make(make_proxy, held, backend, quota=3)
    results = await asyncio.gather(*(submit(first if i % 2 else second, A) for i in range(24)))
    statuses = sorted(s for s, _, _ in results)
    assert statuses == [200] * 3 + [429] * 21
    # The gateway queue holds what ComfyUI has no room for: let everything accepted run.
    accepted = {a["prompt_id"] for s, a, _ in results if s == 200}
    held.release()
    await held.queue.wait_for(lambda: accepted <= set(held.queue.history))
    pending = sum(1 for r in held.received if r.path.endswith("/prompt"))
    assert pending == 3  # nothing over quota reached ComfyUI


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_redis_failure_follows_the_submit_fail_mode(
    make_proxy: ProxyFactory, held: FakeComfyUI, fail_mode: str
) -> None:
    closed = ["submit"] if fail_mode == "closed" else []
    client = await make(make_proxy, held, {}, quota=1, fail_closed=closed)
    quota = quota_of(client)
    dead = connect(RedisSettings(url="redis://127.0.0.1:1/0"))  # as the app configures it
    assert dead is not None
    quota.store = RedisQuotaStore(dead.client, 60.0)
    try:
        status, body, headers = await submit(client, A)
    finally:
        await dead.close()
    if fail_mode == "closed":
        assert status == 503, body
        assert body["error"]["type"] == "queue_quota_unavailable"
        assert int(headers["Retry-After"]) >= 1
        assert not [r for r in held.received if r.path.endswith("/prompt")]
    else:
        assert status == 200, body  # let through, uncounted
    errors = client.app[METRICS].redis_errors.labels("queue_quota", "connection")
    assert errors._value.get() == 1
