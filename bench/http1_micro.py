"""Micro-benchmark: CPU per request of ``proxy.upstream.http1`` vs ``aiohttp.ClientSession``.

Both clients send the same sequential requests over one keep-alive connection to a local
aiohttp server running in a *separate process*, so the process CPU time measured here is the
client's alone. Run::

    .venv/bin/python -m bench.http1_micro [--requests 20000] [--rounds 3]

Prints µs of client CPU (and wall time) per request for a small GET, a 1 KiB POST and a
64 KiB GET. Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import uvloop
from aiohttp import web

from bench.procs import local_pool, served_by
from proxy.upstream.http1 import Http1Pool

SMALL = b"x" * 100
LARGE = b"y" * 65536
POST_BODY = b"p" * 1024
HEADERS = [
    ("Host", "127.0.0.1"),
    ("User-Agent", "bench"),
    ("Accept", "*/*"),
    ("X-Request-Id", "0123456789abcdef"),
]


# -- server (child process) -------------------------------------------------------------------


async def _serve() -> None:
    async def small(_: web.Request) -> web.Response:
        return web.Response(body=SMALL)

    async def large(_: web.Request) -> web.Response:
        return web.Response(body=LARGE)

    async def echo_len(request: web.Request) -> web.Response:
        return web.Response(body=str(len(await request.read())).encode())

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/large", large)
    app.router.add_post("/post", echo_len)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    # Parent closes stdin to stop us.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


# -- clients ------------------------------------------------------------------------------


Request = Callable[[], Awaitable[bytes]]


def http1_client(pool: Http1Pool, method: str, path: str, body: bytes | None) -> Request:
    async def one() -> bytes:
        resp = await pool.request(method, path, HEADERS, body)
        data = await resp.read()
        resp.release()
        return data

    return one


def aiohttp_client(
    session: aiohttp.ClientSession, base: str, method: str, path: str, body: bytes | None
) -> Request:
    # A "careful" aiohttp usage: no auto headers, no redirects, headers passed as a dict.
    headers = dict(HEADERS)
    url = base + path

    async def one() -> bytes:
        async with session.request(
            method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        ) as resp:
            return await resp.read()

    return one


async def measure(one: Request, n: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per request over ``n`` sequential requests, after a warm-up."""
    for _ in range(200):
        await one()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await one()
    cpu1, wall1 = time.process_time(), time.perf_counter()
    return (cpu1 - cpu0) / n * 1e6, (wall1 - wall0) / n * 1e6


async def run(port: int, n: int, rounds: int) -> None:
    base = f"http://127.0.0.1:{port}"
    pool = local_pool(port)
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))
    cases = [("small GET", "GET", "/small", None), ("1 KiB POST", "POST", "/post", POST_BODY)]
    cases.append(("64 KiB GET", "GET", "/large", None))
    try:
        print(f"{'case':<12} {'client':<10} {'cpu µs/req':>11} {'wall µs/req':>12}")
        for label, method, path, body in cases:
            clients = {
                "http1": http1_client(pool, method, path, body),
                "aiohttp": aiohttp_client(session, base, method, path, body),
            }
            best: dict[str, tuple[float, float]] = {}
            for _ in range(rounds):  # interleaved rounds, best of: less noise from the host
                for name, one in clients.items():
                    cpu, wall = await measure(one, n)
                    prev = best.get(name)
                    if prev is None or cpu < prev[0]:
                        best[name] = (cpu, wall)
            for name, (cpu, wall) in best.items():
                print(f"{label:<12} {name:<10} {cpu:>11.1f} {wall:>12.1f}")
            ratio = best["aiohttp"][0] / best["http1"][0]
            print(f"{label:<12} {'ratio':<10} {ratio:>10.2f}x")
    finally:
        await pool.close()
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(_serve())
        return
    with served_by("bench.http1_micro") as port:
        uvloop.run(run(port, args.requests, args.rounds))


if __name__ == "__main__":
    main()
