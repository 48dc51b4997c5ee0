"""A monitored comfygate on this machine: the fake ComfyUI, a real Redis, ``comfygate serve``
as a real process (its metrics listener, several workers), and a real Prometheus (Debian's)
scraping it with the scrape job of deploy/prometheus/prometheus.yml and evaluating
deploy/prometheus/alerts.yml.

Used by test_dashboard_live.py (every dashboard query against real data) and by preview.py (the
dashboard picture in the README). Processes are started on free loopback ports and stopped at
the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import JWT_SECRET, SESSION_SECRET, make_token
from tests.deploy.files import PROMETHEUS
from tests.fakes.comfyui import FakeComfyUI
from tests.redis_server import free_port

STARTUP_TIMEOUT = 60.0
METRICS_TOKEN = "scrape-token-0123456789abcdef"
PROMPT_TIMEOUT = 30.0


def prometheus_config(work: Path, metrics_port: int, *, scrape_interval: float) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its comfygate job pointed at this machine: a static
    target instead of Docker's DNS, the token file in ``work``, a fast scrape interval."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "comfygate"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    token = work / "metrics_token"
    token.write_text(METRICS_TOKEN, encoding="utf-8")
    job["authorization"]["credentials_file"] = str(token)
    interval = f"{int(scrape_interval * 1000)}ms"
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    config["scrape_configs"] = [job]
    return dict(config)


@dataclass
class Stack:
    proxy_url: str
    prometheus_url: str
    comfy: FakeComfyUI
    session: aiohttp.ClientSession
    scrape_interval: float
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def api(self, path: str, **params: str) -> Any:
        """A Prometheus HTTP API call; its ``data`` (fails on an error status)."""
        async with self.session.get(f"{self.prometheus_url}{path}", params=params) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("/api/v1/query", query=expr)
        return list(data["result"])

    async def query_range(
        self, expr: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        data = await self.api(
            "/api/v1/query_range", query=expr, start=str(start), end=str(end), step=str(step)
        )
        return list(data["result"])

    async def wait_scraped_after(self, moment: float, scrapes: int = 2) -> None:
        """Until Prometheus holds ``scrapes`` scrapes taken after ``moment`` (so that rates
        over the final counters have two samples)."""
        deadline = moment + scrapes * self.scrape_interval
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while True:
                result = await self.query('timestamp(up{job="comfygate"})')
                if result and all(float(r["value"][1]) >= deadline for r in result):
                    return
                await asyncio.sleep(self.scrape_interval / 4)  # polling an external process


async def _wait_http(session: aiohttp.ClientSession, url: str, proc: Any, **kw: Any) -> None:
    async with asyncio.timeout(STARTUP_TIMEOUT):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url, **kw) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)  # waiting for a child process to bind its port


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


@asynccontextmanager
async def monitored_stack(
    work: Path,
    redis_url: str,
    *,
    workers: int = 2,
    scrape_interval: float = 1.0,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Stack]:
    """Start everything; yield a :class:`Stack`; stop everything."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise FileNotFoundError("prometheus not found (apt-get install prometheus)")
    comfy = FakeComfyUI(root=work / "comfyui")
    await comfy.start()
    port, metrics_port, prometheus_port = free_port(), free_port(), free_port()
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COMFYGATE_")},
        "PYTHONUNBUFFERED": "1",
        "COMFYGATE_UPSTREAM__URLS": f'["{comfy.url}"]',
        "COMFYGATE_REDIS__URL": redis_url,
        "COMFYGATE_AUTH__JWT__SECRET": JWT_SECRET,
        "COMFYGATE_AUTH__SESSION__SECRET": SESSION_SECRET,
        "COMFYGATE_LOGGING__FORMAT": "json",
        "COMFYGATE_LOGGING__ACCESS_LOG": "false",
        "COMFYGATE_SERVER__WORKERS": str(workers),
        "COMFYGATE_METRICS__PORT": str(metrics_port),
        "COMFYGATE_METRICS__BEARER_TOKEN": METRICS_TOKEN,
        "COMFYGATE_METRICS__UPSTREAM_POLL_SECONDS": "1",
        **(env or {}),
    }
    config = work / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(prometheus_config(work, metrics_port, scrape_interval=scrape_interval)),
        encoding="utf-8",
    )
    session = aiohttp.ClientSession()
    stack = Stack(
        proxy_url=f"http://127.0.0.1:{port}",
        prometheus_url=f"http://127.0.0.1:{prometheus_port}",
        comfy=comfy,
        session=session,
        scrape_interval=scrape_interval,
    )
    log = (work / "comfygate.log").open("wb")
    try:
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port),
            env=environ, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        stack.processes.append(gateway)
        server = await asyncio.create_subprocess_exec(
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--log.level=warn",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=(work / "prometheus.log").open("wb"),
        )
        stack.processes.append(server)
        await _wait_http(session, f"{stack.proxy_url}/healthz", gateway)
        await _wait_http(
            session,
            f"http://127.0.0.1:{metrics_port}/metrics",
            gateway,
            headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
        )
        await _wait_http(session, f"{stack.prometheus_url}/-/ready", server)
        await stack.wait_scraped_after(time.time(), scrapes=1)
        yield stack
    finally:
        for process in reversed(stack.processes):
            await _stop(process)
        log.close()
        await session.close()
        await comfy.stop()


