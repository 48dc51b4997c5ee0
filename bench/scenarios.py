"""The measurements. Each scenario is one async function measuring one target once; the runner
alternates targets inside every repetition. Adding a scenario: write the function, append a
`Scenario` to `SCENARIOS` (and a `Goal` in bench/report.py if it has a target figure)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from bench import wsload
from bench.fixtures import BIG_FILE, BIG_SIZE, VIEW_FILE, VIEW_SIZE, Fixtures
from bench.loadgen import LoadGenerator
from bench.procs import Proc
from bench.targets import ALL_KINDS, PROXY_KINDS, Kind, RunningTarget


@dataclass
class Options:
    reps: int = 3
    duration: float = 3.0
    idle_ws: int = 2000
    ws_connections: int = 8
    ws_frame: int = 128 * 1024
    ws_rate: float = 20.0


@dataclass
class BenchContext:
    opts: Options
    fake_base: str
    fake_proc: Proc
    fixtures: Fixtures
    control: aiohttp.ClientSession  # straight to the fake: control endpoint, setup, resets
    loadgen: LoadGenerator
    work: Path
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    added: bool = False  # also report through-proxy minus direct (latencies)
    ratio: bool = True  # report ratios to direct / nginx
    digits: int = 0


ScenarioFn = Callable[[BenchContext, RunningTarget], Awaitable[dict[str, float]]]
AfterFn = Callable[[BenchContext], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: ScenarioFn
    metrics: tuple[Metric, ...]
    kinds: frozenset[Kind] = ALL_KINDS  # which targets it applies to
    reps: int | None = None  # None: --reps
    fresh: bool = False  # restart the proxies first (memory figures from a clean process)
    after: AfterFn | None = None  # reset upstream state after each run
    notes: tuple[str, ...] = field(default_factory=tuple)


ERRORS = Metric("errors", "socket errors + timeouts", "n", higher_is_better=False, ratio=False)
BAD = Metric("bad_status", "non-2xx/3xx answers", "n", higher_is_better=False, ratio=False)
CPU = Metric("cpu_us_per_req", "CPU of target per request", "us", False, digits=1)


def _cpu_seconds(target: RunningTarget, ctx: BenchContext) -> float:
    """User+system CPU of the proxy's process tree (for direct: the fake's)."""
    proc = target.proc or ctx.fake_proc
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


async def _warm(url: str, target: RunningTarget, concurrency: int, body: bytes | None) -> None:
    """A few rounds of requests so keep-alive pools and caches exist before measuring."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    method = "POST" if body is not None else "GET"
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:

        async def one() -> None:
            for _ in range(3):
                async with s.request(method, url, data=body, headers=target.headers) as r:
                    await r.read()

        await asyncio.gather(*(one() for _ in range(concurrency)), return_exceptions=True)


async def _http(
    ctx: BenchContext,
    target: RunningTarget,
    path: str,
    connections: int,
    body_file: Path | None = None,
) -> dict[str, float]:
    url = target.base + path
    body = ctx.fixtures.prompt_body if body_file else None
    await _warm(url, target, min(connections, 16), body)
    cpu0 = _cpu_seconds(target, ctx)
    result = await ctx.loadgen.run(
        url,
        connections=connections,
        duration=ctx.opts.duration,
        headers=target.headers,
        body_file=body_file,
    )
    cpu = _cpu_seconds(target, ctx) - cpu0
    out = result.metrics()
    out["cpu_us_per_req"] = cpu / result.requests * 1e6 if result.requests else 0.0
    return out


def _history_path(ctx: BenchContext, target: RunningTarget) -> str:
    """The ~2 KB entry: a regular user's own (its target's), else the fixtures' one."""
    return f"/history/{target.history_id or ctx.fixtures.history_id}"


async def get_small(ctx: BenchContext, target: RunningTarget) -> dict[str, float]:
    return await _http(ctx, target, _history_path(ctx, target), 64)


async def get_one_conn(ctx: BenchContext, target: RunningTarget) -> dict[str, float]:
    return await _http(ctx, target, _history_path(ctx, target), 1)


async def view_512k(ctx: BenchContext, target: RunningTarget) -> dict[str, float]:
    view = target.view_file or VIEW_FILE
    out = await _http(ctx, target, f"/view?filename={view}&type=output", 16)
    # CPU per 100 MB moved (the unit for large bodies): CPU/request over MB/request.
    out["cpu_ms_per_100mb"] = out["cpu_us_per_req"] / 1e3 * (100e6 / VIEW_SIZE)
    return out


POST_CONNECTIONS = 32


async def post_prompt(ctx: BenchContext, target: RunningTarget) -> dict[str, float]:
    return await _http(
        ctx, target, "/prompt", POST_CONNECTIONS, body_file=ctx.fixtures.prompt_body_file
    )


async def reset_upstream(ctx: BenchContext) -> None:
    await ctx.fixtures.reset(ctx.control)


