"""B's ``/history`` and ``/api/jobs`` are built from B's own prompts (proxy.isolation.own_views):
B never sees A's entries in any paging combination, and B's views cost what B owns, not what
everyone has in ComfyUI (asserted on what the fake ComfyUI received, not on timings)."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.comfy import views
from proxy.comfy.records import PromptRecord
from proxy.isolation import own_views
from proxy.observability.metrics import METRICS
from proxy.principal import comfy_user_id
from proxy.tenancy.namespaces import upstream_client_id
from proxy.tenancy.ownership import OWNERSHIP
from proxy.upstream.pool import POOL
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.support import get_json, post
from tests.support.backends import STATES, proxy_over
from tests.support.gateway_queue import settled

Client = TestClient[Any, Any]
ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
A, B, ADMIN = bearer("alice"), bearer("bob"), bearer("admin", ("admin",))
_colors = itertools.count(0x200000, 7919)

PAGING = [None, "-3", "-1", "0", "1", "2", "4", "50"]


@pytest.fixture(params=STATES)
async def client(
    request: pytest.FixtureRequest, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> Client:
    return await proxy_over(request, make_proxy, fake_comfy)


@pytest.fixture
async def direct(fake_comfy: FakeComfyUI) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(fake_comfy.url) as session:
        yield session


async def submit(client: Client, direct: aiohttp.ClientSession, owner: str) -> str:
    """A prompt of ``owner``, recorded and submitted as the submit guard does."""
    prompt_id = str(uuid.uuid4())
    namespaced = upstream_client_id(owner, "tab")
    record = PromptRecord(prompt_id, owner, client.app[POOL].pick().name, namespaced, time.time())
    assert await client.app[OWNERSHIP].record_prompt(record)
    color = next(_colors) % 0xFFFFFF
    body = {
        "prompt": {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
            },
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        },
        "prompt_id": prompt_id,
        "client_id": namespaced,
        "extra_data": {"create_time": int(time.time() * 1000)},
    }
    async with direct.post("/prompt", json=body) as resp:
        assert resp.status == 200, await resp.text()
    return prompt_id


def others_entries(fake: FakeComfyUI, count: int) -> set[str]:
    """``count`` finished prompts of nobody the proxy knows, in ComfyUI's history."""
    return set(fake.queue.preload_history(count))


def query(**params: str | None) -> str:
    return "&".join(f"{k}={v}" for k, v in params.items() if v is not None)


