"""With Redis down, a tenant's reads degrade to answers that show nothing of anyone (issue 15).

Whose prompt is whose lives in Redis. While it cannot answer, a non-admin's ``/queue`` is the
queue with every item a placeholder, ``/history`` and ``/api/jobs`` are empty, each with a
``Comfygate-Degraded: state`` header, a log line and a metric; never a 503, never A's entries
to B. Redis is a real redis-server of the test alone, stopped and started again.
"""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.support import sample
from tests.redis_server import RedisServer

FAST_REDIS = {"socket_timeout_seconds": 0.5, "connect_timeout_seconds": 0.5, "retries": 0}
A, B = bearer("alice"), bearer("bob")


def graph(color: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "d"}},
    }


async def test_reads_degrade_safely_while_redis_is_down(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, own_redis: RedisServer
) -> None:
    client = await make_proxy(
        fake_comfy.url, token=None, redis={"url": own_redis.url, **FAST_REDIS}
    )
    async with client.post("/prompt", json={"prompt": graph(0x111111)}, headers=A) as resp:
        assert resp.status == 200, await resp.text()
        done = (await resp.json())["prompt_id"]
    await fake_comfy.wait_idle()
    fake_comfy.hold()
    running = []
    for color in (0x121212, 0x131313):
        async with client.post("/prompt", json={"prompt": graph(color)}, headers=A) as resp:
            running.append((await resp.json())["prompt_id"])
    await fake_comfy.wait_held()

    own_redis.stop()
    try:
        for who in (A, B):
            async with client.get("/queue", headers=who) as resp:
                assert resp.status == 200
                assert resp.headers["Comfygate-Degraded"] == "state"
                queue = await resp.json()
            items = queue["queue_running"] + queue["queue_pending"]
            assert len(items) == 2  # positions and length stay
            assert all(item[2:] == [{}, {}, []] for item in items)
            assert not {item[1] for item in items} & {*running, done}
            for path in ("/history", "/history?max_items=5", f"/history/{done}", "/api/history"):
                async with client.get(path, headers=who) as resp:
                    assert resp.status == 200, path
                    assert resp.headers["Comfygate-Degraded"] == "state"
                    assert await resp.json() == {}
            async with client.get("/api/jobs?limit=5", headers=who) as resp:
                assert resp.status == 200
                assert resp.headers["Comfygate-Degraded"] == "state"
                jobs = await resp.json()
            assert jobs["jobs"] == []
            assert jobs["pagination"]["total"] == 0
            # What cannot be answered safely still says so (writes, a job by id).
            async with client.get(f"/api/jobs/{done}", headers=who) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["type"] == "state_unavailable"
            async with client.post("/prompt", json={"prompt": graph(0x141414)}, headers=who) as r:
                assert r.status == 503
        counted = {
            view: sample(client, "comfygate_redis_errors_total", op=f"view_{view}", kind="degraded")
            for view in ("queue", "history", "jobs")
        }
        assert counted == {"queue": 2, "history": 8, "jobs": 2}
    finally:
        own_redis.start()
    fake_comfy.release()
    await fake_comfy.wait_idle()
    # Redis back (empty: no persistence): B still sees nothing of A's, with no degraded header.
    async with client.get("/history", headers=B) as resp:
        assert resp.status == 200
        assert "Comfygate-Degraded" not in resp.headers
        assert done not in json.dumps(await resp.json())
