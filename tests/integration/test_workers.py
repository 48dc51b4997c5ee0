"""``comfygate serve --workers 2``: two processes behind one port (SO_REUSEPORT) under a
supervisor. Requests land on both; the supervisor's one metrics listener adds them up; rate
limits hold across workers through Redis; SIGHUP reaches every worker; a dead worker is
replaced without losing its counts; a worker that cannot start stops the whole thing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from tests.conftest import JWT_SECRET, make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.proxy_process import LogLine, ProxyProcess, proxy_command
from tests.redis_server import free_port

BOB = {"Authorization": f"Bearer {make_token('bob', ('user',))}"}
READ_LIMIT = 6


async def scrape(proxy: ProxyProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The supervisor's exposition as ``{(sample name, labels): value}``."""
    async with aiohttp.ClientSession() as session, session.get(proxy.metrics_url) as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def fresh_connection_get(url: str, headers: dict[str, str] | None = None) -> int:
    """One request on a new connection: SO_REUSEPORT spreads connections, not requests."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, headers=headers) as resp,
    ):
        await resp.read()
        return resp.status


def finished(rule: str) -> Callable[[LogLine], bool]:
    def match(line: LogLine) -> bool:
        return line.get("event") == "request_finished" and line.get("rule") == rule

    return match


async def test_two_workers_one_port(fake_comfy: FakeComfyUI, redis_url: str) -> None:
    env = {
        "COMFYGATE_REDIS__URL": redis_url,
        "COMFYGATE_RATE_LIMITS__DEFAULT": json.dumps(
            {"read": {"rate": f"{READ_LIMIT}/hour", "burst": READ_LIMIT}}
        ),
        "COMFYGATE_METRICS__UPSTREAM_POLL_SECONDS": "0",
    }
    async with proxy_command(
        fake_comfy.url, args=["--workers", "2"], capture_logs=True, env=env
    ) as proxy:
        (started,) = await proxy.wait_log(lambda line: line.get("event") == "supervisor_started")
        assert len(started["pids"]) == 2

        # Requests land on both workers.
        for _ in range(30):
            assert await fresh_connection_get(f"{proxy.url}/healthz") == 200
        healthz = [line for line in proxy.logs if finished("healthz")(line)]
        by_worker = Counter(line["worker"] for line in healthz)
        assert set(by_worker) == {0, 1}, by_worker

        # One rate limit across both (shared in Redis): exactly READ_LIMIT pass (the period is
        # an hour: no allowance comes back however slowly this runs).
        statuses = [await fresh_connection_get(f"{proxy.url}/queue", BOB) for _ in range(10)]
        assert statuses.count(200) == READ_LIMIT, statuses
        assert statuses.count(429) == 10 - READ_LIMIT
        queue_lines = await proxy.wait_log(finished("queue"), count=10)
        assert {line["worker"] for line in queue_lines} == {0, 1}

        # One metrics listener, the sum of both workers.
        samples = await scrape(proxy)
        assert value(samples, "comfygate_workers") == 2
        assert value(
            samples, "comfygate_http_requests_total", rule="healthz", method="GET", status="200"
        ) == len(healthz)
        assert (
            value(
                samples,
                "comfygate_ratelimit_decisions_total",
                route_class="read",
                outcome="limited",
            )
            == 10 - READ_LIMIT
        )
        assert (
            value(
                samples, "comfygate_http_requests_total", rule="queue", method="GET", status="429"
            )
            == 10 - READ_LIMIT
        )
        assert value(samples, "comfygate_build_info", version=__version__, python=_python()) == 1

        # SIGHUP reaches every worker.
        proxy.process.send_signal(signal.SIGHUP)
        reloads = await proxy.wait_log(
            lambda line: line.get("event") == "reload_requested", count=2
        )
        assert {line["worker"] for line in reloads} == {0, 1}

        # A dead worker is replaced; what it counted stays counted.
        before = value(
            samples, "comfygate_http_requests_total", rule="healthz", method="GET", status="200"
        )
        os.kill(started["pids"][0], signal.SIGKILL)
        await proxy.wait_log(lambda line: line.get("event") == "worker_restarted")
        samples = await scrape(proxy)
        assert value(samples, "comfygate_worker_restarts_total") == 1
        assert value(samples, "comfygate_workers") == 2
        assert (
            value(
                samples, "comfygate_http_requests_total", rule="healthz", method="GET", status="200"
            )
            >= before
        )
        assert await fresh_connection_get(f"{proxy.url}/healthz") == 200

        # SIGTERM: the workers drain and the supervisor exits cleanly.
        proxy.terminate()
        assert await asyncio.wait_for(proxy.process.wait(), 30) == 0
        stopped = [line for line in proxy.logs if line.get("event") == "shutdown_finished"]
        assert {line["worker"] for line in stopped} == {0, 1}


def _python() -> str:
    return ".".join(str(part) for part in sys.version_info[:3])


async def test_a_worker_that_cannot_start_stops_the_supervisor(fake_comfy: FakeComfyUI) -> None:
    """The port is taken by a plain listener: both workers fail to bind; the supervisor exits
    with the configuration status (2) and says why; no Redis: it warns about per-worker state."""
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COMFYGATE_")},
        "COMFYGATE_UPSTREAM__URLS": json.dumps([fake_comfy.url]),
        "COMFYGATE_LOGGING__FORMAT": "json",
        "COMFYGATE_AUTH__JWT__SECRET": JWT_SECRET,
        "COMFYGATE_METRICS__PORT": str(free_port()),
    }
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
            env=environ,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        holder.close()
        await holder.wait_closed()
    assert process.returncode == 2
    events = [
        json.loads(line).get("event") for line in stdout.splitlines() if line.startswith(b"{")
    ]
    assert "workers_without_redis" in events
    assert "worker_start_failed" in events
    assert b"cannot listen on 127.0.0.1:" in stderr
