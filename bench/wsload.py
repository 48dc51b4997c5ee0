"""WebSocket load: preview-frame relay throughput, per-frame latency, idle connections.

Frames are produced by the fake upstream's control endpoint ``POST /__fake__/ws_stream``, which
the bench calls directly on the fake (never through the proxy); the bench's clients connect to
``/ws?clientId=...`` through the target under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import orjson

from bench.loadgen import percentile

FRAME_TYPE_PREVIEW = 1  # BinaryEventTypes.PREVIEW_IMAGE


SidMap = Callable[[str], str]
"""Client id -> the id the upstream sees (a proxy may namespace it)."""


class WsClient:
    """One WebSocket through the target, counting the binary frames it receives."""

    def __init__(
        self, ws: aiohttp.ClientWebSocketResponse, sid: str, upstream_sid: str | None = None
    ) -> None:
        self.ws = ws
        self.sid = sid
        self.upstream_sid = upstream_sid or sid
        """The id the fake knows this socket by (comfygate namespaces client ids per user)."""
        self.frames = 0
        self.bytes = 0
        self.last_rx = 0.0
        self.first_rx = 0.0
        self.waiters: list[tuple[int, asyncio.Future[float]]] = []
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._reader(), name=f"ws-reader-{self.sid}")

    async def _reader(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                now = time.perf_counter()
                if not self.frames:
                    self.first_rx = now
                self.frames += 1
                self.bytes += len(msg.data)
                self.last_rx = now
                if self.waiters:
                    still = []
                    for target, fut in self.waiters:
                        if self.frames >= target and not fut.done():
                            fut.set_result(now)
                        elif not fut.done():
                            still.append((target, fut))
                    self.waiters = still
            elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                break

    def wait_frames(self, total: int) -> asyncio.Future[float]:
        """Resolves with the receipt time (perf_counter) of frame number ``total``."""
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if self.frames >= total:
            fut.set_result(self.last_rx)
        else:
            self.waiters.append((total, fut))
        return fut

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.ws.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


async def open_ws(
    session: aiohttp.ClientSession,
    ws_base: str,
    headers: Mapping[str, str],
    sid: str | None = None,
    limit_s: float = 15.0,
    sid_map: SidMap | None = None,
) -> WsClient:
    """Connect and wait for the upstream's first ``status`` message (proves both legs are up)."""
    sid = sid or f"bench-{uuid.uuid4().hex}"
    async with asyncio.timeout(limit_s):
        ws = await session.ws_connect(
            f"{ws_base}/ws?clientId={sid}",
            headers=dict(headers),
            max_msg_size=0,
            autoping=True,
            compress=0,
        )
        msg = await ws.receive()
    if msg.type != aiohttp.WSMsgType.TEXT:
        await ws.close()
        raise RuntimeError(f"expected a status message on connect, got {msg.type!r}")
    client = WsClient(ws, sid, sid_map(sid) if sid_map is not None else None)
    client.start()
    return client


async def ws_stream(
    session: aiohttp.ClientSession,
    fake_base: str,
    sid: str,
    count: int,
    size: int,
    interval_ms: float = 0.0,
    kind: int = FRAME_TYPE_PREVIEW,
    prompt_id: str = "",
) -> int:
    """Ask the fake to send ``count`` binary frames to ``sid``; returns how many it sent.
    ``kind`` 4 frames carry metadata naming ``prompt_id`` (an isolated user's own previews)."""
    body: dict[str, object] = {
        "sid": sid,
        "count": count,
        "size": size,
        "type": kind,
        "interval_ms": interval_ms,
    }
    if prompt_id:
        body["prompt_id"] = prompt_id
    async with session.post(f"{fake_base}/__fake__/ws_stream", json=body) as resp:
        data = orjson.loads(await resp.read())
        if resp.status != 200:
            raise RuntimeError(f"ws_stream answered {resp.status}: {data}")
        return int(data["sent"])


@dataclass(frozen=True)
class RelayResult:
    frames: int
    bytes: int
    seconds: float
    lost: int

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


