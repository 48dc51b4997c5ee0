"""Metrics through the real app in front of the fake ComfyUI: what a workload counts, the
upstream probe, and ``/metrics`` on the main port behind a token or a network list."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from proxy.limits.quota.service import QUEUE_QUOTA
from proxy.monitoring.generation import GENERATION
from proxy.monitoring.upstreams import UPSTREAM_PROBE, ProbeResult
from proxy.multi.registry import REGISTRY
from proxy.observability.metrics import METRICS
from tests.conftest import ProxyFactory, bearer, make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.support import run_until_done, sample

ALICE = bearer("alice")
WORKFLOW = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "m"}},
}


@pytest.mark.parametrize("state", ["memory", "redis"])
async def test_a_workload_is_counted(
    state: str, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, request: pytest.FixtureRequest
) -> None:
    redis_section = {"url": request.getfixturevalue("redis_url")} if state == "redis" else {}
    client = await make_proxy(fake_comfy.url, token=None, redis=redis_section)
    upstream = fake_comfy.url.removeprefix("http://")

    ws = await client.ws_connect("/ws?clientId=tab", headers=ALICE)
    assert (await ws.receive_json())["type"] == "status"
    resp = await client.post(
        "/prompt", json={"prompt": WORKFLOW, "client_id": "tab"}, headers=ALICE
    )
    assert resp.status == 200, await resp.text()
    prompt_id = (await resp.json())["prompt_id"]
    events = await run_until_done(ws, prompt_id)
    image = next(e for e in events if e["type"] == "executed")["data"]["output"]["images"][0]
    view = await client.get("/view", params={**image}, headers=ALICE)
    assert view.status == 200
    await view.read()

    forged = make_token("mallory", ("admin",))[:-4] + "AAAA"
    assert (await client.get("/queue", headers={"Authorization": f"Bearer {forged}"})).status == 401
    assert (await client.get("/queue")).status == 401
    other = {"filename": "x.png", "subfolder": "users/someone-else", "type": "output"}
    assert (await client.get("/view", params=other, headers=ALICE)).status in (403, 404)
    await ws.close()
    await client.app[GENERATION].drain()

    assert (
        sample(client, "comfygate_http_requests_total", rule="prompt", method="POST", status="200")
        == 1
    )
    assert (
        sample(client, "comfygate_http_requests_total", rule="ws", method="GET", status="101") == 1
    )
    assert sample(client, "comfygate_http_request_duration_seconds_count", rule="prompt") == 1
    assert sample(client, "comfygate_http_proxy_duration_seconds_count", rule="prompt") == 1
    assert sample(client, "comfygate_upstream_duration_seconds_count", upstream=upstream) >= 2
    assert sample(client, "comfygate_http_request_bytes_total", rule="prompt") > 0
    assert sample(client, "comfygate_http_response_bytes_total", rule="view") > 0

    assert sample(client, "comfygate_prompts_submitted_total", role="user") == 1
    assert sample(client, "comfygate_prompts_finished_total", role="user", outcome="completed") == 1
    assert sample(client, "comfygate_prompt_queue_wait_seconds_count", upstream=upstream) == 1
    assert sample(client, "comfygate_prompt_execution_seconds_count", upstream=upstream) == 1
    assert sample(client, "comfygate_outputs_served_total", type="output") == 1

    assert sample(client, "comfygate_auth_failures_total", reason="token_bad_signature") == 1
    assert sample(client, "comfygate_auth_failures_total", reason="unauthenticated") == 1

    assert sample(client, "comfygate_websocket_frames_total", direction="down", kind="text") > 3
    assert sample(client, "comfygate_websocket_bytes_total", direction="down", kind="text") > 100
    assert sample(client, "comfygate_websocket_connections") == 0  # closed again


async def test_a_prompt_without_a_socket_is_counted_from_history(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    """An API client that polls: whoever notices the prompt left the queue (the queue-quota
    reconciler) hands it over, and ComfyUI's history says how it ended, once."""
    client = await make_proxy(fake_comfy.url, token=None, redis={"url": redis_url})
    upstream = fake_comfy.url.removeprefix("http://")
    resp = await client.post("/prompt", json={"prompt": WORKFLOW}, headers=ALICE)
    prompt_id = (await resp.json())["prompt_id"]
    await fake_comfy.wait_idle()
    tracker = client.app[GENERATION]
    tracker.prompt_left_queue(prompt_id, upstream)
    tracker.prompt_left_queue(prompt_id, upstream)  # noticed twice (another worker): once
    tracker.prompt_left_queue("never-queued", upstream)  # deleted before it ran
    await tracker.drain()

    assert sample(client, "comfygate_prompts_finished_total", role="user", outcome="completed") == 1
    assert (
        sample(client, "comfygate_prompts_finished_total", role="unknown", outcome="cancelled") == 1
    )
    assert sample(client, "comfygate_prompt_execution_seconds_count", upstream=upstream) == 1
    assert sample(client, "comfygate_prompt_queue_wait_seconds_count", upstream=upstream) == 1


