"""What a person sees when comfygate starts (issue 15): a banner on stderr once the port is bound
(URL, whether ComfyUI answers, where state lives, which protections are on, what to do next),
the one-time admin token of a first run only then (a second instance that cannot bind prints no
token), and a warning in the log when ComfyUI does not answer. With ``--workers`` the
supervisor prints it once, and the token works on every worker (secrets shared for the run)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import app, server
from proxy.errors import SettingsError
from proxy.settings import Settings
from proxy.upstream.pool import UpstreamPool
from tests.conftest import make_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.redis_server import free_port

WAIT_SECONDS = 30.0
BANNER_END = "For real use, run `comfygate init`"
TOKEN_RE = re.compile(r"^    (eyJ[\w-]+\.[\w-]+\.[\w-]+)$", re.MULTILINE)


@dataclass
class Started:
    """A ``python -m proxy serve`` child: its stderr and JSON log lines as they come."""

    process: asyncio.subprocess.Process
    port: int
    stderr: list[str] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def err(self) -> str:
        return "".join(self.stderr)

    async def wait(self, done: Callable[[], bool]) -> None:
        """Until ``done()`` holds (fails after :data:`WAIT_SECONDS` or if the process exits)."""
        async with asyncio.timeout(WAIT_SECONDS), self.changed:
            while not done():
                if self.process.returncode is not None:
                    raise AssertionError(f"exited {self.process.returncode}:\n{self.err}")
                await self.changed.wait()

    async def _read(self, stream: asyncio.StreamReader, *, json_lines: bool) -> None:
        async for raw in stream:
            async with self.changed:
                if json_lines:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        self.logs.append(orjson.loads(raw))
                else:
                    self.stderr.append(raw.decode())
                self.changed.notify_all()
        async with self.changed:
            self.changed.notify_all()


@asynccontextmanager
async def serve(
    upstream: str, *args: str, port: int | None = None, **env: str
) -> AsyncIterator[Started]:
    """``python -m proxy serve`` with no JWT secret and no users file (a first run)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("COMFYGATE_")}
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    environ.update(
        COMFYGATE_LOGGING__FORMAT="json",
        COMFYGATE_METRICS__ENABLED="false",
        COMFYGATE_UPSTREAM__URLS=f'["{upstream}"]',
        **env,
    )
    port = port or free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--port",
        str(port),
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    started = Started(process, port)
    assert process.stdout is not None
    assert process.stderr is not None
    readers = [
        asyncio.create_task(started._read(process.stdout, json_lines=True)),
        asyncio.create_task(started._read(process.stderr, json_lines=False)),
    ]
    try:
        yield started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        await asyncio.gather(*readers)


async def get(url: str, token: str) -> tuple[int, Any]:
    """One request on a fresh connection (SO_REUSEPORT spreads connections over workers)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        return resp.status, await resp.json()


def token_of(text: str) -> str:
    [token] = TOKEN_RE.findall(text)
    assert isinstance(token, str)
    return token


async def test_first_run_banner_once_serving(fake_comfy: FakeComfyUI) -> None:
    async with serve(fake_comfy.url) as proxy:
        await proxy.wait(lambda: BANNER_END in proxy.err)
        lines = proxy.err.splitlines()
        assert f"is serving on http://127.0.0.1:{proxy.port}/" in lines[1]
        assert f"  ComfyUI     {fake_comfy.url}: reachable" in lines
        assert "  state       in this process (no Redis)" in lines
        assert "  protections auth on, isolation on, workflow policy on, rate limits on" in lines
        assert "  users file  none (password sign-in off)" in lines
        assert "Start ComfyUI" not in proxy.err
        # The banner comes after the listener: the token works at once.
        status, body = await get(f"{proxy.url}/api/queue", token_of(proxy.err))
        assert status == 200
        assert set(body) == {"queue_running", "queue_pending"}
        # The log says it started before the banner was printed, and nothing is unreachable.
        assert any(line.get("event") == "proxy_started" for line in proxy.logs)
        assert not any(line.get("event") == "upstream_unreachable" for line in proxy.logs)


async def test_a_second_instance_on_a_busy_port_prints_no_token(fake_comfy: FakeComfyUI) -> None:
    async with serve(fake_comfy.url) as first:
        await first.wait(lambda: BANNER_END in first.err)
        async with serve(fake_comfy.url, port=first.port) as second:
            assert await second.process.wait() == 2
            await second.wait(lambda: "cannot listen" in second.err)
        assert f"server: cannot listen on 127.0.0.1:{first.port}" in second.err
        for absent in ("one-time", "eyJ", "Traceback", "Unclosed", "is serving on"):
            assert absent not in second.err


async def test_comfyui_down_at_startup_is_said() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    async with serve(down) as proxy:
        await proxy.wait(lambda: BANNER_END in proxy.err)
        assert f"  ComfyUI     {down}: NOT reachable" in proxy.err
        port = down.rsplit(":", 1)[1]
        expected = f"Start ComfyUI:   python main.py --listen 127.0.0.1 --port {port} --multi-user"
        assert expected in proxy.err
        [warning] = [line for line in proxy.logs if line.get("event") == "upstream_unreachable"]
        assert warning["level"] == "warning"
        assert warning["upstream"] == down
        assert "--multi-user" in warning["detail"]


async def test_workers_print_one_banner_and_share_the_token(fake_comfy: FakeComfyUI) -> None:
    async with serve(fake_comfy.url, "--workers", "2") as proxy:
        await proxy.wait(lambda: BANNER_END in proxy.err)
        assert proxy.err.count("is serving on") == 1
        assert "(2 worker processes)" in proxy.err
        token = token_of(proxy.err)
        workers: Counter[int] = Counter()

        def answered_by_both() -> bool:
            workers.clear()
            workers.update(
                int(line["worker"])
                for line in proxy.logs
                if line.get("event") == "request_finished" and "worker" in line
            )
            return len(workers) == 2

        statuses: Sequence[int] = []
        for _ in range(40):  # fresh connections until both workers have answered one
            statuses = [*statuses, (await get(f"{proxy.url}/api/queue", token))[0]]
            async with proxy.changed:
                if answered_by_both():
                    break
        assert set(statuses) == {200}, proxy.err
        await proxy.wait(answered_by_both)


async def test_a_failed_start_closes_what_it_opened(
    tmp_path: Path, fake_comfy: FakeComfyUI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while the app starts (here a users file gone between check and start) is the
    error alone: what the contexts that did start opened is closed (the upstream pool's client
    session used to be left open: "Unclosed client session")."""
    settings = make_settings(
        fake_comfy.url, auth={"login": {"users_file": str(tmp_path / "gone.toml")}}
    )
    apps: list[web.Application] = []

    def create_app(settings: Settings) -> web.Application:
        apps.append(app.create_app(settings, registry=CollectorRegistry()))
        return apps[-1]

    monkeypatch.setattr(server, "create_app", create_app)
    opened: list[aiohttp.ClientSession] = []
    original_start = UpstreamPool.start

    async def start(pool: UpstreamPool) -> None:
        await original_start(pool)
        opened.append(pool.session)

    monkeypatch.setattr(UpstreamPool, "start", start)
    with pytest.raises(SettingsError, match=r"auth.login.users_file: users file .*not found"):
        await server.serve(settings)
    [session] = opened  # the pool started before the authenticator failed
    assert session.closed
