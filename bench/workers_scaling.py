"""``make bench``'s ``--workers`` run: the same comfygate (the regular user's, every feature on,
state in Redis) with ``--workers 1`` and ``--workers 2``, small GETs on 64 connections.

How a bigger box is used: one worker per core. Nothing is pinned in this run (the other runs put
the load generator on core 0 and the servers on core 1): the workers need the cores, so the load
generator, the upstream, Redis and the workers share every core, and the figures that carry over
to a bigger machine are the CPU per request and the throughput per core the proxy used
(requests/s divided by the cores its processes kept busy), next to the raw 2-vs-1 ratio.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.fixtures import place_files
from bench.loadgen import LoadGenerator
from bench.procs import Proc, ProcessGroup, free_port, pin_self, wait_http
from bench.scenarios import _warm
from bench.targets import REPO, Launcher, RunningTarget, TargetSpec, fake_command
from bench.user_target import user_target

WORKERS = (1, 2)
CONNECTIONS = 64


def _cpu(proc: Proc) -> float:
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def _spec(workers: int) -> TargetSpec:
    base = user_target()
    env = {**base.env, "COMFYGATE_SERVER__WORKERS": str(workers)}
    return TargetSpec(
        f"workers{workers}",
        "comfygate",
        env=env,
        headers=base.headers,
        prepare=base.prepare,
        sid_map=base.sid_map,
        redis=True,
        description=f"{base.description}; --workers {workers}",
    )


async def run(
    tmp: Path,
    comfygate_cmd: list[str],
    loadgen: LoadGenerator,
    *,
    reps: int,
    duration: float,
    restore_cpus: frozenset[int] | None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    cpus = frozenset(range(os.cpu_count() or 1))  # the bench itself is pinned to core 0 now
    group = ProcessGroup(None)  # unpinned: see the module doc
    pin_self(cpus)
    try:
        root = tmp / "workers-root"
        for sub in ("input", "output", "temp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        place_files(root / "output")
        fake_port = free_port()
        argv, _ = fake_command(fake_port, root)
        fake = group.spawn("workers-fake", argv, tmp / "logs" / "workers-fake.log", cwd=REPO)
        await wait_http(f"http://127.0.0.1:{fake_port}/history/bench-ready", fake)
        launcher = Launcher(group, tmp, fake_port, comfygate_cmd, tmp / "logs", root=root)
        running: dict[int, RunningTarget] = {}
        for n in WORKERS:
            running[n] = await launcher.start(_spec(n))
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in WORKERS}
        for rep in range(reps):
            for n, target in running.items():
                log(f"-- workers rep {rep + 1}/{reps}: --workers {n}")
                assert target.proc is not None
                url = f"{target.base}/history/{target.history_id}"
                await _warm(url, target, 16, None)
                cpu0 = _cpu(target.proc)
                r = await loadgen.run(
                    url, connections=CONNECTIONS, duration=duration, headers=target.headers
                )
                cpu = _cpu(target.proc) - cpu0
                cores = cpu / r.seconds if r.seconds > 0 else 0.0
                runs[n].append(
                    {
                        "rps": r.rps,
                        "cpu_us_per_req": cpu / r.requests * 1e6 if r.requests else 0.0,
                        "proxy_cores": cores,
                        "rps_per_core": r.rps / cores if cores > 0 else 0.0,
                        "bad": float(r.errors + r.bad_status),
                    }
                )
    finally:
        group.stop_all()
        pin_self(restore_cpus)
    med = {
        n: {k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]}
        for n in WORKERS
        if runs[n]
    }
    pairs = [a["rps"] / b["rps"] for a, b in zip(runs[2], runs[1], strict=False) if b["rps"]]
    scaling = statistics.median(pairs) if pairs else float("nan")
    log(
        f"--workers 2 vs 1 (regular user, small GET, {CONNECTIONS} connections, "
        f"{len(cpus)} cores shared by everything)"
    )
    for n, m in med.items():
        log(
            f"  --workers {n}: {m['rps']:,.0f} req/s, {m['cpu_us_per_req']:.0f} us CPU/req, "
            f"proxy busy {m['proxy_cores']:.2f} cores, {m['rps_per_core']:,.0f} req/s per core, "
            f"{m['bad']:.0f} errors"
        )
    log(f"  throughput 2 workers / 1 worker: {scaling:.2f}x")
    return {
        "runs": {str(n): r for n, r in runs.items()},
        "median": {str(n): m for n, m in med.items()},
        "scaling": scaling,
        "cores": len(cpus),
    }


__all__ = ["run"]
