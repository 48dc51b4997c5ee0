"""Multi-instance run of ``make bench`` (merged views): merged ``GET /history`` over 4 instances
against the same history on a single instance.

Setup, in processes of its own: five fake ComfyUI instances (one for the single-instance
comfygate, four for the multi-instance one), ``comfygate x1`` in front of the first and
``comfygate x4`` in front of the four. The same ``HISTORY_ENTRIES`` prompts (~2 KB history
entries each) are submitted through each proxy as one user, so both proxies know them as that
user's: ``x1`` has them all on its instance, ``x4`` has them spread by placement over its four
(each instance answers a quarter; comfygate merges the four answers in completion order).

Measured, targets alternating inside every repetition: ``GET /history`` (the whole list) and
``GET /history?max_items=64`` (what the UI asks), as that user (isolation filters the merged
answer) and as an admin (unfiltered), on 1 connection (latency) and 16 (throughput).
Goal: the merged answer's p50 within 1.5x of the single instance's.
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

HISTORY_ENTRIES = 64
ENTRY_PADDING = 1400
"""Bytes of ``extra_pnginfo`` padding: entries of about 2 KB, like the main bench's."""
INSTANCES = 4
GOAL_RATIO = 1.5

Log = Callable[[str], None]


@dataclass(frozen=True)
class Case:
    key: str
    path: str
    role: str
    connections: int


CASES = (
    Case("user_all_1c", "/history", "user", 1),
    Case("user_ui_1c", "/history?max_items=64", "user", 1),
    Case("admin_all_1c", "/history", "admin", 1),
    Case("admin_ui_1c", "/history?max_items=64", "admin", 1),
    Case("user_all_16c", "/history", "user", 16),
)


