"""``make bench``'s tenant-view run: one user's ``GET /history?max_items=20`` and
``GET /api/jobs?limit=20`` with ``OTHERS`` finished prompts of other people in ComfyUI,
straight from ComfyUI vs through comfygate.

Setup, in processes of its own: a fake ComfyUI started with ``--history-entries OTHERS`` (about
2 KB entries, nobody's) and comfygate in front of it (isolation on, state in memory). The bench
user submits ``OWN`` prompts through each comfygate and they run to their end. Measured on one
connection: the direct request (ComfyUI pages everyone's history itself; its answer is the
newest 20 of anyone's), the user's through comfygate (the user's own 20: comfygate reads the
user's prompts one by one, ``proxy.isolation.own_views``) and an admin's through comfygate
(unfiltered, forwarded). The same user's view through a comfygate with
``isolation.view_lookups = 1`` is the former path (one full read of everyone's history,
filtered). Goal: the user's view at least ``GOAL_RATIO`` times faster than the full read at
10,000 entries of others; its cost follows what the user owns, not ``OTHERS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from bench.fixtures import api_graph
from bench.loadgen import LoadGenerator, pick_load_generator
from bench.procs import Proc, ProcessGroup, free_port, wait_http
from bench.targets import BENCH_JWT_SECRET, PASS_THROUGH, REPO, bench_token, fake_command

OTHERS = 10_000
OWN = 20
GOAL_RATIO = 5.0
"""The user's view at least this much faster than the former full read (p50)."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class Case:
    key: str
    path: str
    target: str
    """``direct`` (the fake), ``comfygate``, or ``former``: comfygate with
    ``isolation.view_lookups = 1``, so the user's view is the full read filtered (the path every
    tenant view took before per-user indexes)."""
    role: str


CASES = (
    Case("history_direct", "/history?max_items=20", "direct", "user"),
    Case("history_user", "/history?max_items=20", "comfygate", "user"),
    Case("history_full", "/history?max_items=20", "former", "user"),
    Case("history_admin", "/history?max_items=20", "comfygate", "admin"),
    Case("jobs_direct", "/api/jobs?limit=20", "direct", "user"),
    Case("jobs_user", "/api/jobs?limit=20", "comfygate", "user"),
)


@dataclass
class ViewResult:
    others: int
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def median(self, case: str, key: str) -> float:
        values = [r[key] for r in self.runs.get(case, []) if key in r]
        return statistics.median(values) if values else float("nan")

    def ratio(self, case: str, base: str, key: str = "p50_us") -> float:
        pairs = zip(self.runs.get(case, []), self.runs.get(base, []), strict=False)
        ratios = [a[key] / b[key] for a, b in pairs if b.get(key)]
        return statistics.median(ratios) if ratios else float("nan")


def _cpu_seconds(proc: Proc) -> float:
    with contextlib.suppress(psutil.Error):
        times = psutil.Process(proc.pid).cpu_times()
        return float(times.user + times.system)
    return 0.0


