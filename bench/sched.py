"""``make bench-sched``: the gateway queue against a fake ComfyUI that "executes" each prompt
for a fixed time (``docs/scheduler.md``). In process: ``I`` fakes (instances) and ``R`` comfygate
replicas with ``[scheduler] enabled`` (several replicas share one real redis-server the bench
starts), users as JWT subjects, submissions spread over the replicas. ``--setups 1x1,2x2``
(the default) runs each ``IxR`` setup and prints one table, a column per setup:

- flood: A queues 50, then B one: how many prompts started on B's instance between B's
  submission and B's start (0: B went next), and B's delay after the prompt running there
  ended;
- fair4: four users, equal demand: Jain's index of GPU time while all four are backlogged;
- weights: roles weighted 2:1: their GPU time ratio while both are backlogged;
- gap: the longest time between one prompt ending and the next starting on an instance (ms);
- cost: the scheduler's own time per release (read, choose, claim; mean and max, ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import redis
from aiohttp import web
from prometheus_client import CollectorRegistry

from bench.procs import free_port
from proxy.app import create_app
from proxy.scheduler.fair import jain_index
from proxy.scheduler.keys import GATE
from proxy.settings import load_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.redis_server import RedisServer, start_redis

SECRET = "bench-sched-secret-0123456789abcdef0123456789abcdef"
EXEC_SECONDS = 0.1
DEADLINE_SECONDS = 120.0
"""A scenario whose prompts have not all ended by then fails, naming them (never a hang)."""


def token(user: str, role: str = "user") -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": user, "roles": [role], "iat": now, "exp": now + 3600, "jti": f"{user}-j"}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


def graph(i: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i % 255},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}},
    }


async def scenario(
    name: str,
    submissions: list[tuple[str, str]],
    after: list[tuple[str, str]],
    *,
    instances: int = 1,
    replicas: int = 1,
    redis_url: str | None = None,
) -> dict[str, Any]:
    fakes = []
    for n in range(instances):
        fake = FakeComfyUI(Path(tempfile.mkdtemp(prefix=f"bench-sched-{n}-")), record=False)
        fake.queue.execution_seconds = EXEC_SECONDS
        await fake.start()
        fakes.append(fake)
    upstream: dict[str, Any] = {"urls": (fakes[0].url,), "check_multi_user_at_startup": False}
    if instances > 1:
        upstream = {
            "urls": [],
            "instances": [{"url": f.url, "name": f"gpu-{n}"} for n, f in enumerate(fakes)],
            "check_multi_user_at_startup": False,
        }
    overrides: dict[str, Any] = {
        "upstream": upstream,
        "auth": {"jwt": {"secret": SECRET}},
        "logging": {"format": "json", "level": "warning", "access_log": False},
        "rate_limits": {"enabled": False},
        "scheduler": {"enabled": True, "weights": {"power": 2.0}},
        "metrics": {"upstream_poll_seconds": 0},
    }
    if redis_url is not None:
        with redis.Redis.from_url(redis_url) as client:
            client.flushdb()  # each scenario starts with an empty queue
        overrides["redis"] = {"url": redis_url}
    settings = load_settings(None, overrides=overrides, environ={})
    apps, runners, bases = [], [], []
    for _ in range(replicas):
        app = create_app(settings, registry=CollectorRegistry())
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        apps.append(app)
        runners.append(runner)
        bases.append(f"http://127.0.0.1:{port}")
    owner_of: dict[str, str] = {}
    submitted_at: dict[str, float] = {}
    started: list[tuple[str, float, int]] = []
    ended: dict[str, float] = {}

    def starts() -> list[tuple[str, float, int]]:
        """(prompt id, start, instance) of every run, in start order."""
        out = [(p, t, n) for n, f in enumerate(fakes) for p, t in f.queue.started]
        return sorted(out, key=lambda s: s[1])

    turn = itertools.count()
    async with aiohttp.ClientSession() as session:

        async def submit(batch: list[tuple[str, str]]) -> None:
            for i, (user, role) in enumerate(batch):
                base = bases[next(turn) % len(bases)]
                async with session.post(
                    f"{base}/prompt", json={"prompt": graph(i)}, headers=token(user, role)
                ) as resp:
                    answer = await resp.json()
                    assert resp.status == 200, answer
                    owner_of[answer["prompt_id"]] = user
                    submitted_at[answer["prompt_id"]] = time.monotonic()

        await submit(submissions)
        if after:
            while len(starts()) < 3 * instances:  # noqa: ASYNC110 - the bench polls wall time
                await asyncio.sleep(0.01)
            await submit(after)
        total = len(submissions) + len(after)
        deadline = time.monotonic() + DEADLINE_SECONDS
        while sum(len(f.queue.ended) for f in fakes) < total:
            if time.monotonic() > deadline:
                ended_ids = {p for f in fakes for p, _ in f.queue.ended}
                missing = sorted(set(owner_of) - ended_ids)
                raise RuntimeError(f"{name}: prompts never ran to the end: {missing}")
            await asyncio.sleep(0.05)
    count = summed = 0.0
    for app in apps:
        cost = next(iter(app[GATE].metrics.cost.collect())).samples
        count += next(s.value for s in cost if s.name.endswith("_count"))
        summed += next(s.value for s in cost if s.name.endswith("_sum"))
    for runner in runners:
        await runner.cleanup()
    for fake in fakes:
        ended.update(dict(fake.queue.ended))
        await fake.stop()
    started = starts()
    gaps = [
        s[1] - ended[p[0]]
        for n in range(instances)
        for p, s in itertools.pairwise([x for x in started if x[2] == n])
        if p[0] in ended and s[1] >= ended[p[0]]
    ]
    return {
        "name": name,
        "order": [owner_of.get(p, "?") for p, _, _ in started],
        "starts": [(p, t) for p, t, _ in started],
        "instance": {p: n for p, _, n in started},
        "ends": ended,
        "submitted": submitted_at,
        "owner_of": owner_of,
        "gap_ms": max(gaps, default=0.0) * 1000,
        "cost_ms": summed / max(1, count) * 1000,
    }


def backlogged_share(run: dict[str, Any], users: list[str]) -> dict[str, float]:
    """GPU time per user over the runs that started while every user still had prompts."""
    order = run["order"]
    last = min(max(i for i, u in enumerate(order) if u == user) for user in users)
    service = dict.fromkeys(users, 0.0)
    for i, (pid, began) in enumerate(run["starts"][: last + 1]):
        service[order[i]] += run["ends"][pid] - began
    return service


Row = tuple[str, str, str, bool]


async def measure(instances: int, replicas: int, redis_url: str | None) -> list[Row]:
    """The table's rows for one setup."""

    async def run(
        name: str, submissions: list[tuple[str, str]], after: list[tuple[str, str]]
    ) -> dict[str, Any]:
        return await scenario(
            name, submissions, after, instances=instances, replicas=replicas, redis_url=redis_url
        )

    flood = await run("flood", [("a", "user")] * 50, [("b", "user")])
    fair = await run("fair4", [(u, "user") for _ in range(15) for u in "cdef"], [])
    weights = await run(
        "weights", [(u, r) for _ in range(60) for u, r in (("g", "power"), ("h", "user"))], []
    )
    b_pid = next(p for p, u in flood["owner_of"].items() if u == "b")
    where = flood["instance"][b_pid]
    there = [(p, t) for p, t in flood["starts"] if flood["instance"][p] == where]
    b_index = [p for p, _ in there].index(b_pid)
    b_submitted = flood["submitted"][b_pid]
    started_before = [p for p, t in there if t <= b_submitted]
    running_then = started_before[-1]
    b_after = (dict(there)[b_pid] - flood["ends"][running_then]) * 1000
    ran_between = b_index - len(started_before)
    jain = jain_index(backlogged_share(fair, list("cdef")).values())
    share = backlogged_share(weights, ["g", "h"])
    ratio = share["g"] / share["h"]
    gap = max(r["gap_ms"] for r in (flood, fair, weights))
    costs = [r["cost_ms"] for r in (flood, fair, weights)]
    return [
        (LABELS[0], f"{ran_between}", "0", ran_between == 0),
        (LABELS[1], f"{b_after:.1f}", "<= 50", b_after <= 50),
        (LABELS[2], f"{jain:.3f}", ">= 0.95", jain >= 0.95),
        (LABELS[3], f"{ratio:.2f}", "2 +/- 10 %", abs(ratio - 2) <= 0.2),
        (LABELS[4], f"{gap:.1f}", "<= 50", gap <= 50),
        (LABELS[5], f"{statistics.mean(costs):.2f}", "<= 2", max(costs) <= 2),
    ]


