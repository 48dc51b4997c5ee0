"""Merged views over three instances: ``GET /history``, ``/queue``, ``/api/jobs``, ``/prompt``,
filtered per user exactly as with one instance; a slow instance degrades an answer, it does not
block it; with one instance nothing is fanned out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.observability.metrics import METRICS
from proxy.tenancy.ownership import OWNERSHIP
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.multi_support import (
    ADMIN,
    ALICE,
    BOB,
    A,
    B,
    Client,
    Fakes,
    connect,
    ended,
    fakes,
    get_json,
    multi_proxy,
    place,
    receive_until,
    relayed,
    requests_to,
    saving_graph,
)

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name


async def run_on(client: Client, fake: FakeComfyUI, owner: str, **kwargs: Any) -> str:
    """A prompt on ``fake``, run to its end."""
    prompt_id = await place(client, fake, owner, **kwargs)
    await fake.wait_idle()
    return prompt_id


async def test_history_is_merged_in_completion_order_and_filtered_per_user(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    a1 = await run_on(client, fakes[0], ALICE)
    b1 = await run_on(client, fakes[2], BOB)
    a2 = await run_on(client, fakes[1], ALICE)
    a3 = await run_on(client, fakes[2], ALICE)

    assert list(await get_json(client, "/api/history", A)) == [a1, a2, a3]
    assert list(await get_json(client, "/history", B)) == [b1]
    assert list(await get_json(client, "/history", ADMIN)) == [a1, b1, a2, a3]
    # Paging applies to the caller's merged list, with ComfyUI's semantics.
    assert list(await get_json(client, "/history?max_items=2", A)) == [a2, a3]
    assert list(await get_json(client, "/history?max_items=1&offset=0", A)) == [a1]
    assert list(await get_json(client, "/history?offset=2", A)) == [a3]
    assert list(await get_json(client, "/history?max_items=2", ADMIN)) == [a2, a3]
    assert list(await get_json(client, "/history?max_items=2&offset=1", ADMIN)) == [b1, a2]
    # Every instance was asked; B never sees A's entries, whichever instance has them.
    for fake in fakes:
        assert requests_to(fake, "GET", "/history")
    for prompt_id in (a1, a2, a3):
        assert await get_json(client, f"/history/{prompt_id}", B) == {}


async def test_queue_is_merged_and_others_entries_redacted(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    for fake in fakes:
        fake.hold()
    running = [await place(client, fakes[0], ALICE), await place(client, fakes[1], BOB)]
    for fake in fakes[0], fakes[1]:
        await fake.wait_held()
    a_pending = await place(client, fakes[0], ALICE)
    b_pending = await place(client, fakes[2], BOB)
    await fakes[2].wait_held()  # b_pending runs there (held): the third running one

    admin = await get_json(client, "/queue", ADMIN)
    assert {item[1] for item in admin["queue_running"]} == {*running, b_pending}
    assert [item[1] for item in admin["queue_pending"]] == [a_pending]

    seen_by_a = await get_json(client, "/api/queue", A)
    assert len(seen_by_a["queue_running"]) == 3
    mine = {item[1] for item in seen_by_a["queue_running"] + seen_by_a["queue_pending"]}
    assert {running[0], a_pending} <= mine
    assert running[1] not in mine
    assert b_pending not in mine
    for item in seen_by_a["queue_running"]:
        if item[1] != running[0]:
            assert item[2:] == [{}, {}, []]  # someone else's: a placeholder
    for fake in fakes:
        fake.release()
    for fake in fakes:
        await fake.wait_idle()


async def test_jobs_are_merged_sorted_paginated_and_filtered(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    base = int(time.time() * 1000)
    a_old = await run_on(client, fakes[1], ALICE, created=base + 1)
    b1 = await run_on(client, fakes[0], BOB, created=base + 2)
    a_mid = await run_on(client, fakes[2], ALICE, created=base + 3)
    a_new = await run_on(client, fakes[0], ALICE, created=base + 4)

    jobs = await get_json(client, "/api/jobs", A)
    assert [j["id"] for j in jobs["jobs"]] == [a_new, a_mid, a_old]
    assert jobs["pagination"] == {"offset": 0, "limit": None, "total": 3, "has_more": False}
    page = await get_json(client, "/api/jobs?limit=1&offset=1", A)
    assert [j["id"] for j in page["jobs"]] == [a_mid]
    assert page["pagination"] == {"offset": 1, "limit": 1, "total": 3, "has_more": True}
    ascending = await get_json(client, "/api/jobs?sort_order=asc", A)
    assert [j["id"] for j in ascending["jobs"]] == [a_old, a_mid, a_new]
    assert [j["id"] for j in (await get_json(client, "/api/jobs", B))["jobs"]] == [b1]
    # Admins: the whole merged list, each instance asked for no more than the page needs.
    admin = await get_json(client, "/api/jobs?limit=2", ADMIN)
    assert [j["id"] for j in admin["jobs"]] == [a_new, a_mid]
    assert admin["pagination"] == {"offset": 0, "limit": 2, "total": 4, "has_more": True}
    # ComfyUI's own 400 for a bad parameter.
    async with client.get("/api/jobs?status=nope", headers=A) as resp:
        assert resp.status == 400
        assert "error" in await resp.json()
    # Job details and files follow the prompt (sticky): B gets the same 404 as for unknown.
    detail = await get_json(client, f"/api/jobs/{a_mid}", A)
    assert detail["id"] == a_mid
    async with client.get(f"/api/jobs/{a_mid}", headers=B) as resp:
        assert resp.status == 404


async def test_prompt_queue_remaining_is_the_sum(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    for fake in fakes:
        fake.hold()
    await place(client, fakes[0], ALICE)
    await place(client, fakes[0], ALICE)
    await place(client, fakes[2], BOB)
    await fakes[0].wait_held()
    await fakes[2].wait_held()
    assert await get_json(client, "/prompt", A) == {"exec_info": {"queue_remaining": 3}}
    assert await get_json(client, "/api/prompt", B) == {"exec_info": {"queue_remaining": 3}}
    for fake in fakes:
        fake.release()
        await fake.wait_idle()
    assert await get_json(client, "/prompt", A) == {"exec_info": {"queue_remaining": 0}}


@pytest.fixture
async def black_hole() -> AsyncIterator[str]:
    """An "instance" that accepts connections and never answers (a hung ComfyUI)."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the proxy gives up and closes

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_a_slow_instance_degrades_the_answer_without_blocking_it(
    make_proxy: ProxyFactory, fakes: Fakes, black_hole: str
) -> None:
    client: Client = await make_proxy(
        fakes.urls[0],
        token=None,
        upstream={
            "urls": (fakes.urls[0], black_hole, fakes.urls[1]),
            "merge_timeout_seconds": 0.3,
            "lost_watch_seconds": 0,
            "read_timeout_seconds": 1.0,  # the hung instance's capability read at startup
        },
    )
    a1 = await run_on(client, fakes[0], ALICE)
    a2 = await run_on(client, fakes[1], ALICE)
    started = time.perf_counter()
    async with client.get("/history", headers=ADMIN) as resp:  # merged: every instance
        assert resp.status == 200
        assert list(await resp.json()) == [a1, a2]
        assert resp.headers["Comfygate-Degraded"] == black_hole.removeprefix("http://")
    assert time.perf_counter() - started < 3  # the hung instance cost its timeout, no more
    assert await get_json(client, "/prompt", A) == {"exec_info": {"queue_remaining": 0}}
    assert (await get_json(client, "/queue", A))["queue_running"] == []
    assert [j["id"] for j in (await get_json(client, "/api/jobs", ADMIN))["jobs"]] == [a2, a1]
    # A tenant's views ask only the instances of their own prompts: complete, not degraded.
    async with client.get("/history", headers=A) as resp:
        assert list(await resp.json()) == [a1, a2]
        assert "Comfygate-Degraded" not in resp.headers
    assert [j["id"] for j in (await get_json(client, "/api/jobs", A))["jobs"]] == [a2, a1]
    registry = client.app[METRICS].registry
    labels = {"upstream": black_hole.removeprefix("http://"), "kind": "merge_timeout"}
    assert (registry.get_sample_value("comfygate_upstream_errors_total", labels) or 0) >= 4


