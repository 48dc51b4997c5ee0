"""Micro-benchmark: CPU per 100 MB of ``proxy.upstream.http1`` reading large bodies as the
forwarder streams them (``UpstreamResponse.read_chunk`` until the end), as a ``/view`` of a
512 KiB file does.

The server (aiohttp, a separate process) answers every request with the same body and a
Content-Length; ``--streams`` requests run at once over keep-alive connections, so the process
CPU time measured here is the client's alone. Run::

    .venv/bin/python -m bench.view_stream_micro [--requests 2000] [--rounds 3]

For a paired A/B of two checkouts, run it once with each on ``PYTHONPATH`` (from a directory
without a ``proxy`` package, so that the path decides which one is imported). Not part of
``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import uvloop
from aiohttp import web

from bench.procs import local_pool, served_by
from proxy.upstream.http1 import Http1Pool

SIZE = 512 * 1024
BODY = bytes(range(256)) * (SIZE // 256)
HEADERS = [("Host", "127.0.0.1"), ("Accept", "*/*")]


async def _serve() -> None:
    async def view(_: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="image/png")

    app = web.Application()
    app.router.add_get("/view", view)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # parent closes it
    await runner.cleanup()


async def _one(pool: Http1Pool) -> int:
    resp = await pool.request("GET", "/view", HEADERS, None)
    size = 0
    try:
        while chunk := await resp.read_chunk():
            size += len(chunk)
    finally:
        resp.release()
    return size


async def _measure(pool: Http1Pool, requests: int, streams: int) -> float:
    """Client CPU ms per 100 MB over ``requests`` bodies, ``streams`` at a time."""
    left = requests
    moved = 0

    async def worker() -> None:
        nonlocal left, moved
        while left > 0:
            left -= 1
            size = await _one(pool)  # not `moved += await`: that reads moved before awaiting
            moved += size

    cpu0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(streams)))
    cpu = time.process_time() - cpu0
    return cpu * 1e3 / (moved / 100e6) if moved else 0.0


async def run(port: int, requests: int, rounds: int, streams: int) -> None:
    pool = local_pool(port)
    try:
        await _measure(pool, 50, streams)  # connections and buffers exist before measuring
        results = [await _measure(pool, requests, streams) for _ in range(rounds)]
        print(f"client CPU per 100 MB (ms), best of {rounds}: {min(results):.1f}")
        print("rounds:", " ".join(f"{r:.1f}" for r in results))
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(_serve())
        return
    with served_by("bench.view_stream_micro") as port:
        uvloop.run(run(port, args.requests, args.rounds, args.streams))


if __name__ == "__main__":
    main()