async def test_b_never_sees_a_in_any_history_window(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    """Every ``max_items``/``offset`` combination: B's answer is exactly ComfyUI's paging of a
    history holding B's entries only, and names none of A's prompts."""
    a_ids: list[str] = []
    b_ids: list[str] = []
    for owner in (ALICE, BOB, ALICE, ALICE, BOB, BOB, ALICE, BOB):
        (a_ids if owner == ALICE else b_ids).append(await submit(client, direct, owner))
    await fake_comfy.wait_idle()
    b_history = {k: v for k, v in fake_comfy.queue.history.items() if k in b_ids}
    for max_items, offset in itertools.product(PAGING, PAGING):
        path = f"/api/history?{query(max_items=max_items, offset=offset)}"
        answer = await get_json(client, path, B)
        expected = views.history_window(
            b_history,
            int(max_items) if max_items is not None else None,
            int(offset) if offset is not None else None,
        )
        assert list(answer) == list(expected), path
        assert answer == expected, path
        assert not set(answer) & set(a_ids), path
    # A's entries by id answer as unknown ones; A still sees its own.
    assert await get_json(client, f"/history/{a_ids[0]}", B) == {}
    assert list(await get_json(client, "/history?max_items=2", A)) == a_ids[-2:]


async def test_b_never_sees_a_in_any_jobs_page(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    """B's jobs: ComfyUI's own list filtered to B (totals of B's only) for every filter, sort
    and page; none of A's jobs, running or pending ones included."""
    b_ids = [await submit(client, direct, BOB) for _ in range(3)]
    a_done = await submit(client, direct, ALICE)
    await fake_comfy.wait_idle()
    fake_comfy.hold()
    a_run = await submit(client, direct, ALICE)
    await fake_comfy.wait_held()
    b_ids.append(await submit(client, direct, BOB))  # pending behind A's
    a_pending = await submit(client, direct, ALICE)
    queries = [
        "",
        "status=pending",
        "status=in_progress,pending",
        "status=completed,failed,cancelled&limit=2",
        "sort_order=asc&limit=1&offset=1",
        "sort_by=execution_duration&limit=3",
        "limit=2&offset=3",
        "offset=10",
        "workflow_id=none",
    ]
    for raw in queries:
        answer = await get_json(client, f"/api/jobs?{raw}", B)
        q = views.jobs_query(f"/api/jobs?{raw}")
        assert q is not None
        whole = views.without_query_params(f"/api/jobs?{raw}", ("limit", "offset"))
        async with direct.get(whole) as resp:
            everything = await resp.json()
        expected = views.filter_jobs(everything, set(b_ids), q.offset, q.limit)
        assert answer == expected, raw
        assert not {j["id"] for j in answer["jobs"]} & {a_done, a_run, a_pending}, raw
    async with client.get("/api/jobs?status=nope", headers=B) as resp:
        assert resp.status == 400  # ComfyUI's own refusal
    fake_comfy.release()
    await fake_comfy.wait_idle()


async def test_b_views_cost_what_b_owns(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    """2,000 entries of others in ComfyUI: B's /history?max_items=20 and /api/jobs read B's
    prompts one by one, never ComfyUI's whole history or job list."""
    others = others_entries(fake_comfy, 2000)
    b_ids = [await submit(client, direct, BOB) for _ in range(3)]
    await settled(client, fake_comfy)
    fake_comfy.reset()
    answer = await get_json(client, "/api/history?max_items=20", B)
    assert list(answer) == b_ids
    jobs = await get_json(client, "/api/jobs?limit=20", B)
    assert {j["id"] for j in jobs["jobs"]} == set(b_ids)
    assert jobs["pagination"]["total"] == 3
    asked = sorted(r.raw_path for r in fake_comfy.received)
    assert asked == sorted(
        [*(f"/api/history/{p}" for p in b_ids), *(f"/api/jobs/{p}" for p in b_ids)]
    )
    assert not any(p in others for r in fake_comfy.received for p in r.raw_path.split("/"))

    # Someone without a prompt: history costs nothing upstream, jobs one single-job page.
    fake_comfy.reset()
    assert await get_json(client, "/api/history?max_items=20", A) == {}
    assert await get_json(client, "/api/history", A) == {}
    empty = await get_json(client, "/api/jobs?limit=5&offset=2", A)
    assert empty == {
        "jobs": [],
        "pagination": {"offset": 2, "limit": 5, "total": 0, "has_more": False},
    }
    assert [r.raw_path for r in fake_comfy.received] == ["/api/jobs?limit=1"]


async def test_work_per_request_is_bounded(
    make_proxy: ProxyFactory, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    """More than ``isolation.view_lookups`` prompts to read: no lookup at all, one full read,
    filtered as before (and counted); a window within the bound reads only its prompts."""
    client: Client = await make_proxy(fake_comfy.url, token=None, isolation={"view_lookups": 2})
    others_entries(fake_comfy, 50)
    b_ids = [await submit(client, direct, BOB) for _ in range(4)]
    a_id = await submit(client, direct, ALICE)
    await settled(client, fake_comfy)
    fake_comfy.reset()
    assert list(await get_json(client, "/api/history?max_items=2", B)) == b_ids[-2:]
    assert len(fake_comfy.received) == 2
    fake_comfy.reset()
    assert list(await get_json(client, "/api/history?max_items=3", B)) == b_ids[-3:]
    assert [r.raw_path for r in fake_comfy.received] == ["/api/history"]
    page = await get_json(client, "/api/jobs?limit=10", B)
    assert {j["id"] for j in page["jobs"]} == set(b_ids)
    assert a_id not in str(page)
    assert [r.raw_path for r in fake_comfy.received][-1] == "/api/jobs"
    registry = client.app[METRICS].registry
    labels = {"upstream": "*", "kind": "view_full_read"}
    assert registry.get_sample_value("comfygate_upstream_errors_total", labels) == 2


async def test_deleted_and_vanished_prompts_leave_the_index(
    client: Client,
    direct: aiohttp.ClientSession,
    fake_comfy: FakeComfyUI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B's delete drops the ids from B's index (A's ids stay A's: B cannot touch them); a job
    ComfyUI no longer knows leaves it after two reads that missed it."""
    monkeypatch.setattr(own_views, "PRUNE_AFTER_SECONDS", 0.0)
    store = client.app[OWNERSHIP]
    a1 = await submit(client, direct, ALICE)
    b1, b2, b3 = [await submit(client, direct, BOB) for _ in range(3)]
    await fake_comfy.wait_idle()
    assert await post(client, "/api/history", B, {"delete": [b1, a1]}) == (200, b"")
    assert await store.indexed("bob", newest_first=False, count=9) == []  # not B's name
    assert await store.indexed(BOB, newest_first=False, count=9) == [b2, b3]
    assert await store.indexed(ALICE, newest_first=False, count=9) == [a1]
    assert a1 in fake_comfy.queue.history
    fake_comfy.queue.history.pop(b2)  # gone from ComfyUI (an admin's clear, its trim)
    for _ in range(2):
        page = await get_json(client, "/api/jobs", B)
        assert [j["id"] for j in page["jobs"]] == [b3]
    assert await store.indexed(BOB, newest_first=False, count=9) == [b3]
    assert await store.prompts_of(BOB) >= {b1, b2, b3}  # ownership itself is unchanged
