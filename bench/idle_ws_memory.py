"""Memory of idle WebSocket pairs, by allocation site: ``python -m bench.idle_ws_memory``.

comfygate runs in this process (the ``comfygate-user`` configuration: a regular user, isolation,
rate limits in Redis, policy, access log and metrics), the fake ComfyUI and the clients in
processes of their own, so that tracemalloc sees only the proxy's allocations. It opens
``--sockets`` idle sockets through the proxy and reports, per pair (client leg + upstream leg):
the RSS growth, the Python allocations (tracemalloc) and where they come from, and the asyncio
tasks alive. Handshake cost is reported as the proxy's CPU time per open.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import psutil
from aiohttp import web

from bench.procs import free_port
from bench.targets import BENCH_JWT_SECRET, PASS_THROUGH, bench_token, fake_command
from bench.user_target import USER_ROLE, user_roles
from proxy.app import create_app
from proxy.observability.logging import configure_logging
from proxy.settings import load_settings
from tests.redis_server import start_redis


async def hold(ws_base: str, token: str, count: int) -> None:
    """The clients' process: open ``count`` sockets, say so, hold them until stdin closes."""
    from bench import wsload  # noqa: PLC0415 - only in the clients' process

    session, clients, failed, seconds = await wsload.open_idle(
        ws_base, {"Authorization": f"Bearer {token}"}, count
    )
    print(json.dumps({"opened": len(clients), "failed": failed, "seconds": seconds}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await wsload.close_idle(session, clients)


async def _wait_http(url: str, limit: float = 20.0) -> None:
    import aiohttp  # noqa: PLC0415

    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as resp:
                    await resp.read()
                    return
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)  # polling a child process's start-up


async def _clients(
    ws_base: str, token: str, count: int
) -> tuple[asyncio.subprocess.Process, dict[str, float]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.idle_ws_memory", "--hold", ws_base, "--token", token,
        "--sockets", str(count),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    return proc, json.loads(line)


async def _release(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    await proc.wait()


async def measure(count: int, top: int, *, trace: bool = True, raw: bool = True) -> None:
    root = Path(tempfile.mkdtemp(prefix="comfygate-idle-"))
    fake_port = free_port()
    argv, _ = fake_command(fake_port, root)
    fake = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    redis = start_redis()
    try:
        await _wait_http(f"http://127.0.0.1:{fake_port}/system_stats")
        env = {
            "COMFYGATE_UPSTREAM__URLS": json.dumps([f"http://127.0.0.1:{fake_port}"]),
            **PASS_THROUGH,
            "COMFYGATE_LOGGING__FORMAT": "json",
            "COMFYGATE_REDIS__URL": redis.url,
            "COMFYGATE_AUTH__JWT__SECRET": BENCH_JWT_SECRET,
            "COMFYGATE_ROLES": user_roles(),
            "COMFYGATE_WEBSOCKET__RAW_RELAY": "true" if raw else "false",
        }
        settings = load_settings(None, environ=env)
        configure_logging(settings.logging)  # as `comfygate serve` does
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ws_base = f"ws://127.0.0.1:{port}"
        token = bench_token((USER_ROLE,))
        warm, _ = await _clients(ws_base, token, 20)  # lazily built state is not per socket
        await _release(warm)
        me = psutil.Process()
        out = sys.stderr  # stdout carries the proxy's log lines
        # Phase 1, untraced: RSS, the proxy's CPU per handshake, opens per second.
        gc.collect()
        rss0, cpu0 = me.memory_info().rss, sum(me.cpu_times()[:2])
        tasks0 = len(asyncio.all_tasks())
        proc, opened = await _clients(ws_base, token, count)
        cpu1 = sum(me.cpu_times()[:2])
        await asyncio.sleep(1.0)  # let the last handshakes' transient buffers go
        gc.collect()
        rss1 = me.memory_info().rss
        tasks1 = len(asyncio.all_tasks())
        await _release(proc)
        n = int(opened["opened"])
        print(f"sockets: {n} opened, {opened['failed']:.0f} failed, "
              f"{n / opened['seconds']:.0f}/s", file=out)  # fmt: skip
        print(f"handshake: {(cpu1 - cpu0) / n * 1e6:.0f} us proxy CPU per open", file=out)
        print(f"RSS per pair: {(rss1 - rss0) / n / 1024:.1f} KiB", file=out)
        print(f"tasks per pair: {(tasks1 - tasks0) / n:.2f}", file=out)
        if not trace:
            return
        # Phase 2, traced: where the Python allocations of a pair come from.
        await asyncio.sleep(1.0)  # the released sockets' handlers finish
        gc.collect()
        tracemalloc.start(8)
        before = tracemalloc.take_snapshot()
        proc, opened = await _clients(ws_base, token, count)
        await asyncio.sleep(1.0)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        n = int(opened["opened"])
        diff = after.compare_to(before, "lineno")
        traced = sum(d.size_diff for d in diff)
        print(f"traced Python allocations per pair: {traced / n / 1024:.1f} KiB", file=out)
        print("-- by file (bytes per pair)", file=out)
        for d in after.compare_to(before, "filename")[:top]:
            print(f"{d.size_diff / n:9.0f}  {d.traceback[0].filename}", file=out)
        print("-- by line (bytes per pair)", file=out)
        for d in diff[:top]:
            frame = d.traceback[0]
            print(f"{d.size_diff / n:9.0f}  {frame.filename}:{frame.lineno}", file=out)
        print("-- comfygate's own lines (bytes per pair)", file=out)
        for d in diff:
            frame = d.traceback[0]
            if "/proxy/" in frame.filename and d.size_diff / n >= 8:
                print(f"{d.size_diff / n:9.0f}  {frame.filename}:{frame.lineno}", file=out)
        await _release(proc)
        await runner.cleanup()
    finally:
        fake.terminate()
        await fake.wait()
        redis.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.idle_ws_memory", description=__doc__)
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-trace", action="store_true", help="phase 1 only (for profilers)")
    p.add_argument(
        "--aiohttp-relay", action="store_true", help="websocket.raw_relay = false (the A/B)"
    )
    p.add_argument("--hold", default="", help=argparse.SUPPRESS)
    p.add_argument("--token", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    import uvloop  # noqa: PLC0415

    if args.hold:
        uvloop.run(hold(args.hold, args.token, args.sockets))
    else:
        os.environ.setdefault("PYTHONHASHSEED", "0")
        uvloop.run(
            measure(args.sockets, args.top, trace=not args.no_trace, raw=not args.aiohttp_relay)
        )


if __name__ == "__main__":
    main()