async def ws_relay(ctx: BenchContext, target: RunningTarget) -> dict[str, float]:
    cpu0 = _cpu_seconds(target, ctx)
    r = await wsload.ws_relay(
        ctx.control,
        ctx.fake_base,
        target.ws_base,
        target.headers,
        connections=ctx.opts.ws_connections,
        frame_size=ctx.opts.ws_frame,
        duration=ctx.opts.duration,
        sid_map=target.spec.sid_map,
        kind=target.preview_type,
        prompt_id=target.preview_prompt_id,
    )
    cpu = _cpu_seconds(target, ctx) - cpu0
    return {
        "mbps": r.mbps,
        "frames": float(r.frames),
        "lost": float(r.lost),
        "cpu_us_per_frame": cpu / r.frames * 1e6 if r.frames else 0.0,
    }


async def ws_latency(ctx: BenchContext, target: RunningTarget) -> dict[str, float]:
    half = ctx.opts.duration / 2
    big = await wsload.ws_frame_latency(
        ctx.control,
        ctx.fake_base,
        target.ws_base,
        target.headers,
        frame_size=ctx.opts.ws_frame,
        rate=ctx.opts.ws_rate,
        duration=half,
        sid_map=target.spec.sid_map,
        kind=target.preview_type,
        prompt_id=target.preview_prompt_id,
    )
    small = await wsload.ws_frame_latency(
        ctx.control,
        ctx.fake_base,
        target.ws_base,
        target.headers,
        frame_size=64,
        rate=ctx.opts.ws_rate,
        duration=half,
        sid_map=target.spec.sid_map,
        kind=target.preview_type,
        prompt_id=target.preview_prompt_id,
    )
    return {
        "p50_us": big.p50_us,
        "p90_us": big.p90_us,
        "small_p50_us": small.p50_us,
        "lost": float(big.lost + small.lost),
    }


async def _settled_rss(target: RunningTarget, samples: int = 5) -> int:
    values = []
    for _ in range(samples):
        values.append(target.rss())
        await asyncio.sleep(0.1)
    return int(statistics.median(values))


async def idle_ws(ctx: BenchContext, target: RunningTarget) -> dict[str, float]:
    # One handshake first so lazily created state (sessions, pools) is not counted per socket.
    async with aiohttp.ClientSession() as s:
        first = await wsload.open_ws(s, target.ws_base, target.headers)
        await first.close()
    gc.collect()
    await asyncio.sleep(0.5)
    before = await _settled_rss(target)
    session, clients, failed, seconds = await wsload.open_idle(
        target.ws_base, target.headers, ctx.opts.idle_ws
    )
    try:
        await asyncio.sleep(1.0)
        after = await _settled_rss(target)
        alive = sum(1 for c in clients if not c.ws.closed)
    finally:
        await wsload.close_idle(session, clients)
    opened = len(clients)
    return {
        "kb_per_pair": (after - before) / opened / 1024 if opened else float("nan"),
        "opened": float(opened),
        "failed": float(failed),
        "opens_per_s": opened / seconds if seconds > 0 else 0.0,
        "alive": float(alive),
        "rss_before_mb": before / 1e6,
        "rss_after_mb": after / 1e6,
    }


class RssSampler:
    """Samples a process tree's RSS every ``interval`` seconds on a thread (steady cadence even
    while the event loop is busy moving 200 MB)."""

    def __init__(self, target: RunningTarget, interval: float = 0.05) -> None:
        self.target = target
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append(self.target.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


async def _download(target: RunningTarget) -> tuple[int, float, int]:
    url = f"{target.base}/view?filename={BIG_FILE}&type=output"
    timeout = aiohttp.ClientTimeout(total=300)
    t0 = time.perf_counter()
    n = 0
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.get(url, headers=target.headers) as r,
    ):
        async for chunk in r.content.iter_chunked(1 << 20):
            n += len(chunk)
        status = r.status
    return n, time.perf_counter() - t0, status


async def _upload(target: RunningTarget, path: Path) -> tuple[int, float, int]:
    url = f"{target.base}/upload/image"
    timeout = aiohttp.ClientTimeout(total=300)
    t0 = time.perf_counter()
    with path.open("rb") as f:
        form = aiohttp.FormData()
        form.add_field("image", f, filename="bench_upload_200m.png", content_type="image/png")
        form.add_field("overwrite", "true")
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.post(url, data=form, headers=target.headers) as r,
        ):
            await r.read()
            status = r.status
    return BIG_SIZE, time.perf_counter() - t0, status


async def stream_200mb(ctx: BenchContext, target: RunningTarget) -> dict[str, float]:
    big = ctx.work / "root" / "output" / BIG_FILE
    out: dict[str, float] = {}
    ops: list[tuple[str, Callable[[], Awaitable[tuple[int, float, int]]]]] = [
        ("get", lambda: _download(target)),
        ("upload", lambda: _upload(target, big)),
    ]
    for name, op in ops:
        gc.collect()
        baseline = await _settled_rss(target)
        with RssSampler(target) as sampler:
            n, seconds, status = await op()
            await asyncio.sleep(0.2)
        out[f"{name}_peak_mb"] = (sampler.peak - baseline) / 1e6
        out[f"{name}_mbps"] = n / seconds / 1e6 if seconds > 0 else 0.0
        out[f"{name}_status"] = float(status)
        out[f"{name}_ok"] = float(status == 200 and (name == "upload" or n == BIG_SIZE))
    return out


