"""HTTP load generators: wrk + bench/wrk/bench.lua when installed, else an aiohttp closed loop."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from bench.procs import child_setup

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "bench.lua"


@dataclass(frozen=True)
class HttpLoadResult:
    requests: int
    seconds: float
    bytes: int
    errors: int  # socket errors and timeouts
    bad_status: int  # answers outside 2xx/3xx
    p50_us: float
    p99_us: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "rps": self.rps,
            "mbps": self.mbps,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "errors": float(self.errors),
            "bad_status": float(self.bad_status),
        }


class LoadGenerator:
    """Closed-loop HTTP load: ``connections`` keep-alive connections, each one request at a time."""

    name = "abstract"

    async def run(
        self,
        url: str,
        *,
        connections: int,
        duration: float,
        headers: Mapping[str, str],
        body_file: Path | None = None,
    ) -> HttpLoadResult:
        raise NotImplementedError


class WrkLoadGenerator(LoadGenerator):
    """wrk (one thread: it shares core 0 with nothing else) + bench/wrk/bench.lua."""

    name = "wrk"

    def __init__(self, wrk: str) -> None:
        self.wrk = wrk

    async def run(
        self,
        url: str,
        *,
        connections: int,
        duration: float,
        headers: Mapping[str, str],
        body_file: Path | None = None,
    ) -> HttpLoadResult:
        seconds = max(1, round(duration))  # wrk takes whole seconds
        env = dict(os.environ)
        env["BENCH_BODY_FILE"] = str(body_file) if body_file else ""
        env["BENCH_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in headers.items())
        argv = [self.wrk, "-t1", f"-c{connections}", f"-d{seconds}", "--timeout", "10"]
        argv += ["--latency", "-s", str(WRK_SCRIPT), url]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            preexec_fn=child_setup(None),  # inherits the bench's core 0
        )
        try:
            async with asyncio.timeout(seconds + 60):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        text = out.decode(errors="replace")
        line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result:\n{text[-2000:]}")
        d = orjson.loads(line.removeprefix("BENCH_JSON "))
        errors = d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"]
        return HttpLoadResult(
            requests=int(d["requests"]),
            seconds=d["duration_us"] / 1e6,
            bytes=int(d["bytes"]),
            errors=int(errors),
            bad_status=int(d["err_status"]),
            p50_us=float(d["p50_us"]),
            p99_us=float(d["p99_us"]),
        )


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return math.nan
    k = min(len(sorted_values) - 1, max(0, math.ceil(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


class AiohttpLoadGenerator(LoadGenerator):
    """Fallback when wrk is missing. One Python core saturates at a few thousand requests/s, so
    its throughput figures understate fast targets: compare ratios, not absolute numbers."""

    name = "aiohttp closed loop"

    async def run(
        self,
        url: str,
        *,
        connections: int,
        duration: float,
        headers: Mapping[str, str],
        body_file: Path | None = None,
    ) -> HttpLoadResult:
        body = await asyncio.to_thread(body_file.read_bytes) if body_file else None
        method = "POST" if body is not None else "GET"
        hdrs = dict(headers)
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        latencies: list[float] = []
        counts = {"bytes": 0, "errors": 0, "bad": 0}
        connector = aiohttp.TCPConnector(limit=connections, force_close=False)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = time.perf_counter()
            deadline = start + duration

            async def worker() -> None:
                while (t0 := time.perf_counter()) < deadline:
                    try:
                        async with session.request(method, url, data=body, headers=hdrs) as r:
                            n = 0
                            async for chunk in r.content.iter_any():
                                n += len(chunk)
                            counts["bytes"] += n
                            if r.status >= 400:
                                counts["bad"] += 1
                    except (aiohttp.ClientError, OSError, TimeoutError):
                        counts["errors"] += 1
                        continue
                    latencies.append((time.perf_counter() - t0) * 1e6)

            await asyncio.gather(*(worker() for _ in range(connections)))
            seconds = time.perf_counter() - start
        latencies.sort()
        return HttpLoadResult(
            requests=len(latencies),
            seconds=seconds,
            bytes=counts["bytes"],
            errors=counts["errors"],
            bad_status=counts["bad"],
            p50_us=percentile(latencies, 50),
            p99_us=percentile(latencies, 99),
        )


def pick_load_generator(force_aiohttp: bool = False) -> LoadGenerator:
    wrk = None if force_aiohttp else shutil.which("wrk")
    return WrkLoadGenerator(wrk) if wrk else AiohttpLoadGenerator()
