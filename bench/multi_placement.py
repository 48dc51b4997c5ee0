"""The placement part of ``make bench``'s multi-instance run: what choosing an instance costs.

Four fake ComfyUIs (subprocesses, like the main run's upstream) and two comfygate processes:
``single`` in front of one of them (``upstream.urls``) and ``multi4`` in front of all four
(``[[upstream.instances]]``: placement, health checks, capabilities). Both get the same
sequential ``POST /prompt`` (one connection, so each figure is one submission's latency, not a
queueing effect); the two alternate inside every repetition. Reported:

- placement overhead: median submission latency of ``multi4`` minus ``single``: what choosing
  an instance (capabilities, load, affinity, the ownership record under its name) adds per
  submission, end to end;
- ``decide()``: the placement decision alone, in process, over four instances with the fake's
  real ``/object_info``.

The merged-views part of the multi-instance run is ``bench/multi.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.fixtures import api_graph
from bench.procs import ProcessGroup, free_port, wait_http
from bench.targets import BENCH_JWT_SECRET, PASS_THROUGH, bench_token, fake_command
from proxy.comfy.capabilities import parse_object_info
from proxy.multi.placement import CandidateState, decide, requirements

INSTANCES = 4
SUBMISSIONS = 200
OBJECT_INFO = Path(__file__).resolve().parent.parent / "tests" / "data" / "comfyui_object_info.json"


@dataclass
class Setup:
    """The run's processes: the fakes' and the two proxies' base URLs."""

    fakes: list[str] = field(default_factory=list)
    proxies: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


async def submissions(session: aiohttp.ClientSession, setup: Setup, base: str) -> list[float]:
    """Latencies (ms) of ``SUBMISSIONS`` sequential ``POST /prompt`` (EmptyImage -> SaveImage)."""
    latencies = []
    for n in range(SUBMISSIONS):
        body = orjson.dumps({"prompt": api_graph(f"multi_{n}"), "client_id": "bench-multi"})
        started = time.perf_counter()
        async with session.post(f"{base}/prompt", data=body, headers=setup.headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"POST /prompt answered {resp.status}")
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def decide_micro(iterations: int = 20_000) -> float:
    """Microseconds per placement decision over ``INSTANCES`` instances (the pure function)."""
    capabilities = parse_object_info(json.loads(OBJECT_INFO.read_text()))
    candidates = [
        CandidateState(name=f"gpu-{i}", capabilities=capabilities, outstanding=i % 2, order=i)
        for i in range(INSTANCES)
    ]
    graph = api_graph("micro")
    started = time.perf_counter()
    for _ in range(iterations):
        decide(requirements(graph), candidates)
    return (time.perf_counter() - started) / iterations * 1e6


async def start(group: ProcessGroup, tmp: Path, comfygate_cmd: list[str]) -> Setup:
    setup = Setup(headers={"Authorization": f"Bearer {bench_token()}"})
    logs = tmp / "logs"
    for i in range(INSTANCES):
        port = free_port()
        root = tmp / f"placement-root-{i}"
        for sub in ("input", "output", "temp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        argv, _ = fake_command(port, root)
        proc = group.spawn(f"fake-placement-{i}", argv, logs / f"fake-placement-{i}.log")
        base = f"http://127.0.0.1:{port}"
        await wait_http(f"{base}/history/bench-ready", proc)
        setup.fakes.append(base)
    configs = {
        "single": {"COMFYGATE_UPSTREAM__URLS": json.dumps(setup.fakes[:1])},
        f"multi{INSTANCES}": {
            "COMFYGATE_UPSTREAM__URLS": "[]",
            "COMFYGATE_UPSTREAM__INSTANCES": json.dumps(
                [{"url": u, "name": f"gpu-{i}"} for i, u in enumerate(setup.fakes)]
            ),
        },
    }
    for name, config in configs.items():
        port = free_port()
        env = {
            **config,
            **PASS_THROUGH,
            "COMFYGATE_AUTH__JWT__SECRET": BENCH_JWT_SECRET,
            "COMFYGATE_LOGGING__FORMAT": "json",
            "COMFYGATE_LOGGING__ACCESS_LOG": "false",
            "COMFYGATE_METRICS__ENABLED": "false",  # its own port would clash between proxies
        }
        argv = [*comfygate_cmd, "serve", "--host", "127.0.0.1", "--port", str(port)]
        log_path = logs / f"comfygate-placement-{name}.log"
        proc = group.spawn(f"comfygate-placement-{name}", argv, log_path, env=env)
        base = f"http://127.0.0.1:{port}"
        await wait_http(f"{base}/readyz", proc, ok=lambda status: status == 200)
        setup.proxies[name] = base
    return setup


async def clear(session: aiohttp.ClientSession, setup: Setup) -> None:
    """Empty every fake's queue and history between runs."""
    for base in setup.fakes:
        for path in ("/queue", "/history"):
            async with session.post(f"{base}{path}", json={"clear": True}) as resp:
                await resp.read()


async def run(
    group: ProcessGroup,
    tmp: Path,
    comfygate_cmd: list[str],
    *,
    reps: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start the processes, alternate both proxies in every repetition, print the figures."""
    setup = await start(group, tmp, comfygate_cmd)
    p50s: dict[str, list[float]] = {name: [] for name in setup.proxies}
    p90s: dict[str, list[float]] = {name: [] for name in setup.proxies}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for rep in range(reps):
            for name, base in setup.proxies.items():
                log(f"-- multi/placement rep {rep + 1}/{reps}: {name}")
                latencies = sorted(await submissions(session, setup, base))
                p50s[name].append(statistics.median(latencies))
                p90s[name].append(latencies[int(len(latencies) * 0.9)])
                await clear(session, setup)
    medians = {
        name: {"p50_ms": statistics.median(p50s[name]), "p90_ms": statistics.median(p90s[name])}
        for name in setup.proxies
    }
    micro = decide_micro()
    single, multi = medians["single"], medians[f"multi{INSTANCES}"]
    overhead = multi["p50_ms"] - single["p50_ms"]
    log(f"multi-instance placement: {SUBMISSIONS} sequential POST /prompt, {INSTANCES} vs 1")
    for name, values in medians.items():
        log(f"  {name:8} p50 {values['p50_ms']:.3f} ms   p90 {values['p90_ms']:.3f} ms")
    log(
        f"  placement overhead per submission: {overhead:+.3f} ms at the median "
        f"({multi['p50_ms'] / single['p50_ms']:.2f}x); decide() alone {micro:.1f} us "
        f"over {INSTANCES} instances"
    )
    return {"medians": medians, "overhead_ms": overhead, "decide_us": micro}
