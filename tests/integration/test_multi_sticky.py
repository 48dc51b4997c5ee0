"""Sticky routing over three instances: everything about a prompt reaches the instance that runs
it (history entry, its files, interrupt, queue and history deletes, jobs calls); settings and
user data stay on the home instance."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.multi.dispatch import MULTI
from proxy.multi.sticky import FileLocations
from proxy.tenancy.namespaces import FOLDERS
from tests.integration.multi_support import (
    ADMIN,
    ALICE,
    BOB,
    A,
    B,
    Client,
    Fakes,
    fakes,
    get_json,
    multi_proxy,
    place,
    post,
    relayed,
    requests_to,
    saving_graph,
)

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name


def reset(fakes: Fakes) -> None:
    for fake in fakes:
        fake.reset()


async def test_history_entry_goes_to_the_prompts_instance(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    a1 = await place(client, fakes[1], ALICE)
    await fakes[1].wait_idle()
    reset(fakes)
    assert list(await get_json(client, f"/api/history/{a1}", A)) == [a1]
    assert len(requests_to(fakes[1], "GET", f"/api/history/{a1}")) == 1
    assert not relayed(fakes[0])
    assert not relayed(fakes[2])
    assert await get_json(client, f"/history/{a1}", B) == {}  # others' ids: as unknown

    # A prompt the proxy never saw (submitted to an instance directly): whoever has it.
    body = {"prompt": saving_graph("direct"), "prompt_id": "00000000-direct"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fakes[2].url}/prompt", json=body) as resp,
    ):
        assert resp.status == 200
    await fakes[2].wait_idle()
    assert list(await get_json(client, "/history/00000000-direct", ADMIN)) == ["00000000-direct"]
    assert await get_json(client, "/history/no-such-prompt", ADMIN) == {}


async def test_outputs_are_viewed_on_the_instance_that_made_them(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    # As the submit guard rewrites it: into A's folder (only what is there is A's).
    prefix = f"{client.app[FOLDERS].of(ALICE)}/sticky"
    a1 = await place(client, fakes[2], ALICE, prompt=saving_graph(prefix))
    await fakes[2].wait_idle()
    entry = (await get_json(client, f"/history/{a1}", A))[a1]
    (image,) = entry["outputs"]["2"]["images"]
    query = f"/view?filename={image['filename']}&type=output&subfolder={image['subfolder']}"
    reset(fakes)
    async with client.get(query, headers=A) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/png"
    assert len(requests_to(fakes[2], "GET", "/view")) == 1
    assert not requests_to(fakes[0], "GET", "/view")

    # A proxy that does not know where the file is (another replica, a restart): the
    # instance that has it is found with one HEAD to each, then remembered.
    client.app[MULTI].locations = FileLocations()
    reset(fakes)
    for _ in range(2):
        async with client.get(query, headers=A) as resp:
            assert resp.status == 200
    assert [r.method for r in relayed(fakes[2]) if r.path == "/view"] == ["HEAD", "GET", "GET"]
    assert [r.method for r in relayed(fakes[0]) if r.path == "/view"] == ["HEAD"]
    async with client.get(query, headers=B) as resp:
        assert resp.status == 404  # isolation first: B cannot even make the proxy look

    # Input files (uploads, shared inputs) are on every instance: home serves them.
    reset(fakes)
    async with client.get("/view?filename=example.png&type=input", headers=ADMIN) as resp:
        assert resp.status == 200
    assert requests_to(fakes[0], "GET", "/view")
    assert not relayed(fakes[1])
    assert not relayed(fakes[2])


async def test_interrupt_reaches_the_instance_running_the_prompt(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    fakes[1].hold()
    a1 = await place(client, fakes[1], ALICE)
    await fakes[1].wait_held()
    reset(fakes)
    assert await post(client, "/api/interrupt", A, {"prompt_id": a1}) == (200, b"")
    (sent,) = requests_to(fakes[1], "POST", "/api/interrupt")
    assert json.loads(sent.body) == {"prompt_id": a1}
    assert not relayed(fakes[0])
    assert not relayed(fakes[2])

    # Without an id: the caller's running prompt, found on whichever instance runs it.
    reset(fakes)
    assert await post(client, "/interrupt", A) == (200, b"")
    (sent,) = requests_to(fakes[1], "POST", "/interrupt")
    assert json.loads(sent.body) == {"prompt_id": a1}
    assert not requests_to(fakes[0], "POST", "/interrupt")
    # B has nothing running: a no-op that reaches no instance.
    reset(fakes)
    assert await post(client, "/interrupt", B) == (200, b"")
    assert await post(client, "/interrupt", B, {"prompt_id": a1}) == (200, b"")
    assert not any(requests_to(f, "POST", "/interrupt") for f in fakes)
    # An admin's bare interrupt stops whatever runs, as ComfyUI's does: every instance.
    assert await post(client, "/interrupt", ADMIN) == (200, b"")
    assert all(requests_to(f, "POST", "/interrupt") for f in fakes)
    fakes[1].release()
    await fakes[1].wait_idle()


async def test_queue_and_history_deletes_are_split_per_instance(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    for fake in fakes:
        fake.hold()
    for fake in fakes:
        await place(client, fake, BOB)  # each instance runs one of B's and holds
        await fake.wait_held()
    p0 = await place(client, fakes[0], ALICE)
    p2 = await place(client, fakes[2], ALICE)
    p2b = await place(client, fakes[2], ALICE)
    b_pending = await place(client, fakes[1], BOB)
    reset(fakes)

    assert await post(client, "/queue", A, {"delete": [p0, p2, b_pending]}) == (200, b"")
    assert [json.loads(r.body) for r in requests_to(fakes[0], "POST", "/queue")] == [
        {"delete": [p0]}
    ]
    assert [json.loads(r.body) for r in requests_to(fakes[2], "POST", "/queue")] == [
        {"delete": [p2]}
    ]
    assert not relayed(fakes[1])  # B's prompt there is not A's to delete
    assert [item[1] for item in fakes[2].queue.queue] == [p2b]
    assert [item[1] for item in fakes[1].queue.queue] == [b_pending]

    # A clear by an admin: every instance.
    reset(fakes)
    assert await post(client, "/queue", ADMIN, {"clear": True}) == (200, b"")
    assert all(
        json.loads(requests_to(f, "POST", "/queue")[0].body) == {"clear": True} for f in fakes
    )
    assert not any(f.queue.queue for f in fakes)

    for fake in fakes:
        fake.release()
        await fake.wait_idle()
    h0 = next(iter(fakes[0].queue.history))
    h1 = next(iter(fakes[1].queue.history))
    reset(fakes)
    assert await post(client, "/history", B, {"delete": [h0, h1]}) == (200, b"")
    assert [json.loads(r.body) for r in requests_to(fakes[0], "POST", "/history")] == [
        {"delete": [h0]}
    ]
    assert [json.loads(r.body) for r in requests_to(fakes[1], "POST", "/history")] == [
        {"delete": [h1]}
    ]
    assert not relayed(fakes[2])
    assert h0 not in fakes[0].queue.history


async def test_jobs_calls_follow_the_prompt(multi_proxy: Callable[..., Any], fakes: Fakes) -> None:
    client: Client = await multi_proxy()
    for fake in fakes:
        fake.hold()
    running = [await place(client, f, BOB) for f in fakes]
    for fake in fakes:
        await fake.wait_held()
    a0 = await place(client, fakes[0], ALICE)
    a1 = await place(client, fakes[1], ALICE)
    a2 = await place(client, fakes[2], ALICE)
    reset(fakes)

    status, body = await post(client, f"/api/jobs/{a1}/cancel", A)
    assert (status, json.loads(body)) == (200, {"cancelled": True})
    assert requests_to(fakes[1], "POST", f"/api/jobs/{a1}/cancel")
    assert not relayed(fakes[0])
    assert not relayed(fakes[2])

    reset(fakes)
    status, body = await post(client, "/api/jobs/cancel", A, {"job_ids": [a0, a2, running[1]]})
    assert (status, json.loads(body)) == (200, {"cancelled": True})
    assert json.loads(requests_to(fakes[0], "POST", "/api/jobs/cancel")[0].body) == {
        "job_ids": [a0]
    }
    assert json.loads(requests_to(fakes[2], "POST", "/api/jobs/cancel")[0].body) == {
        "job_ids": [a2]
    }
    assert not relayed(fakes[1])
    assert not any(f.queue.queue for f in fakes)
    status, body = await post(client, "/api/jobs/cancel", A, {"job_ids": ["nope"]})
    assert status == 400
    assert json.loads(body)["invalid_ids"] == ["nope"]
    for fake in fakes:
        fake.release()
        await fake.wait_idle()


async def test_settings_and_user_data_live_on_the_home_instance(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    assert await post(client, "/api/settings/Comfy.Theme", A, "dark") == (200, b"")
    assert await get_json(client, "/api/settings", A) == {"Comfy.Theme": "dark"}
    async with client.post(
        "/api/userdata/workflows%2Fa.json?overwrite=true", headers=A, data=b"{}"
    ) as resp:
        assert resp.status == 200
    assert await get_json(client, "/api/userdata?dir=workflows", A) == ["a.json"]
    async with client.get("/api/userdata/user.css", headers=A) as resp:
        assert resp.status == 404  # asked of home, which has none
    assert len(relayed(fakes[0])) >= 5
    assert not relayed(fakes[1])
    assert not relayed(fakes[2])


async def test_home_can_be_another_instance(multi_proxy: Callable[..., Any], fakes: Fakes) -> None:
    client: Client = await multi_proxy(upstream={"home": fakes.name(2)})
    assert await get_json(client, "/api/settings", A) == {}
    # Without --multi-user, A's settings are read from A's own folder (proxy.userdata).
    assert relayed(fakes[2])
    assert not relayed(fakes[0])
    assert not relayed(fakes[1])
