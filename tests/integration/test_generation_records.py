"""What one ``POST /prompt`` costs in Redis for the generation metrics and the queue quota (issue
5's throughput target), without losing what they count.

- With isolation on, a submission writes no generation record: the ownership record written
  before forwarding carries the role and time, and another worker counts the prompt's end
  (once) with the submitter's role read from there.
- With isolation off, the generation record is still written on submission.
- The quota's "accepted" marks are written off the response path, batched; the reconciler of
  the process waits for them before its snapshot, so no accepted prompt is missed.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from proxy.limits.quota.redis_store import PREFIX
from proxy.limits.quota.service import QUEUE_QUOTA
from proxy.monitoring.generation import GENERATION
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.support import graph, sample

ALICE = bearer("alice")
GEN_PREFIX = "comfygate:gen:"


async def test_isolated_submission_writes_no_generation_record(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    section = {"url": redis_url}
    worker_a = await make_proxy(fake_comfy.url, token=None, redis=section)
    worker_b = await make_proxy(fake_comfy.url, token=None, redis=section)
    upstream = fake_comfy.url.removeprefix("http://")

    resp = await worker_a.post("/prompt", json={"prompt": graph()}, headers=ALICE)
    assert resp.status == 200, await resp.text()
    prompt_id = (await resp.json())["prompt_id"]
    await worker_a.app[GENERATION].drain()
    client = redis.Redis.from_url(redis_url)
    try:
        assert await client.exists(GEN_PREFIX + prompt_id) == 0
        assert sample(worker_a, "comfygate_prompts_submitted_total", role="user") == 1

        # The end is noticed by both workers (worker B never saw the submission): counted once,
        # with the submitter's role from the ownership record.
        await fake_comfy.wait_idle()
        worker_b.app[GENERATION].prompt_left_queue(prompt_id, upstream)
        await worker_b.app[GENERATION].drain()
        worker_a.app[GENERATION].prompt_left_queue(prompt_id, upstream)
        await worker_a.app[GENERATION].drain()
        assert await client.exists(GEN_PREFIX + prompt_id) == 1  # the end's claim
    finally:
        await client.aclose()

    finished = {"role": "user", "outcome": "completed"}
    assert sample(worker_b, "comfygate_prompts_finished_total", **finished) == 1
    assert sample(worker_a, "comfygate_prompts_finished_total", **finished) == 0
    assert sample(worker_b, "comfygate_prompt_queue_wait_seconds_count", upstream=upstream) == 1


async def test_without_isolation_the_generation_record_is_written(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    client = await make_proxy(
        fake_comfy.url, token=None, redis={"url": redis_url}, isolation={"enabled": False}
    )
    resp = await client.post("/prompt", json={"prompt": graph()}, headers=ALICE)
    assert resp.status == 200, await resp.text()
    prompt_id = (await resp.json())["prompt_id"]
    await client.app[GENERATION].drain()
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        record = await store.hgetall(GEN_PREFIX + prompt_id)
    finally:
        await store.aclose()
    assert record["role"] == "user"
    assert float(record["submitted"]) > 0


async def test_acceptances_are_batched_and_settled_before_a_snapshot(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        redis={"url": redis_url},
        rate_limits={"quota_poll_seconds": 3600},  # polled by hand below
        # Room in ComfyUI for all four: the gateway queue lets each through at once (a held
        # prompt is marked accepted when it is released, once ComfyUI accepts it).
        scheduler={"max_pending": 3},
    )
    quota = client.app[QUEUE_QUOTA]
    upstream = fake_comfy.url.removeprefix("http://")
    fake_comfy.hold()  # the prompts stay queued: none may be released
    answers = await asyncio.gather(
        *(client.post("/prompt", json={"prompt": graph()}, headers=ALICE) for _ in range(4))
    )
    assert [r.status for r in answers] == [200] * 4
    ids = {(await r.json())["prompt_id"] for r in answers}

    await quota.settle()
    snapshot = await quota.store.snapshot(upstream, 3600)  # a grace no entry is past
    assert set(snapshot.candidates) == ids  # every one marked accepted
    reconciler = quota.reconciler
    assert reconciler is not None
    assert await reconciler.poll_once() == 0  # all listed by ComfyUI: still counted
    marked = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for prompt_id in ids:
            assert await marked.hget(f"{PREFIX}p:{prompt_id}", "accepted") == "1"
    finally:
        await marked.aclose()
    fake_comfy.release()
