"""comfygate as a real child process (``python -m proxy serve``), for signal, memory, metrics
and multi-worker tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from tests.conftest import JWT_SECRET, SESSION_SECRET, make_token
from tests.redis_server import free_port

STARTUP_TIMEOUT = 20.0
LOG_TIMEOUT = 30.0

LogLine = dict[str, Any]


@dataclass
class ProxyProcess:
    process: asyncio.subprocess.Process
    port: int
    metrics_port: int = 0
    """The separate metrics listener's port (a free one unless the caller set it)."""
    logs: list[LogLine] = field(default_factory=list)
    """JSON log lines of the process (only with ``capture_logs=True``)."""
    stderr: bytearray = field(default_factory=bytearray)
    """What the process wrote to stderr (drained, so that a chatty child never blocks)."""
    _logged: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def auth(self) -> dict[str, str]:
        """Headers of an admin API client."""
        return {"Authorization": f"Bearer {make_token()}"}

    @property
    def pid(self) -> int:
        return self.process.pid

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def wait_log(
        self, predicate: Callable[[LogLine], bool], *, count: int = 1
    ) -> list[LogLine]:
        """The first ``count`` log lines matching ``predicate``, waiting (at most
        :data:`LOG_TIMEOUT`) for them to come."""
        async with asyncio.timeout(LOG_TIMEOUT), self._logged:
            while True:
                found = [line for line in self.logs if predicate(line)]
                if len(found) >= count:
                    return found[:count]
                if self.process.returncode is not None:
                    raise RuntimeError(f"comfygate exited with {self.process.returncode}")
                await self._logged.wait()

    async def _read_logs(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # not a log line (a traceback printed by multiprocessing)
            if isinstance(line, dict):
                async with self._logged:
                    self.logs.append(line)
                    self._logged.notify_all()
        async with self._logged:
            self._logged.notify_all()  # end of output: waiters see the exit


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


def proxy_process(upstream_url: str, **env: str) -> AsyncContextManager[ProxyProcess]:
    """Start ``python -m proxy serve`` on a free port (its metrics listener on another), with
    ``COMFYGATE_*`` variables from ``env``; see :func:`proxy_command` for more options."""
    return proxy_command(upstream_url, env=env)


@asynccontextmanager
async def proxy_command(
    upstream_url: str,
    *,
    args: Sequence[str] = (),
    capture_logs: bool = False,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ProxyProcess]:
    """Start ``python -m proxy serve [args]`` on a free port; ``capture_logs`` keeps its JSON
    log lines in ``ProxyProcess.logs``. SIGKILL whatever is left at the end (the process
    group: workers included)."""
    port = free_port()
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COMFYGATE_")},
        "COMFYGATE_UPSTREAM__URLS": f'["{upstream_url}"]',
        "COMFYGATE_LOGGING__FORMAT": "json",
        "COMFYGATE_AUTH__JWT__SECRET": JWT_SECRET,
        "COMFYGATE_AUTH__SESSION__SECRET": SESSION_SECRET,
        "COMFYGATE_METRICS__PORT": str(free_port()),  # never the shared default 9464
        **(env or {}),
    }
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE if capture_logs else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, so that workers die with it
    )
    proxy = ProxyProcess(process, port, int(environ["COMFYGATE_METRICS__PORT"]))
    assert process.stderr is not None
    readers = [asyncio.create_task(_drain(process.stderr, proxy.stderr))]
    if capture_logs:
        assert process.stdout is not None
        readers.append(asyncio.create_task(proxy._read_logs(process.stdout)))
    try:
        await _wait_healthy(proxy.url, process)
        yield proxy
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # workers too, even if the leader is gone
        await process.wait()
        await asyncio.gather(*readers)


async def _drain(stream: asyncio.StreamReader, into: bytearray) -> None:
    while chunk := await stream.read(65536):
        into.extend(chunk)