async def _seed(session: aiohttp.ClientSession, base: str, fake: str, token: str) -> None:
    """``OWN`` prompts of the bench user through comfygate, run to their end."""
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(OWN):
        body = {"prompt": api_graph(f"bench_view_{uuid.uuid4().hex[:8]}"), "client_id": "seed"}
        async with session.post(f"{base}/prompt", json=body, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"seeding: {resp.status} {await resp.text()}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        async with session.get(f"{fake}/prompt") as resp:
            if (await resp.json())["exec_info"]["queue_remaining"] == 0:
                return
        await asyncio.sleep(0.1)  # the fake runs the prompts: poll until its queue drains
    raise RuntimeError("seeding: prompts did not finish within 120 s")


async def _start_proxy(
    group: ProcessGroup,
    cmd: list[str],
    logs: Path,
    name: str,
    fake: str,
    extra_env: dict[str, str],
) -> tuple[str, Proc]:
    port = free_port()
    env = {
        "COMFYGATE_UPSTREAM__URLS": orjson.dumps([fake]).decode(),
        **PASS_THROUGH,
        "COMFYGATE_AUTH__JWT__SECRET": BENCH_JWT_SECRET,
        "COMFYGATE_LOGGING__ACCESS_LOG": "false",
        "COMFYGATE_LOGGING__FORMAT": "json",
        "COMFYGATE_METRICS__PORT": str(free_port()),
        "COMFYGATE_RATE_LIMITS__ENABLED": "false",  # seeding submits faster than a user may
        **extra_env,
    }
    argv = [*cmd, "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = group.spawn(name, argv, logs / f"{name}.log", env=env)
    base = f"http://127.0.0.1:{port}"
    await wait_http(f"{base}/readyz", proc, ok=lambda s: s == 200)
    return base, proc


async def run(
    group: ProcessGroup,
    tmp: Path,
    comfygate_cmd: list[str],
    *,
    reps: int,
    others: int = OTHERS,
    duration: float = 2.0,
    log: Log = print,
    loadgen: LoadGenerator | None = None,
) -> dict[str, Any]:
    """Set up, measure, print the table, and return the results as JSON."""
    loadgen = loadgen or pick_load_generator()
    logs, root = tmp / "logs", tmp / "own-history"
    for sub in ("input", "output", "temp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    fake_port = free_port()
    argv, _ = fake_command(fake_port, root)
    fake_proc = group.spawn(
        "views-fake", [*argv, "--history-entries", str(others)], logs / "views-fake.log", cwd=REPO
    )
    fake = f"http://127.0.0.1:{fake_port}"
    await wait_http(f"{fake}/history/bench-ready", fake_proc)
    base, proxy = await _start_proxy(group, comfygate_cmd, logs, "views-comfygate", fake, {})
    former, former_proxy = await _start_proxy(
        group,
        comfygate_cmd,
        logs,
        "views-comfygate-former",
        fake,
        {"COMFYGATE_ISOLATION__VIEW_LOOKUPS": "1"},
    )
    procs = {"comfygate": proxy, "former": former_proxy}
    bases = {"direct": fake, "comfygate": base, "former": former}
    tokens = {"user": bench_token(("user",)), "admin": bench_token()}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for seeded in (base, former):  # each proxy keeps its own ownership (in memory)
            await _seed(session, seeded, fake, tokens["user"])
        headers = {"Authorization": f"Bearer {tokens['user']}"}
        async with session.get(f"{base}/history?max_items=20", headers=headers) as resp:
            own = await resp.json()
            if resp.status != 200 or len(own) != min(OWN, 20):
                raise RuntimeError(f"the user's history: {resp.status}, {len(own)} entries")
    log(f"tenant views: {others:,} entries of others in ComfyUI, {OWN} of the user's")
    result = ViewResult(others)
    for rep in range(reps):
        for case in CASES:
            log(f"-- views {case.key} rep {rep + 1}/{reps}")
            url = bases[case.target] + case.path
            auth = {"Authorization": f"Bearer {tokens[case.role]}"}
            await loadgen.run(url, connections=1, duration=0.3, headers=auth)  # warm-up
            measured_proc = procs.get(case.target)
            cpu = _cpu_seconds(measured_proc) if measured_proc else 0.0
            measured = await loadgen.run(url, connections=1, duration=duration, headers=auth)
            values = measured.metrics()
            spent = _cpu_seconds(measured_proc) - cpu if measured_proc else 0.0
            values["cpu_us_per_req"] = spent / measured.requests * 1e6 if measured.requests else 0.0
            result.runs.setdefault(case.key, []).append(values)
    log(render(result))
    return to_json(result)


def render(result: ViewResult) -> str:
    rows = [["case", "p50 us", "p99 us", "req/s", "proxy CPU us/req", "vs direct p50", "errors"]]
    names = {"direct": "ComfyUI", "comfygate": "comfygate", "former": "full read"}
    for case in CASES:
        direct = "history_direct" if case.key.startswith("history") else "jobs_direct"
        errors = result.median(case.key, "errors") + result.median(case.key, "bad_status")
        rows.append(
            [
                f"{names[case.target]} {case.role} GET {case.path}",
                f"{result.median(case.key, 'p50_us'):.0f}",
                f"{result.median(case.key, 'p99_us'):.0f}",
                f"{result.median(case.key, 'rps'):.0f}",
                f"{result.median(case.key, 'cpu_us_per_req'):.0f}",
                f"{result.ratio(case.key, direct):.2f}x",
                f"{errors:.0f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"a user's views with {result.others:,} entries of others in ComfyUI, "
        f"{OWN} of the user's (1 connection)"
    ]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    gain = result.ratio("history_full", "history_user")
    verdict = "PASS" if gain >= GOAL_RATIO else "MISS"
    lines.append(
        f"  goal: the user's /history?max_items=20 p50 at least {GOAL_RATIO:g}x faster than the "
        f"former full read: {gain:.1f}x {verdict}"
    )
    return "\n".join(lines)


def to_json(result: ViewResult) -> dict[str, Any]:
    return {
        "others": result.others,
        "own": OWN,
        "runs": result.runs,
        "ratios_p50": {
            c.key: result.ratio(
                c.key, "history_direct" if c.key.startswith("history") else "jobs_direct"
            )
            for c in CASES
        },
    }


__all__ = ["CASES", "ViewResult", "render", "run", "to_json"]