LABELS = (
    "flood: prompts started on B's instance between B's submit and B's start",
    "flood: B's start after the prompt running there ended (ms)",
    "fair4: Jain's index of GPU time (4 equal users)",
    "weights: GPU time ratio, weight 2 : weight 1",
    "gap: longest idle between two prompts on an instance (ms)",
    "cost: scheduler time per release, mean (ms)",
)


def parse_setups(text: str) -> list[tuple[int, int]]:
    """``"1x1,2x2"`` -> [(1, 1), (2, 2)] (instances x replicas)."""
    out = []
    for part in text.split(","):
        instances, _, replicas = part.strip().partition("x")
        out.append((int(instances), int(replicas or "1")))
    return out


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sched", description=__doc__)
    parser.add_argument(
        "--setups",
        default="1x1,2x2",
        help="comma-separated IxR: I fake ComfyUI instances, R comfygate replicas on one Redis",
    )
    setups = parse_setups(parser.parse_args(argv).setups)
    server: RedisServer | None = None
    if any(r > 1 for _, r in setups):
        server = start_redis()  # replicas share the queue through a real redis-server
    try:
        tables = [
            await measure(i, r, server.url if server is not None and r > 1 else None)
            for i, r in setups
        ]
    finally:
        if server is not None:
            with contextlib.suppress(OSError):
                server.stop()
    names = [f"{i} inst x {r} repl" for i, r in setups]
    print(
        "\ngateway queue benchmark (fake ComfyUI executing "
        f"{EXEC_SECONDS * 1000:.0f} ms per prompt)\n"
    )
    print(f"| {'measure':<72} | " + " | ".join(f"{n:>15}" for n in names) + f" | {'target':>10} |")
    print(f"|{'-' * 74}|" + "|".join("-" * 17 for _ in names) + f"|{'-' * 12}|")
    for k, label in enumerate(LABELS):
        values = " | ".join(f"{t[k][1] + ('' if t[k][3] else ' NO'):>15}" for t in tables)
        print(f"| {label:<72} | {values} | {tables[0][k][2]:>10} |")
    return 0 if all(row[3] for t in tables for row in t) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
