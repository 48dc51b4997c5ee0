"""A real Prometheus (Debian's ``prometheus`` package) scrapes a real ``comfygate serve``: after a
scripted workload (a prompt run and viewed, a refused token, a rate-limit hit) its query API
returns the series the dashboards and alerts are written against."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.proxy_process import proxy_process
from tests.redis_server import free_port

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SCRAPE_TOKEN = "prometheus-scrape-token-0123456789"
QUERY_TIMEOUT = 60.0
WORKFLOW = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}},
}


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None
    )
    if found is None:
        message = "prometheus missing (Debian package prometheus; .ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    """Prometheus scraping ``target`` (host:port, bearer token) every 250 ms; yields its URL."""
    binary = prometheus_binary()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "250ms", "scrape_timeout": "200ms"},
                "scrape_configs": [
                    {
                        "job_name": "comfygate",
                        "authorization": {"credentials": SCRAPE_TOKEN},
                        "static_configs": [{"targets": [target]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:  # waiting for a child process to open its port
                if process.returncode is not None:
                    raise RuntimeError(f"prometheus exited with {process.returncode}")
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{url}/-/ready") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def query(session: aiohttp.ClientSession, url: str, promql: str) -> float | None:
    """The value of an instant query (one series, or a sum), None when it has no result."""
    async with session.get(f"{url}/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def run_prompt(client: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """Submit a workflow while watching the socket; the first output image."""
    async with client.ws_connect(f"{base}/ws?clientId=tab") as ws:
        assert json.loads((await ws.receive()).data)["type"] == "status"
        async with client.post(
            f"{base}/prompt", json={"prompt": WORKFLOW, "client_id": "tab"}
        ) as r:
            assert r.status == 200, await r.text()
            prompt_id = (await r.json())["prompt_id"]
        image: dict[str, Any] = {}
        while True:
            msg = json.loads((await ws.receive(timeout=10)).data)
            data = msg.get("data", {})
            if msg["type"] == "executed":
                image = data["output"]["images"][0]
            done = msg["type"] == "executing" and data.get("node") is None
            if done and data.get("prompt_id") == prompt_id:
                return image


async def test_prometheus_scrapes_the_workload(fake_comfy: FakeComfyUI, tmp_path: Path) -> None:
    alice = {"Authorization": f"Bearer {make_token('alice', ('user',))}"}
    bob = {"Authorization": f"Bearer {make_token('bob', ('user',))}"}
    env = {
        "COMFYGATE_METRICS__BEARER_TOKEN": SCRAPE_TOKEN,
        "COMFYGATE_METRICS__UPSTREAM_POLL_SECONDS": "0.25",
        # a small read allowance, so that the workload can hit it
        "COMFYGATE_RATE_LIMITS__DEFAULT": json.dumps({"read": {"rate": "3/hour", "burst": 3}}),
    }
    async with (
        proxy_process(fake_comfy.url, **env) as proxy,
        prometheus(tmp_path, f"127.0.0.1:{proxy.metrics_port}") as prom,
        aiohttp.ClientSession() as session,
    ):
        # The scrape is protected: without the token the listener refuses.
        async with session.get(proxy.metrics_url) as resp:
            assert resp.status == 401

        # The workload.
        async with aiohttp.ClientSession(headers=alice) as client:
            image = await run_prompt(client, proxy.url)
            async with client.get(f"{proxy.url}/view", params=image) as resp:
                assert resp.status == 200
                await resp.read()
        forged = make_token("mallory", ("admin",))[:-4] + "AAAA"
        async with session.get(
            f"{proxy.url}/queue", headers={"Authorization": f"Bearer {forged}"}
        ) as resp:
            assert resp.status == 401
        statuses = []
        for _ in range(5):
            async with session.get(f"{proxy.url}/queue", headers=bob) as resp:
                statuses.append(resp.status)
        assert statuses.count(429) == 2, statuses

        expected = {
            'up{job="comfygate"}': 1,
            'comfygate_http_requests_total{rule="prompt",method="POST",status="200"}': 1,
            'comfygate_http_requests_total{rule="queue",status="429"}': 2,
            'sum(comfygate_ratelimit_decisions_total{outcome="limited"})': 2,
            'comfygate_auth_failures_total{reason="token_bad_signature"}': 1,
            'comfygate_prompts_submitted_total{role="user"}': 1,
            'comfygate_prompts_finished_total{role="user",outcome="completed"}': 1,
            "sum(comfygate_prompt_execution_seconds_count)": 1,
            'comfygate_outputs_served_total{type="output"}': 1,
            "max(comfygate_upstream_up)": 1,
            "comfygate_websocket_connections": 0,
            "count(comfygate_build_info)": 1,
        }
        seen: dict[str, float | None] = {}
        try:
            async with asyncio.timeout(QUERY_TIMEOUT):
                while True:  # each scrape is 250 ms apart: ask until the last one is in
                    seen = {q: await query(session, prom, q) for q in expected}
                    if seen == expected:
                        break
                    await asyncio.sleep(0.25)
        except TimeoutError:
            pytest.fail(f"Prometheus never returned the expected values: {seen}")

        # The buckets make a quantile (over everything so far: the workload may predate the
        # first scrape, so a rate() could still be empty here).
        p99 = await query(
            session,
            prom,
            "histogram_quantile(0.99, sum by (le) "
            "(comfygate_http_request_duration_seconds_bucket))",
        )
        assert p99 is not None
        assert 0 < p99 <= 10