@dataclass
class Proxy:
    name: str
    port: int
    proc: Proc
    fakes: list[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class MultiResult:
    runs: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    """case -> proxy name -> one result per repetition."""
    spread: list[int] = field(default_factory=list)
    """History entries on each of the x4 instances."""
    answer_bytes: dict[str, int] = field(default_factory=dict)

    def median(self, case: str, proxy: str, key: str) -> float:
        values = [r[key] for r in self.runs.get(case, {}).get(proxy, []) if key in r]
        return statistics.median(values) if values else float("nan")

    def ratio(self, case: str, key: str) -> float:
        """x4 / x1, paired per repetition, median."""
        pairs = zip(
            self.runs.get(case, {}).get("comfygate x4", []),
            self.runs.get(case, {}).get("comfygate x1", []),
            strict=False,
        )
        ratios = [a[key] / b[key] for a, b in pairs if b.get(key)]
        return statistics.median(ratios) if ratios else float("nan")


async def _start_fake(group: ProcessGroup, root: Path, logs: Path, name: str) -> str:
    for sub in ("input", "output", "temp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv, _ = fake_command(port, root)
    proc = group.spawn(name, argv, logs / f"{name}.log", cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    await wait_http(f"{base}/history/bench-ready", proc)
    return base


async def _start_proxy(
    group: ProcessGroup, cmd: list[str], logs: Path, name: str, fakes: list[str]
) -> Proxy:
    port = free_port()
    env = {
        "COMFYGATE_UPSTREAM__URLS": orjson.dumps(fakes).decode(),
        **PASS_THROUGH,
        "COMFYGATE_AUTH__JWT__SECRET": BENCH_JWT_SECRET,
        "COMFYGATE_LOGGING__ACCESS_LOG": "false",
        "COMFYGATE_LOGGING__FORMAT": "json",
        "COMFYGATE_METRICS__PORT": str(free_port()),  # several proxies: a listener each
        "COMFYGATE_RATE_LIMITS__ENABLED": "false",  # seeding submits faster than a user may
    }
    argv = [*cmd, "serve", "--host", "127.0.0.1", "--port", str(port)]
    slug = "history-" + name.replace(" ", "-")
    proc = group.spawn(slug, argv, logs / f"{slug}.log", env=env)
    await wait_http(f"http://127.0.0.1:{port}/readyz", proc, ok=lambda s: s == 200)
    return Proxy(name, port, proc, fakes)


async def _seed(session: aiohttp.ClientSession, proxy: Proxy, headers: dict[str, str]) -> None:
    """``HISTORY_ENTRIES`` prompts through ``proxy`` as the bench user, run to their end."""
    for _ in range(HISTORY_ENTRIES):
        body = {
            "prompt": api_graph(f"bench_multi_{uuid.uuid4().hex[:8]}"),
            "client_id": "bench-seed",
            "extra_data": {"extra_pnginfo": {"bench": "x" * ENTRY_PADDING}},
        }
        async with session.post(f"{proxy.base}/prompt", json=body, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"seeding {proxy.name}: {resp.status} {await resp.text()}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        remaining = 0
        for fake in proxy.fakes:
            async with session.get(f"{fake}/prompt") as resp:
                remaining += (await resp.json())["exec_info"]["queue_remaining"]
        if remaining == 0:
            return
        await asyncio.sleep(0.1)  # the fakes run the prompts: poll until their queues drain
    raise RuntimeError(f"seeding {proxy.name}: prompts did not finish within 120 s")


def _cpu_seconds(proc: Proc) -> float:
    """User + system CPU of one proxy process so far."""
    with contextlib.suppress(psutil.Error):
        times = psutil.Process(proc.pid).cpu_times()
        return float(times.user + times.system)
    return 0.0


async def _count(session: aiohttp.ClientSession, fake: str) -> int:
    async with session.get(f"{fake}/history") as resp:
        return len(await resp.json())


async def run(
    group: ProcessGroup,
    tmp: Path,
    comfygate_cmd: list[str],
    *,
    reps: int,
    duration: float = 2.0,
    log: Log = print,
    loadgen: LoadGenerator | None = None,
) -> dict[str, Any]:
    """Set up, measure, print the table, and return the results as JSON (see the module doc)."""
    result = await measure(
        group,
        tmp,
        loadgen or pick_load_generator(),
        comfygate_cmd,
        reps=reps,
        duration=duration,
        log=log,
    )
    log(render(result))
    return to_json(result)


async def measure(
    group: ProcessGroup,
    tmp: Path,
    loadgen: LoadGenerator,
    comfygate_cmd: list[str],
    *,
    reps: int,
    duration: float,
    log: Log,
) -> MultiResult:
    """Set up and measure (see the module doc)."""
    logs = tmp / "logs"
    work = tmp / "multi-history"
    fakes = [
        await _start_fake(group, work / f"fake-{i}", logs, f"history-fake-{i}")
        for i in range(1 + INSTANCES)
    ]
    single = await _start_proxy(group, comfygate_cmd, logs, "comfygate x1", fakes[:1])
    merged = await _start_proxy(group, comfygate_cmd, logs, "comfygate x4", fakes[1:])
    proxies = [single, merged]
    tokens = {
        "user": {"Authorization": f"Bearer {bench_token(('user',))}"},
        "admin": {"Authorization": f"Bearer {bench_token()}"},
    }
    result = MultiResult()
    async with aiohttp.ClientSession() as session:
        for proxy in proxies:
            await _seed(session, proxy, tokens["user"])
        result.spread = [await _count(session, f) for f in merged.fakes]
        for proxy in proxies:
            async with session.get(f"{proxy.base}/history", headers=tokens["user"]) as resp:
                body = await resp.read()
                if resp.status != 200 or len(orjson.loads(body)) != HISTORY_ENTRIES:
                    raise RuntimeError(f"{proxy.name}: unexpected history answer {resp.status}")
                result.answer_bytes[proxy.name] = len(body)
    log(
        f"multi-instance: {HISTORY_ENTRIES} entries per user history "
        f"({result.answer_bytes.get(single.name, 0):,} B); on the 4 instances: {result.spread}"
    )
    for rep in range(reps):
        for case in CASES:
            for proxy in proxies:
                log(f"-- multi {case.key} rep {rep + 1}/{reps}: {proxy.name}")
                url = proxy.base + case.path
                await loadgen.run(  # warm-up: connections, caches
                    url, connections=case.connections, duration=0.3, headers=tokens[case.role]
                )
                cpu = _cpu_seconds(proxy.proc)
                measured = await loadgen.run(
                    url,
                    connections=case.connections,
                    duration=duration,
                    headers=tokens[case.role],
                )
                values = measured.metrics()
                spent = _cpu_seconds(proxy.proc) - cpu
                values["cpu_us_per_req"] = (
                    spent / measured.requests * 1e6 if measured.requests else 0
                )
                runs = result.runs.setdefault(case.key, {}).setdefault(proxy.name, [])
                runs.append(values)
    return result


def render(result: MultiResult) -> str:
    """The table and the goal line."""
    rows = [
        [
            "case",
            "x1 p50 us",
            "x4 p50 us",
            "x4/x1 p50",
            "x1 req/s",
            "x4 req/s",
            "x1 proxy CPU us/req",
            "x4 proxy CPU us/req",
            "errors",
        ]
    ]
    for case in CASES:
        errors = sum(
            result.median(case.key, p, "errors") + result.median(case.key, p, "bad_status")
            for p in ("comfygate x1", "comfygate x4")
        )
        rows.append(
            [
                f"{case.role} GET {case.path} ({case.connections} conn)",
                f"{result.median(case.key, 'comfygate x1', 'p50_us'):.0f}",
                f"{result.median(case.key, 'comfygate x4', 'p50_us'):.0f}",
                f"{result.ratio(case.key, 'p50_us'):.2f}x",
                f"{result.median(case.key, 'comfygate x1', 'rps'):.0f}",
                f"{result.median(case.key, 'comfygate x4', 'rps'):.0f}",
                f"{result.median(case.key, 'comfygate x1', 'cpu_us_per_req'):.0f}",
                f"{result.median(case.key, 'comfygate x4', 'cpu_us_per_req'):.0f}",
                f"{errors:.0f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["merged GET /history: 4 instances (x4) vs one (x1), same history, through comfygate"]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    ui = result.ratio("user_ui_1c", "p50_us")
    verdict = "PASS" if ui <= GOAL_RATIO else "MISS"
    lines.append(
        f"  goal: merged history p50 within {GOAL_RATIO}x of one instance's "
        f"(user, max_items=64): {ui:.2f}x {verdict}"
    )
    return "\n".join(lines)


def to_json(result: MultiResult) -> dict[str, Any]:
    return {
        "entries": HISTORY_ENTRIES,
        "spread": result.spread,
        "answer_bytes": result.answer_bytes,
        "runs": result.runs,
        "ratios_p50": {c.key: result.ratio(c.key, "p50_us") for c in CASES},
    }


__all__ = ["CASES", "MultiResult", "measure", "render", "run", "to_json"]