async def ws_relay(
    control: aiohttp.ClientSession,
    fake_base: str,
    ws_base: str,
    headers: Mapping[str, str],
    *,
    connections: int,
    frame_size: int,
    duration: float,
    batch: int = 16,
    sid_map: SidMap | None = None,
    kind: int = FRAME_TYPE_PREVIEW,
    prompt_id: str = "",
) -> RelayResult:
    """``connections`` sockets, each fed back to back in batches of ``batch`` frames until
    ``duration`` has passed; throughput = bytes received / (first request .. last frame)."""
    async with aiohttp.ClientSession() as session:
        clients = [
            await open_ws(session, ws_base, headers, sid_map=sid_map) for _ in range(connections)
        ]
        try:
            sent = [0] * connections
            start = time.perf_counter()
            deadline = start + duration

            async def feed(i: int) -> None:
                while time.perf_counter() < deadline:
                    sent[i] += await ws_stream(
                        control,
                        fake_base,
                        clients[i].upstream_sid,
                        batch,
                        frame_size,
                        kind=kind,
                        prompt_id=prompt_id,
                    )

            async with asyncio.timeout(duration + 60):
                await asyncio.gather(*(feed(i) for i in range(connections)))
            lost = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await asyncio.gather(
                        *(c.wait_frames(n) for c, n in zip(clients, sent, strict=True))
                    )
            lost = sum(max(0, n - c.frames) for c, n in zip(clients, sent, strict=True))
            end = max(c.last_rx for c in clients)
            return RelayResult(
                frames=sum(c.frames for c in clients),
                bytes=sum(c.bytes for c in clients),
                seconds=end - start,
                lost=lost,
            )
        finally:
            await asyncio.gather(*(c.close() for c in clients))


@dataclass(frozen=True)
class LatencyResult:
    samples: int
    p50_us: float
    p90_us: float
    lost: int


async def ws_frame_latency(
    control: aiohttp.ClientSession,
    fake_base: str,
    ws_base: str,
    headers: Mapping[str, str],
    *,
    frame_size: int,
    rate: float,
    duration: float,
    sid_map: SidMap | None = None,
    kind: int = FRAME_TYPE_PREVIEW,
    prompt_id: str = "",
) -> LatencyResult:
    """Paced frames on one socket: for each, the time from asking the fake to send one frame to
    its receipt. The control request costs the same for every target, so through-proxy minus
    direct is the latency the proxy adds per frame."""
    samples: list[float] = []
    lost = 0
    async with aiohttp.ClientSession() as session:
        client = await open_ws(session, ws_base, headers, sid_map=sid_map)
        try:
            n = max(5, int(rate * duration))
            period = 1.0 / rate
            start = time.perf_counter()
            for i in range(n):
                target = client.frames + 1
                fut = client.wait_frames(target)
                t0 = time.perf_counter()
                await ws_stream(
                    control,
                    fake_base,
                    client.upstream_sid,
                    1,
                    frame_size,
                    kind=kind,
                    prompt_id=prompt_id,
                )
                try:
                    async with asyncio.timeout(5):
                        rx = await fut
                    samples.append((rx - t0) * 1e6)
                except TimeoutError:
                    lost += 1
                delay = start + (i + 1) * period - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
        finally:
            await client.close()
    samples.sort()
    return LatencyResult(len(samples), percentile(samples, 50), percentile(samples, 90), lost)


async def open_idle(
    ws_base: str,
    headers: Mapping[str, str],
    count: int,
    parallel: int = 50,
    limit_s: float = 120.0,
) -> tuple[aiohttp.ClientSession, list[WsClient], int, float]:
    """Open ``count`` idle sockets (``parallel`` handshakes in flight); returns the session (the
    caller closes it with `close_idle`), the clients, the number that failed and the seconds
    all the handshakes took (opens per second = opened / seconds)."""
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=connector)
    clients: list[WsClient] = []
    failed = 0
    sem = asyncio.Semaphore(parallel)

    async def one() -> None:
        nonlocal failed
        async with sem:
            try:
                clients.append(await open_ws(session, ws_base, headers, limit_s=30))
            except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError):
                failed += 1

    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit_s):
            await asyncio.gather(*(one() for _ in range(count)))
    except BaseException:
        await close_idle(session, clients)
        raise
    return session, clients, failed, time.perf_counter() - started


async def close_idle(session: aiohttp.ClientSession, clients: list[WsClient]) -> None:
    sem = asyncio.Semaphore(200)

    async def one(c: WsClient) -> None:
        async with sem:
            await c.close()

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            await asyncio.gather(*(one(c) for c in clients))
    await session.close()