async def test_the_quota_reconciler_hands_over_prompts_without_a_socket(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """End to end: the queue-quota reconciler notices the prompt left ComfyUI's queue."""
    client = await make_proxy(fake_comfy.url, token=None, rate_limits={"quota_poll_seconds": 0.05})
    resp = await client.post("/prompt", json={"prompt": WORKFLOW}, headers=ALICE)
    assert resp.status == 200
    await fake_comfy.wait_idle()
    reconciler = client.app[QUEUE_QUOTA].reconciler
    await reconciler.wait_polls(reconciler.polls + 2)  # one after the prompt ended
    await client.app[GENERATION].drain()
    assert sample(client, "comfygate_prompts_finished_total", role="user", outcome="completed") == 1


async def test_upstream_probe_runs_in_the_background(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, metrics={"upstream_poll_seconds": 0.05})
    name = fake_comfy.url.removeprefix("http://")
    probe = client.app[UPSTREAM_PROBE]
    recorded: list[ProbeResult] = []
    twice = asyncio.Event()
    original = probe.record

    def record(upstream: str, result: ProbeResult) -> None:
        original(upstream, result)
        recorded.append(result)
        if len(recorded) >= 2:
            twice.set()

    probe.record = record
    await asyncio.wait_for(twice.wait(), 10)
    assert all(r.up and r.queue_remaining == 0 for r in recorded)
    assert sample(client, "comfygate_upstream_up", upstream=name) == 1


async def test_upstream_probe_sees_up_down_and_queue_depth(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    # No background probe: each one is run here. Room in ComfyUI for the three prompts: the
    # gateway queue lets them through at once (it would hold the third: its own gauge,
    # comfygate_scheduler_queue_depth, counts that one; this one counts ComfyUI's queue).
    client = await make_proxy(fake_comfy.url, scheduler={"max_pending": 2})
    name = fake_comfy.url.removeprefix("http://")
    probe = client.app[UPSTREAM_PROBE]

    await probe.probe_all()
    assert sample(client, "comfygate_upstream_up", upstream=name) == 1
    assert sample(client, "comfygate_upstream_probe_duration_seconds_count", upstream=name) == 1

    fake_comfy.hold()
    for _ in range(3):
        assert (await client.post("/prompt", json={"prompt": WORKFLOW})).status == 200
    await fake_comfy.wait_held()
    await probe.probe_all()
    assert sample(client, "comfygate_upstream_queue_prompts", upstream=name, state="running") == 1
    assert sample(client, "comfygate_upstream_queue_prompts", upstream=name, state="pending") == 2
    # An exact split from GET /queue (the quota reconciler's) wins over the inferred one.
    probe.queue_observed(name, pending=1, running=2)
    await probe.probe_all()
    assert sample(client, "comfygate_upstream_queue_prompts", upstream=name, state="running") == 2
    fake_comfy.release()
    await fake_comfy.wait_idle()

    await fake_comfy.stop()
    await probe.probe_all()
    assert sample(client, "comfygate_upstream_up", upstream=name) == 0
    failures = sample(
        client, "comfygate_upstream_probe_failures_total", upstream=name, kind="refused"
    )
    assert failures == 1


async def test_several_instances_get_the_gauges_from_the_health_checks(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Path
) -> None:
    """One probe per instance: with the registry, its health checks feed the gauges (the
    metrics run no loop of their own); a stopped instance reads down at the next check."""
    second = FakeComfyUI(root=tmp_path / "second")
    await second.start()
    try:
        client = await make_proxy(
            fake_comfy.url,
            upstream={"urls": [fake_comfy.url, second.url], "lost_watch_seconds": 0},
            metrics={"upstream_poll_seconds": 5},
        )
        assert not client.app[UPSTREAM_PROBE].running  # the checks probe, not the metrics
        names = [u.removeprefix("http://") for u in (fake_comfy.url, second.url)]
        # registry_context ran one round of checks at startup.
        for name in names:
            assert sample(client, "comfygate_upstream_up", upstream=name) == 1
            count = sample(client, "comfygate_upstream_probe_duration_seconds_count", upstream=name)
            assert count == 1

        await second.stop()
        await client.app[REGISTRY].health.check_all()
        assert sample(client, "comfygate_upstream_up", upstream=names[0]) == 1
        assert sample(client, "comfygate_upstream_up", upstream=names[1]) == 0
        refused = sample(
            client, "comfygate_upstream_probe_failures_total", upstream=names[1], kind="refused"
        )
        assert refused == 1
    finally:
        await second.stop()


async def test_metrics_on_the_main_port_need_the_token(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    metrics = {"on_main_port": True, "bearer_token": "scrape-me", "path": "/internal-metrics"}
    client = await make_proxy(fake_comfy.url, token=None, metrics=metrics)
    assert (await client.get("/queue", headers=ALICE)).status == 200

    refused = await client.get("/internal-metrics", headers={"Accept": "text/html"})
    assert refused.status == 401  # not a login redirect: scrapers are not browsers
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await refused.json())["error"]["type"] == "metrics_unauthorized"
    assert (await client.get("/internal-metrics", headers=ALICE)).status == 401

    ok = await client.get("/internal-metrics", headers={"Authorization": "Bearer scrape-me"})
    assert ok.status == 200
    assert ok.headers["Content-Type"].startswith("text/plain")
    text = await ok.text()
    assert 'comfygate_http_requests_total{method="GET",rule="queue",status="200"} 1.0' in text
    assert 'comfygate_rejections_total{type="metrics_unauthorized"} 2.0' in text
    assert not fake_comfy.received or all(
        r.path != "/internal-metrics" for r in fake_comfy.received
    )


async def test_metrics_on_the_main_port_by_network(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    inside = await make_proxy(
        fake_comfy.url,
        token=None,
        metrics={"on_main_port": True, "allowed_networks": ["127.0.0.0/8"]},
    )
    assert (await inside.get("/metrics")).status == 200
    outside = await make_proxy(
        fake_comfy.url,
        token=None,
        metrics={"on_main_port": True, "allowed_networks": ["10.0.0.0/8"]},
    )
    refused = await outside.get("/metrics")
    assert refused.status == 403
    assert (await refused.json())["error"]["type"] == "metrics_forbidden"
    # the exposition of a fresh app is valid too (no request counted twice by the route)
    assert b"comfygate_build_info" in generate_latest(outside.app[METRICS].registry)
