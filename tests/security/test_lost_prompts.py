"""Issue 14, item 3: a lost-prompt verdict shared by replicas (Redis) is answered to its owner
only. User B asks the replica that did not decide it about A's lost prompt: history, jobs,
lists, cancel; B learns nothing (as of an unknown id) and no instance is asked on B's behalf."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.upstream.pool import POOL
from tests.integration.lost_replicas import replicas
from tests.integration.multi_support import (
    ALICE,
    A,
    B,
    Fakes,
    fakes,
    get_json,
    multi_proxy,
    place,
    relayed,
)

__all__ = ["fakes", "multi_proxy", "replicas"]  # fixtures used by name


async def test_b_learns_nothing_of_as_lost_prompt_on_the_other_replica(
    replicas: Callable[..., Any], fakes: Fakes
) -> None:
    r1, r2 = await replicas()
    fakes[1].hold()
    prompt = await place(r1.client, fakes[1], ALICE)
    await fakes[1].wait_held()
    name = fakes.name(1)
    await r1.lost.refresh(r1.upstream(name))
    await fakes[1].stop()
    for replica in (r1, r2):
        replica.client.app[POOL].report_failure(replica.upstream(name), "refused")
    await r1.lost.instance_lost(r1.upstream(name))
    await r2.lost.sync()
    assert (await get_json(r2.client, f"/history/{prompt}", A))[prompt]  # A sees it failed
    for fake in fakes:
        fake.received.clear()

    assert await get_json(r2.client, f"/history/{prompt}", B) == {}
    async with r2.client.get(f"/api/jobs/{prompt}", headers=B) as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "Job not found"}
    assert prompt not in await get_json(r2.client, "/history", B)
    listed = await get_json(r2.client, "/api/jobs?status=failed", B)
    assert prompt not in [j["id"] for j in listed["jobs"]]
    async with r2.client.post(f"/api/jobs/{prompt}/cancel", headers=B) as resp:
        assert (await resp.json()) == {"cancelled": False}
    # B cannot erase A's verdict either: deleting it from history is a no-op for B.
    async with r2.client.post("/history", headers=B, json={"delete": [prompt]}) as resp:
        assert resp.status == 200
    assert (await get_json(r1.client, f"/history/{prompt}", A))[prompt]
    for i in (0, 2):  # nothing about A's prompt was asked of an instance for B
        about = [r for r in relayed(fakes[i]) if prompt in r.raw_path or prompt.encode() in r.body]
        assert not about
