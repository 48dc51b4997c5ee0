"""Redis commands per user request: ``python -m bench.redis_per_request``.

A deterministic companion of the bench's CPU figures: comfygate (a regular user, isolation,
rate limits and state in Redis) runs in this process in front of the fake ComfyUI; the user
submits a prompt and it runs; then ``--requests`` reads of ``GET /history/{id}`` (the bench's
small GET) are made and Redis's own count of the commands it processed
(``INFO stats: total_commands_processed``) is divided by them. Each command here is one round
trip (the proxy pipelines nothing on this path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import redis.asyncio as redis
from aiohttp import web

from bench.idle_ws_memory import _wait_http
from bench.procs import free_port
from bench.targets import BENCH_JWT_SECRET, PASS_THROUGH, bench_token, fake_command
from bench.user_target import USER_ROLE, prepare_user, user_roles
from proxy.app import create_app
from proxy.observability.logging import configure_logging
from proxy.settings import load_settings
from tests.redis_server import start_redis


async def _commands(client: redis.Redis) -> int:
    info: dict[str, Any] = await client.info("stats")
    return int(info["total_commands_processed"])


async def _by_command(client: redis.Redis) -> dict[str, int]:
    info: dict[str, Any] = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def measure(requests: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="comfygate-trips-"))
    fake_port = free_port()
    argv, _ = fake_command(fake_port, root)
    fake = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    server = start_redis()
    try:
        await _wait_http(f"http://127.0.0.1:{fake_port}/system_stats")
        env = {
            "COMFYGATE_UPSTREAM__URLS": json.dumps([f"http://127.0.0.1:{fake_port}"]),
            **PASS_THROUGH,
            "COMFYGATE_LOGGING__FORMAT": "json",
            "COMFYGATE_LOGGING__LEVEL": "warning",
            "COMFYGATE_REDIS__URL": server.url,
            "COMFYGATE_AUTH__JWT__SECRET": BENCH_JWT_SECRET,
            "COMFYGATE_ROLES": user_roles(),
        }
        settings = load_settings(None, environ=env)
        configure_logging(settings.logging)
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        headers = {"Authorization": f"Bearer {bench_token((USER_ROLE,))}"}
        base = f"http://127.0.0.1:{port}"
        running = SimpleNamespace(base=base, headers=headers, upstream_root=None)
        await prepare_user(cast(Any, running))
        path = f"{base}/history/{running.history_id}"
        client = redis.Redis.from_url(server.url)
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(path) as resp:  # warm: lazily built state is not per request
                assert resp.status == 200
            by_command = await _by_command(client)
            before = await _commands(client)
            for _ in range(requests):
                async with session.get(path) as resp:
                    assert resp.status == 200
                    await resp.read()
            after = await _commands(client)
            by_after = await _by_command(client)
        await client.aclose()
        # INFO itself is one command.
        per = (after - before - 1) / requests
        print(f"GET /history/{{id}} as a user: {per:.2f} Redis commands per request")
        for name, calls in sorted(by_after.items()):
            if (n := calls - by_command.get(name, 0) - (name == "info")) > 0:
                print(f"  {name}: {n / requests:.2f} per request")
        await runner.cleanup()
    finally:
        fake.terminate()
        await fake.wait()
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.redis_per_request", description=__doc__)
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args()
    asyncio.run(measure(args.requests))


if __name__ == "__main__":
    main()