SCENARIOS: list[Scenario] = [
    Scenario(
        "get_small",
        "GET /history/{id} (~2 KB JSON), 64 connections",
        get_small,
        (
            Metric("rps", "requests/s", "req/s"),
            Metric("p50_us", "p50 latency", "us", higher_is_better=False),
            Metric("p99_us", "p99 latency", "us", higher_is_better=False),
            CPU,
            ERRORS,
            BAD,
        ),
    ),
    Scenario(
        "get_latency",
        "GET /history/{id}, 1 connection",
        get_one_conn,
        (
            Metric("p50_us", "p50 latency", "us", higher_is_better=False, added=True),
            Metric("p99_us", "p99 latency", "us", higher_is_better=False, added=True),
            Metric("rps", "requests/s", "req/s"),
            ERRORS,
            BAD,
        ),
    ),
    Scenario(
        "view_512k",
        "GET /view of a 512 KiB file, 16 connections",
        view_512k,
        (
            Metric("mbps", "throughput", "MB/s"),
            Metric("rps", "requests/s", "req/s"),
            CPU,
            Metric("cpu_ms_per_100mb", "CPU of target per 100 MB", "ms", False, digits=1),
            ERRORS,
            BAD,
        ),
    ),
    Scenario(
        "post_prompt",
        f"POST /prompt with a 20 KB JSON body, {POST_CONNECTIONS} connections",
        post_prompt,
        (Metric("rps", "requests/s", "req/s"), CPU, ERRORS, BAD),
        after=reset_upstream,
        notes=("the same prompt every time; queue and history cleared after every run",),
    ),
    Scenario(
        "ws_relay",
        "WebSocket binary preview relay, 128 KiB frames, 8 connections",
        ws_relay,
        (
            Metric("mbps", "throughput", "MB/s"),
            Metric("cpu_us_per_frame", "CPU of target per frame", "us", False, digits=1),
            Metric("lost", "frames sent but not received", "n", False, ratio=False),
        ),
        notes=(
            "frames are produced by the fake's POST /__fake__/ws_stream in batches of 16 per "
            "socket, back to back; MB/s = bytes received / (first batch request .. last frame)",
        ),
    ),
    Scenario(
        "ws_latency",
        "WebSocket per-frame latency, paced at 20 frames/s, 1 connection",
        ws_latency,
        (
            Metric("p50_us", "128 KiB frame p50", "us", higher_is_better=False, added=True),
            Metric("p90_us", "128 KiB frame p90", "us", higher_is_better=False, added=True),
            Metric("small_p50_us", "64 B frame p50", "us", higher_is_better=False, added=True),
            Metric("lost", "frames lost", "n", False, ratio=False),
        ),
        notes=(
            "each sample: time from the bench's control request to the fake (POST "
            "/__fake__/ws_stream, count 1) to the frame's receipt on the socket through the "
            "target; the control request costs the same for all targets, so through-proxy "
            "minus direct (same repetition) is the latency the proxy adds",
        ),
    ),
    Scenario(
        "idle_ws",
        "Idle WebSockets held open through the proxy (RSS per client+upstream pair)",
        idle_ws,
        (
            Metric("kb_per_pair", "RSS per idle pair", "KiB", False, ratio=True, digits=1),
            Metric("opened", "sockets opened", "n", ratio=False),
            Metric("failed", "handshakes failed", "n", False, ratio=False),
            Metric("opens_per_s", "opens per second (50 handshakes in flight)", "1/s"),
            Metric("rss_before_mb", "RSS before", "MB", False, ratio=False, digits=1),
            Metric("rss_after_mb", "RSS after", "MB", False, ratio=False, digits=1),
        ),
        kinds=PROXY_KINDS,
        reps=1,
        fresh=True,
        notes=("proxy restarted first; nginx RSS = master + worker",),
    ),
    Scenario(
        "stream_200mb",
        "RSS while a 200 MB body streams through comfygate (sampled every 50 ms)",
        stream_200mb,
        (
            Metric("get_peak_mb", "GET /view: peak RSS growth", "MB", False, ratio=False, digits=1),
            Metric("upload_peak_mb", "upload: peak RSS growth", "MB", False, ratio=False, digits=1),
            Metric("get_mbps", "GET throughput", "MB/s", ratio=False),
            Metric("upload_mbps", "upload throughput", "MB/s", ratio=False),
            Metric("get_ok", "GET complete (1 = yes)", "", ratio=False),
            Metric("upload_ok", "upload answered 200 (1 = yes)", "", ratio=False),
        ),
        kinds=frozenset({"comfygate"}),
        reps=1,
        fresh=True,
    ),
]