# -- the scripted workload ----------------------------------------------------------------------

GRAPH: dict[str, Any] = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "w"}},
}


@dataclass
class WorkloadResult:
    prompts: int = 0
    views: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def saw(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def generate(stack: Stack, user: str, prompts: int, result: WorkloadResult) -> None:
    """A user with the UI open: a WebSocket, ``prompts`` submissions run to completion (their
    events arrive on the socket), then each output fetched through /view."""
    headers = {"Authorization": f"Bearer {make_token(user, ('user',))}"}
    client_id = uuid.uuid4().hex
    session = stack.session
    ws = await session.ws_connect(f"{stack.proxy_url}/ws?clientId={client_id}", headers=headers)
    try:
        pending: set[str] = set()
        for i in range(prompts):
            graph = {**GRAPH, "1": {**GRAPH["1"], "inputs": {**GRAPH["1"]["inputs"], "color": i}}}
            body = {"prompt": graph, "client_id": client_id}
            async with session.post(
                f"{stack.proxy_url}/prompt", json=body, headers=headers
            ) as resp:
                result.saw(resp.status)
                assert resp.status == 200, await resp.text()
                pending.add((await resp.json())["prompt_id"])
        done = set(pending)
        async with asyncio.timeout(PROMPT_TIMEOUT):
            while pending:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                event = msg.json()
                if event["type"] in ("execution_success", "execution_error"):
                    pending.discard(event["data"]["prompt_id"])
        result.prompts += len(done)
        for prompt_id in done:
            async with session.get(
                f"{stack.proxy_url}/history/{prompt_id}", headers=headers
            ) as resp:
                result.saw(resp.status)
                outputs = (await resp.json())[prompt_id]["outputs"]
            for output in outputs.values():
                for image in output.get("images", []):
                    async with session.get(
                        f"{stack.proxy_url}/view", params=image, headers=headers
                    ) as resp:
                        result.saw(resp.status)
                        await resp.read()
                        result.views += 1
    finally:
        await ws.close()


async def refusals(stack: Stack, result: WorkloadResult, *, burst: int = 40) -> None:
    """What security panels show: a bad token (401), a viewer submitting (403), a foreign
    origin (403), and a client reading faster than its role's limit (429)."""
    session, url = stack.session, stack.proxy_url
    bad = {"Authorization": "Bearer not-a-jwt"}
    async with session.get(f"{url}/history", headers=bad) as resp:
        result.saw(resp.status)
    viewer = {"Authorization": f"Bearer {make_token('vera', ('viewer',))}"}
    async with session.post(f"{url}/prompt", json={"prompt": GRAPH}, headers=viewer) as resp:
        result.saw(resp.status)
    foreign = {**viewer, "Origin": "https://evil.example"}
    async with session.get(f"{url}/queue", headers=foreign) as resp:
        result.saw(resp.status)
    reader = {"Authorization": f"Bearer {make_token('rita', ('user',))}"}
    for _ in range(burst):
        async with session.get(f"{url}/queue", headers=reader) as resp:
            result.saw(resp.status)
            await resp.read()
