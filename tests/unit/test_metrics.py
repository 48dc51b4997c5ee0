"""The collectors and what feeds them, without a server: request recording, the generation
tracker, the per-user counter, the scrape access check, and the exposition format
(``promtool check metrics``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import types
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from pydantic import ValidationError

from proxy.monitoring.exposition import in_networks, refusal
from proxy.monitoring.generation import (
    GenerationTracker,
    MemoryPromptStats,
    history_outcome,
)
from proxy.observability.metrics import Metrics, method_label, role_label
from proxy.observability.users import UserCollector, UserCounter, merged_counts
from proxy.principal import Principal
from proxy.routes import OTHER, RuleName, rule
from proxy.settings.metrics import MetricsSettings
from proxy.state import RequestContext

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def request(method: str = "GET", **query: str) -> Any:
    return types.SimpleNamespace(method=method, query=query)


def context(rule_name: RuleName, **fields: Any) -> RequestContext:
    ctx = RequestContext(request_id="r")
    ctx.rule = rule(rule_name, "/x") if rule_name != "other" else OTHER
    for key, val in fields.items():
        setattr(ctx, key, val)
    return ctx


# -- labels ------------------------------------------------------------------------------------


def test_labels_stay_bounded() -> None:
    assert method_label("GET") == "GET"
    assert method_label("BREW") == "other"  # any token is a method to aiohttp
    assert role_label(frozenset()) == "none"
    assert role_label(frozenset({"user"})) == "user"
    assert role_label(frozenset({"user", "power"})) == "power+user"


# -- the request path --------------------------------------------------------------------------


def test_request_finished_records_the_split_durations_and_bytes() -> None:
    metrics = Metrics()
    ctx = context("history", upstream="u:1", upstream_seconds=0.25, bytes_in=10, bytes_out=300)
    metrics.request_finished(request(), ctx, 200, 1.0)
    metrics.request_finished(request("BREW"), ctx, 405, 0.5)

    assert (
        value(metrics, "comfygate_http_requests_total", rule="history", method="GET", status="200")
        == 1
    )
    assert (
        value(
            metrics, "comfygate_http_requests_total", rule="history", method="other", status="405"
        )
        == 1
    )
    assert value(metrics, "comfygate_http_request_duration_seconds_sum", rule="history") == 1.5
    assert value(metrics, "comfygate_http_proxy_duration_seconds_sum", rule="history") == 1.0
    assert value(metrics, "comfygate_upstream_duration_seconds_count", upstream="u:1") == 2
    assert value(metrics, "comfygate_http_request_bytes_total", rule="history") == 20
    assert value(metrics, "comfygate_http_response_bytes_total", rule="history") == 600


def test_a_websocket_counts_as_a_request_but_not_as_a_duration() -> None:
    metrics = Metrics()
    ctx = context("ws", upstream="u:1", bytes_out=10_000)
    metrics.request_finished(request(), ctx, 101, 3600.0)
    assert (
        value(metrics, "comfygate_http_requests_total", rule="ws", method="GET", status="101") == 1
    )
    assert value(metrics, "comfygate_http_request_duration_seconds_count", rule="ws") == 0
    assert value(metrics, "comfygate_http_response_bytes_total", rule="ws") == 0


@pytest.mark.parametrize(
    ("guard", "reason", "metric"),
    [
        ("auth", "token_expired", "comfygate_auth_failures_total"),
        ("origin", "origin_not_allowed", "comfygate_csrf_refusals_total"),
        ("csrf", "csrf_failed", "comfygate_csrf_refusals_total"),
        ("role", "forbidden_role", "comfygate_role_refusals_total"),
        ("isolation", "invalid_path", "comfygate_isolation_refusals_total"),
    ],
)
def test_guard_refusals_count_by_guard_and_reason(guard: str, reason: str, metric: str) -> None:
    metrics = Metrics()
    ctx = context("prompt", rejected_by=guard, error_type=reason)
    metrics.request_finished(request("POST"), ctx, 403, 0.001)
    assert value(metrics, metric, reason=reason) == 1
    # a refused submission is not a submission
    assert value(metrics, "comfygate_prompts_submitted_total", role="none") == 0


def test_login_page_refusals() -> None:
    metrics = Metrics()
    for status in (401, 401, 429, 403):
        metrics.request_finished(request("POST"), context("login"), status, 0.001)
    assert value(metrics, "comfygate_auth_failures_total", reason="login_failed") == 2
    assert value(metrics, "comfygate_auth_failures_total", reason="login_throttled") == 1
    assert value(metrics, "comfygate_csrf_refusals_total", reason="login_csrf") == 1


def test_outputs_served_by_type() -> None:
    metrics = Metrics()
    for kind in ("output", "temp", "../etc"):
        ctx = context("view", path="/view")
        metrics.request_finished(request(type=kind), ctx, 200, 0.001)
    metrics.request_finished(request(), context("view", path="/view"), 200, 0.001)
    metrics.request_finished(request(), context("view", path="/view"), 404, 0.001)
    metrics.request_finished(request(), context("view", path="/view_metadata/x"), 200, 0.001)
    assert value(metrics, "comfygate_outputs_served_total", type="output") == 2
    assert value(metrics, "comfygate_outputs_served_total", type="temp") == 1
    assert value(metrics, "comfygate_outputs_served_total", type="other") == 1


def test_submission_without_tracker_counts_by_role() -> None:
    metrics = Metrics()
    principal = Principal("alice", frozenset({"user"}), "bearer")
    metrics.request_finished(request("POST"), context("prompt", principal=principal), 200, 0.01)
    metrics.request_finished(request("POST"), context("prompt", principal=principal), 400, 0.01)
    assert value(metrics, "comfygate_prompts_submitted_total", role="user") == 1


# -- generation --------------------------------------------------------------------------------


def event(kind: str, prompt_id: str, **data: Any) -> str:
    return json.dumps({"type": kind, "data": {"prompt_id": prompt_id, **data}})


USER = frozenset({"user"})


async def test_generation_from_relayed_events_is_counted_once() -> None:
    metrics = Metrics()
    tracker = GenerationTracker(metrics, MemoryPromptStats())
    tracker.submitted("p1", USER, "u:1")
    await tracker.drain()
    tracker.observe_frame(event("execution_start", "p1", timestamp=1_000_000), USER, "u:1")
    tracker.observe_frame(event("progress", "p1", value=1, max=2), USER, "u:1")  # no marker
    tracker.observe_frame('{"type": "execution_success", broken', USER, "u:1")
    tracker.observe_frame(event("execution_success", "p1", timestamp=1_002_500), USER, "u:1")
    # the same end seen by a second socket (a broadcast variant), e.g. an admin's
    tracker.observe_frame(event("execution_success", "p1", timestamp=1_002_500), USER, "u:1")
    await tracker.drain()

    assert value(metrics, "comfygate_prompts_submitted_total", role="user") == 1
    assert value(metrics, "comfygate_prompts_finished_total", role="user", outcome="completed") == 1
    assert value(metrics, "comfygate_prompt_execution_seconds_sum", upstream="u:1") == 2.5
    assert value(metrics, "comfygate_prompt_queue_wait_seconds_count", upstream="u:1") == 1


async def test_generation_outcomes_and_unknown_submissions() -> None:
    metrics = Metrics()
    tracker = GenerationTracker(metrics, MemoryPromptStats())
    admin = frozenset({"admin"})
    tracker.observe_frame(event("execution_start", "p2", timestamp=5), admin, "u:1")
    tracker.observe_frame(event("execution_error", "p2", timestamp=9), admin, "u:1")
    tracker.observe_frame(event("execution_interrupted", "p3", timestamp=9), admin, "u:1")
    await tracker.drain()
    # not submitted through this proxy: no queue wait, the socket's role
    assert value(metrics, "comfygate_prompts_finished_total", role="admin", outcome="failed") == 1
    assert (
        value(metrics, "comfygate_prompts_finished_total", role="admin", outcome="interrupted") == 1
    )
    assert value(metrics, "comfygate_prompt_queue_wait_seconds_count", upstream="u:1") == 0
    assert value(metrics, "comfygate_prompt_execution_seconds_count", upstream="u:1") == 1


def test_history_outcome() -> None:
    def entry(status: str, *messages: tuple[str, int]) -> dict[str, Any]:
        return {
            "status": {
                "status_str": status,
                "completed": status == "success",
                "messages": [[kind, {"prompt_id": "p", "timestamp": ts}] for kind, ts in messages],
            }
        }

    assert history_outcome(
        entry("success", ("execution_start", 100), ("execution_success", 400))
    ) == ("completed", 100, 400)
    assert history_outcome(
        entry("error", ("execution_start", 1), ("execution_interrupted", 3))
    ) == ("interrupted", 1, 3)
    assert history_outcome(entry("error", ("execution_error", 7))) == ("failed", None, 7)
    assert history_outcome({"status": {"status_str": "error"}}) == ("failed", None, None)
    assert history_outcome({}) == ("completed", None, None)


# -- the per-user counter ----------------------------------------------------------------------


def test_user_counter_exports_only_the_top_n(tmp_path: Path) -> None:
    counter = UserCounter(2)
    for user, times in (("alice", 5), ("bob", 3), ("carol", 1)):
        for _ in range(times):
            counter.add(user)
    registry = CollectorRegistry()
    registry.register(UserCollector(2, counter=counter))
    assert registry.get_sample_value("comfygate_user_requests_total", {"user": "alice"}) == 5
    assert registry.get_sample_value("comfygate_user_requests_total", {"user": "bob"}) == 3
    assert registry.get_sample_value("comfygate_user_requests_total", {"user": "carol"}) is None

    # several workers: each publishes its counts, the listener sums them
    data = counter.snapshot()
    assert data is not None
    UserCounter.write(tmp_path, data)
    (tmp_path / "users_999999.json").write_bytes(b'{"carol": 10, "alice": 1}')
    (tmp_path / "users_1.json").write_bytes(b"{not json")  # being replaced: skipped
    assert merged_counts(tmp_path) == {"alice": 6, "bob": 3, "carol": 11}
    assert counter.snapshot() is None  # nothing new since


# -- access to /metrics ------------------------------------------------------------------------


def scrape(authorization: str = "") -> Any:
    return types.SimpleNamespace(headers={"Authorization": authorization} if authorization else {})


def test_scrape_access() -> None:
    open_ = MetricsSettings()
    assert refusal(open_, scrape(), "203.0.113.9") is None  # loopback listener: bind is the guard

    token = MetricsSettings(bearer_token="s3cret")
    assert refusal(token, scrape(), "127.0.0.1") == "token"
    assert refusal(token, scrape("Bearer wrong"), "127.0.0.1") == "token"
    assert refusal(token, scrape("Basic s3cret"), "127.0.0.1") == "token"
    assert refusal(token, scrape("Bearer s3cret"), "127.0.0.1") is None
    assert refusal(token, scrape("bearer  s3cret"), "127.0.0.1") is None

    nets = MetricsSettings.model_validate({"allowed_networks": ["10.0.0.0/8", "fd00::/8"]})
    assert refusal(nets, scrape(), "10.1.2.3") is None
    assert refusal(nets, scrape(), "::ffff:10.1.2.3") is None  # dual-stack listener
    assert refusal(nets, scrape(), "fd00::5") is None
    assert refusal(nets, scrape(), "192.168.1.1") == "network"
    assert not in_networks("", nets.allowed_networks)  # a unix socket peer


def test_metrics_settings_refuse_a_public_main_port() -> None:
    with pytest.raises(ValidationError, match="on_main_port needs bearer_token"):
        MetricsSettings(on_main_port=True)
    assert MetricsSettings(on_main_port=True, bearer_token="x").on_main_port
    assert MetricsSettings(on_main_port=False, enabled=False).enabled is False
    with pytest.raises(ValidationError, match="plain absolute path"):
        MetricsSettings(path="metrics")
    assert MetricsSettings(path="/internal/metrics/").path == "/internal/metrics"


# -- the exposition ----------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool missing (Debian package prometheus; .ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_exposition_passes_promtool() -> None:
    metrics = Metrics()
    ctx = context("prompt", upstream="u:1", upstream_seconds=0.1, bytes_in=10, bytes_out=10)
    metrics.request_finished(request("POST"), ctx, 200, 0.2)
    metrics.request_finished(request(), context("view", path="/view"), 200, 0.001)
    metrics.ws_open.inc()
    metrics.ws_frames.labels("down", "preview").inc()
    metrics.ws_bytes.labels("down", "preview").inc(1000)
    metrics.upstream_up.labels("u:1").set(1)
    metrics.upstream_queue.labels("u:1", "pending").set(3)
    metrics.prompts_finished.labels("user", "completed").inc()
    metrics.prompt_execution.labels("u:1").observe(12.0)
    metrics.ratelimit_decisions.labels("submit", "limited").inc()
    counter = UserCounter(3)
    counter.add("alice")
    metrics.registry.register(UserCollector(3, counter=counter))
    exposition = generate_latest(metrics.registry)
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=exposition, capture_output=True, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    text = exposition.decode()
    assert "_created" not in text  # disabled: they double the series for nothing
    for name in (
        "comfygate_build_info",
        "comfygate_http_requests_total",
        "comfygate_user_requests_total",
    ):
        assert name in text


def test_every_gauge_says_how_workers_combine() -> None:
    """With ``--workers N`` a gauge left in the default mode (``all``) grows a ``pid`` label
    per worker, and its dead workers' values stay; each one must choose."""
    metrics = Metrics()
    gauges = [c for c in vars(metrics).values() if isinstance(c, Gauge)]
    assert gauges
    for gauge in gauges:
        assert gauge._multiprocess_mode != "all", gauge._name
