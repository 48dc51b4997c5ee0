"""The dashboard and the alerts against real data: ``comfygate serve --workers 2`` in front of
the fake ComfyUI, with Redis, scraped by a real Prometheus (Debian's) through the scrape job of
deploy/prometheus/prometheus.yml, after a scripted workload (prompts run to completion over a
WebSocket, outputs viewed, a bad token, a viewer submitting, a foreign origin, a client over
its rate limit). Every dashboard query must be accepted by Prometheus, and every panel but a
few that need rarer events (listed) must show data. The alert rules load and stay quiet."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.deploy.files import DASHBOARD, concrete_query, tool
from tests.deploy.stack import WorkloadResult, generate, monitored_stack, refusals
from tests.redis_server import RedisServer

RATE_WINDOW = "30s"
"""``$__rate_interval`` here: the whole run, scraped every second."""
PROMPTS = 3
MAY_BE_EMPTY = {
    "5xx ratio",  # no 5xx in the workload
    "5xx ratio by route rule",
    "Request and probe errors",  # nothing fails
    "Redis errors",
    "Instance breaker",  # exists only with several ComfyUI instances
    "Policy and quota refusals",  # no policy or quota refusal in the workload
}


@dataclass
class Observed:
    workload: WorkloadResult
    panels: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)
    """Panel title (unique) -> one result vector per target."""
    rules: list[dict[str, Any]] = field(default_factory=list)
    statuses: dict[str, float] = field(default_factory=dict)


def substitute(expr: str) -> str:
    return concrete_query(expr, RATE_WINDOW)


async def observe(work: Path, redis_url: str) -> Observed:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    limits = {"read": {"rate": "5/second", "burst": 10}}
    env = {
        "COMFYGATE_RATE_LIMITS__DEFAULT": json.dumps(limits),
        # A loaded CI machine must not turn Redis latency into refusals (the fail modes).
        "COMFYGATE_RATE_LIMITS__REDIS_BUDGET_MS": "2000",
    }
    async with monitored_stack(work, redis_url, workers=2, env=env) as stack:
        workload = WorkloadResult()
        # Two rounds with scrapes between: a counter's first sample is rate()'s baseline, so
        # only increments after it show (as in steady traffic).
        for _round in range(2):
            await generate(stack, "alice", PROMPTS, workload)
            await refusals(stack, workload)
            await stack.wait_scraped_after(time.time())
        observed = Observed(workload)
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                result = await stack.query(substitute(target["expr"]))
                observed.panels.setdefault(panel["title"], []).append(result)
        observed.rules = [
            rule
            for group in (await stack.api("/api/v1/rules"))["groups"]
            for rule in group["rules"]
        ]
        by_status = await stack.query(
            'sum by (status) (comfygate_http_requests_total{job="comfygate"})'
        )
        observed.statuses = {r["metric"]["status"]: float(r["value"][1]) for r in by_status}
    return observed


@pytest.fixture(scope="module")
def observed(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Observed:
    tool("prometheus", "apt-get install prometheus; .ci/run installs it")
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()  # no rate-limit or ownership state left by earlier tests
    client.close()
    work = tmp_path_factory.mktemp("monitored")
    return asyncio.run(observe(work, redis_server.url))


def test_the_workload_did_what_the_panels_show(observed: Observed) -> None:
    assert observed.workload.prompts == 2 * PROMPTS
    assert observed.workload.views == 2 * PROMPTS
    for status in (200, 401, 403, 429):
        assert observed.workload.statuses.get(status), observed.workload.statuses
    # What Prometheus scraped agrees with what the clients saw (both workers summed).
    for status, count in observed.workload.statuses.items():
        assert observed.statuses.get(str(status), 0) >= count, (status, observed.statuses)


def test_every_panel_has_data(observed: Observed) -> None:
    empty = {
        title
        for title, results in observed.panels.items()
        if not any(results) and title not in MAY_BE_EMPTY
    }
    assert not empty, f"panels without data after the workload: {sorted(empty)}"


def test_key_panels_show_the_workload(observed: Observed) -> None:
    def labels(title: str, label: str) -> set[str]:
        return {
            series["metric"].get(label, "")
            for result in observed.panels[title]
            for series in result
            if float(series["value"][1]) > 0
        }

    assert {"401", "403", "429"} <= labels("Responses by status", "status")
    assert "limited" in labels("Rate-limit decisions", "outcome")
    assert "token_malformed" in labels("Authentication failures by reason", "reason")
    assert labels("Prompts finished by outcome", "outcome") == {"completed"}
    assert labels("Prompts submitted by role", "role") == {"user"}
    assert "output" in labels("Outputs served by type", "type")
    (workers,) = observed.panels["Workers"][0]
    assert float(workers["value"][1]) == 2


def test_prometheus_loads_the_alerts_and_none_fires(observed: Observed) -> None:
    assert len(observed.rules) >= 8
    for rule in observed.rules:
        assert rule["health"] == "ok", rule
        assert rule["state"] == "inactive", f"{rule['name']} is {rule['state']} on a healthy run"
