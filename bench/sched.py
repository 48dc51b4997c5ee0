"""``make bench-sched``: the gateway queue against a fake ComfyUI that "executes" each prompt
for a fixed time (``docs/scheduler.md``). In process: one fake, one comfygate with
``[scheduler] enabled``, users as JWT subjects. Prints one table:

- flood: A queues 50, then B one: how many prompts started between B's submission and B's
  start (1 = only the one running then), and B's delay after that one ended;
- fair4: four users, equal demand: Jain's index of GPU time while all four are backlogged;
- weights: roles weighted 2:1: their GPU time ratio while both are backlogged;
- gap: the longest time between one prompt ending and the next starting (ms);
- cost: the scheduler's own time per release (read, choose, claim; mean and max, ms).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from prometheus_client import CollectorRegistry

from bench.procs import free_port
from proxy.app import create_app
from proxy.scheduler.fair import jain_index
from proxy.scheduler.keys import GATE
from proxy.settings import load_settings
from tests.fakes.comfyui import FakeComfyUI

SECRET = "bench-sched-secret-0123456789abcdef0123456789abcdef"
EXEC_SECONDS = 0.1


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
    name: str, submissions: list[tuple[str, str]], after: list[tuple[str, str]]
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-sched-"))
    fake = FakeComfyUI(root, record=False)
    fake.queue.execution_seconds = EXEC_SECONDS
    await fake.start()
    settings = load_settings(
        None,
        overrides={
            "upstream": {"urls": (fake.url,), "check_multi_user_at_startup": False},
            "auth": {"jwt": {"secret": SECRET}},
            "logging": {"format": "json", "level": "warning", "access_log": False},
            "rate_limits": {"enabled": False},
            "scheduler": {"enabled": True, "weights": {"power": 2.0}},
            "metrics": {"upstream_poll_seconds": 0},
        },
        environ={},
    )
    app = create_app(settings, registry=CollectorRegistry())
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    owner_of: dict[str, str] = {}
    submitted_at: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:

        async def submit(batch: list[tuple[str, str]]) -> None:
            for i, (user, role) in enumerate(batch):
                async with session.post(
                    f"{base}/prompt", json={"prompt": graph(i)}, headers=token(user, role)
                ) as resp:
                    answer = await resp.json()
                    assert resp.status == 200, answer
                    owner_of[answer["prompt_id"]] = user
                    submitted_at[answer["prompt_id"]] = time.monotonic()

        await submit(submissions)
        if after:
            while len(fake.queue.started) < 3:  # noqa: ASYNC110 - the bench polls wall time
                await asyncio.sleep(0.01)
            await submit(after)
        total = len(submissions) + len(after)
        while len(fake.queue.ended) < total:  # noqa: ASYNC110 - the bench polls wall time
            await asyncio.sleep(0.05)
    gate = app[GATE]
    cost = next(iter(gate.metrics.cost.collect())).samples
    count = next(s.value for s in cost if s.name.endswith("_count"))
    summed = next(s.value for s in cost if s.name.endswith("_sum"))
    await runner.cleanup()
    await fake.stop()
    starts = fake.queue.started
    ends = dict(fake.queue.ended)
    gaps = [
        s[1] - ends[p[0]]
        for p, s in itertools.pairwise(starts)
        if p[0] in ends and s[1] >= ends[p[0]]
    ]
    return {
        "name": name,
        "order": [owner_of.get(p, "?") for p, _ in starts],
        "starts": starts,
        "ends": ends,
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


async def main() -> int:
    flood = await scenario("flood", [("a", "user")] * 50, [("b", "user")])
    fair = await scenario("fair4", [(u, "user") for _ in range(15) for u in "cdef"], [])
    weights = await scenario(
        "weights", [(u, r) for _ in range(30) for u, r in (("g", "power"), ("h", "user"))], []
    )
    b_pid = next(p for p, u in flood["owner_of"].items() if u == "b")
    b_index = [p for p, _ in flood["starts"]].index(b_pid)
    b_submitted = flood["submitted"][b_pid]
    started_before = [p for p, t in flood["starts"] if t <= b_submitted]
    running_then = started_before[-1]
    b_after = (dict(flood["starts"])[b_pid] - flood["ends"][running_then]) * 1000
    ran_between = b_index - len(started_before)
    jain = jain_index(backlogged_share(fair, list("cdef")).values())
    share = backlogged_share(weights, ["g", "h"])
    ratio = share["g"] / share["h"]
    gap = max(r["gap_ms"] for r in (flood, fair, weights))
    costs = [r["cost_ms"] for r in (flood, fair, weights)]
    rows = [
        (
            "flood: prompts started between B's submit and B's start",
            f"{ran_between}",
            "0",
            ran_between == 0,
        ),
        (
            "flood: B's start after the then-running prompt ended (ms)",
            f"{b_after:.1f}",
            "<= 50",
            b_after <= 50,
        ),
        ("fair4: Jain's index of GPU time (4 equal users)", f"{jain:.3f}", ">= 0.95", jain >= 0.95),
        (
            "weights: GPU time ratio, weight 2 : weight 1",
            f"{ratio:.2f}",
            "2 +/- 10 %",
            abs(ratio - 2) <= 0.2,
        ),
        ("gap: longest idle between two prompts (ms)", f"{gap:.1f}", "<= 50", gap <= 50),
        (
            "cost: scheduler time per release, mean (ms)",
            f"{statistics.mean(costs):.2f}",
            "<= 2",
            max(costs) <= 2,
        ),
    ]
    print(
        "\ngateway queue benchmark (fake ComfyUI executing "
        f"{EXEC_SECONDS * 1000:.0f} ms per prompt)\n"
    )
    print(f"| {'measure':<58} | {'value':>8} | {'target':>10} | ok |")
    print(f"|{'-' * 60}|{'-' * 10}|{'-' * 12}|----|")
    for label, value, target, ok in rows:
        print(f"| {label:<58} | {value:>8} | {target:>10} | {'yes' if ok else 'NO':>2} |")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
