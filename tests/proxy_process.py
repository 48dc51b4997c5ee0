"""comfygate as a real child process (``python -m proxy serve``), for signal and memory tests."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from tests.conftest import JWT_SECRET, SESSION_SECRET, make_token
from tests.redis_server import free_port

STARTUP_TIMEOUT = 20.0


@dataclass
class ProxyProcess:
    process: asyncio.subprocess.Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        """Headers of an admin API client."""
        return {"Authorization": f"Bearer {make_token()}"}

    @property
    def pid(self) -> int:
        return self.process.pid

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


async def _wait_healthy(url: str, process: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"comfygate exited with {process.returncode}")
                try:
                    async with session.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)  # waiting for a child process to bind its port


@asynccontextmanager
async def proxy_process(upstream_url: str, **env: str) -> AsyncIterator[ProxyProcess]:
    """Start ``python -m proxy serve`` on a free port; SIGKILL whatever is left at the end."""
    port = free_port()
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COMFYGATE_")},
        "COMFYGATE_UPSTREAM__URLS": f'["{upstream_url}"]',
        "COMFYGATE_LOGGING__FORMAT": "json",
        "COMFYGATE_AUTH__JWT__SECRET": JWT_SECRET,
        "COMFYGATE_AUTH__SESSION__SECRET": SESSION_SECRET,
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env=environ,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    proxy = ProxyProcess(process, port)
    try:
        await _wait_healthy(proxy.url, process)
        yield proxy
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