async def test_one_instance_is_proxied_directly(make_proxy: ProxyFactory, fakes: Fakes) -> None:
    """A single instance: no fan-out, no merge; ComfyUI's answer and paging untouched."""
    client: Client = await make_proxy(fakes.urls[0], token=None)
    a1 = await run_on(client, fakes[0], ALICE)
    fakes[0].reset()
    async with client.get("/history?max_items=1", headers=ADMIN) as resp:
        assert resp.status == 200
        assert list(await resp.json()) == [a1]
        assert "Comfygate-Degraded" not in resp.headers
    (sent,) = requests_to(fakes[0], "GET", "/history")
    assert sent.raw_path == "/history?max_items=1"  # ComfyUI pages it itself
    async with client.get("/prompt", headers=A) as resp:
        assert await resp.read() == b'{"exec_info": {"queue_remaining": 0}}'  # its own bytes
    for fake in fakes[1], fakes[2]:
        assert not relayed(fake)


async def test_end_to_end_with_placement(multi_proxy: Callable[..., Any], fakes: Fakes) -> None:
    """Prompts submitted through the proxy (placement spreads them): each user's socket hears
    its own prompts from every instance, history and files follow each prompt."""
    client: Client = await multi_proxy()
    a_ws, _ = await connect(client, A, "tab-a")
    b_ws, _ = await connect(client, B, "tab-b")
    submitted: dict[str, list[str]] = {"a": [], "b": []}
    turns = (("a", A, "tab-a"), ("b", B, "tab-b"), ("a", A, "tab-a")) * 2
    for n, (who, headers, tab) in enumerate(turns):
        # Distinct prefixes: each instance numbers its files on its own (see docs/multi-gpu.md).
        body = {"prompt": saving_graph(f"e2e-{n}"), "client_id": tab}
        async with client.post("/prompt", headers=headers, json=body) as resp:
            assert resp.status == 200, await resp.text()
            submitted[who].append((await resp.json())["prompt_id"])
    ownership = client.app[OWNERSHIP]
    records = [await ownership.prompt(p) for p in submitted["a"] + submitted["b"]]
    used = {r.upstream for r in records if r is not None}
    assert len(used) >= 2  # spread over instances
    for ws, mine in ((a_ws, submitted["a"]), (b_ws, submitted["b"])):
        for prompt_id in mine:
            await receive_until(ws, ended(prompt_id))
    for fake in fakes:
        await fake.wait_idle()

    a_history = await get_json(client, "/history", A)
    assert set(a_history) == set(submitted["a"])
    assert set(await get_json(client, "/history", B)) == set(submitted["b"])
    for prompt_id in submitted["a"]:
        record = await ownership.prompt(prompt_id)
        assert record is not None
        (image,) = a_history[prompt_id]["outputs"]["2"]["images"]
        holder = next(f for f in fakes if fakes.name(fakes.items.index(f)) == record.upstream)
        holder.reset()
        query = f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type=output"
        async with client.get(query, headers=A) as resp:
            assert resp.status == 200
        assert requests_to(holder, "GET", "/view")  # served by the instance that made it
        async with client.get(query, headers=B) as resp:
            assert resp.status == 404
    await a_ws.close()
    await b_ws.close()
