"""Shared fixtures and helpers of the multi-instance tests (``test_multi_*.py``).

Three fake ComfyUI instances on their own ports, and the real app in front of all three. A
prompt is placed on a chosen instance the way placement does it: ownership recorded first (with
that instance's name), then the prompt submitted to that instance with the namespaced
``client_id``; tests that exercise placement itself submit through the proxy.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.comfy.records import PromptRecord
from proxy.principal import comfy_user_id
from proxy.tenancy.namespaces import upstream_client_id
from proxy.tenancy.ownership import OWNERSHIP
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.middleware import Received
from tests.integration.support import Client, get_json, graph, post, saving_graph

ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
A, B, ADMIN = bearer("alice"), bearer("bob"), bearer("admin", ("admin",))

MULTI_SETTINGS: dict[str, Any] = {
    # Background reads would add requests the tests count: off unless a test turns them on.
    "lost_watch_seconds": 0,
    "merge_timeout_seconds": 5.0,
}


class Fakes:
    """Three fake instances (``fakes[0]`` is home), restartable on their ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.items: list[FakeComfyUI] = []

    async def start(self, count: int) -> None:
        for i in range(count):
            fake = FakeComfyUI(root=self.root / f"comfyui-{i}")
            await fake.start()
            self.items.append(fake)

    def __getitem__(self, i: int) -> FakeComfyUI:
        return self.items[i]

    def __iter__(self) -> Any:
        return iter(self.items)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(f.url for f in self.items)

    def name(self, i: int) -> str:
        """The instance name the proxy gives it (``host:port``)."""
        return f"127.0.0.1:{self.items[i].port}"

    async def restart(self, i: int) -> FakeComfyUI:
        """Stop instance ``i`` and start a fresh one (empty queue and history, as a restarted
        ComfyUI) on the same port."""
        old = self.items[i]
        await old.stop()
        fresh = FakeComfyUI(root=self.root / f"comfyui-{i}")
        await fresh.start(port=old.port)
        self.items[i] = fresh
        return fresh

    async def stop(self) -> None:
        for fake in self.items:
            await fake.stop()


@pytest.fixture
async def fakes(tmp_path: Path) -> AsyncIterator[Fakes]:
    started = Fakes(tmp_path)
    await started.start(3)
    yield started
    await started.stop()


@pytest.fixture
def multi_proxy(make_proxy: ProxyFactory, fakes: Fakes) -> Callable[..., Any]:
    """``await multi_proxy(**sections)``: the app in front of the three fakes, no default
    credentials (each request says who it is)."""

    async def build(**sections: dict[str, Any]) -> Client:
        upstream = {"urls": fakes.urls, **MULTI_SETTINGS, **sections.pop("upstream", {})}
        client: Client = await make_proxy(fakes.urls[0], token=None, upstream=upstream, **sections)
        return client

    return build


async def place(
    client: Client,
    fake: FakeComfyUI,
    owner: str,
    client_id: str = "",
    *,
    prompt: dict[str, Any] | None = None,
    created: int | None = None,
) -> str:
    """A prompt of ``owner`` on ``fake``: recorded as running there, then queued there."""
    prompt_id = str(uuid.uuid4())
    namespaced = upstream_client_id(owner, client_id)
    name = f"127.0.0.1:{fake.port}"
    record = PromptRecord(prompt_id, owner, name, namespaced, time.time())
    assert await client.app[OWNERSHIP].record_prompt(record)
    body = {
        "prompt": prompt or graph(),
        "prompt_id": prompt_id,
        "client_id": namespaced,
        "extra_data": {"create_time": created or int(time.time() * 1000)},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fake.url}/prompt", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
    return prompt_id


def relayed(fake: FakeComfyUI) -> list[Received]:
    """What clients' requests made the proxy send to ``fake`` (they carry the request id; the
    proxy's own background reads, health checks and capability reads, do not)."""
    return [r for r in fake.received if "X-Request-ID" in r.headers]


def requests_to(fake: FakeComfyUI, method: str, path: str) -> list[Received]:
    return [r for r in relayed(fake) if r.method == method and r.path == path]


async def connect(
    client: Client, headers: dict[str, str], client_id: str
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """A socket with the stock UI's feature flags; returns it and its first status."""
    ws = await client.ws_connect(f"/ws?clientId={client_id}", headers=headers)
    status = await ws.receive_json(timeout=10)
    assert status["type"] == "status", status
    await ws.send_str(
        json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    )
    return ws, status


async def receive_until(
    ws: aiohttp.ClientWebSocketResponse, done: Callable[[Any], bool]
) -> list[Any]:
    """Frames until one satisfies ``done`` (included). Text frames as JSON, binary frames as
    ``("binary", type)``."""
    seen: list[Any] = []
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type is aiohttp.WSMsgType.BINARY:
            frame: Any = ("binary", int.from_bytes(msg.data[:4], "big"))
        else:
            assert msg.type is aiohttp.WSMsgType.TEXT, msg
            frame = json.loads(msg.data)
        seen.append(frame)
        if done(frame):
            return seen


def ended(prompt_id: str) -> Callable[[Any], bool]:
    """The last frame of a prompt: ``executing {node: null, prompt_id}``."""
    return lambda f: (
        isinstance(f, dict)
        and f.get("type") == "executing"
        and f["data"].get("node") is None
        and f["data"].get("prompt_id") == prompt_id
    )


__all__ = [
    "ADMIN",
    "ALICE",
    "BOB",
    "A",
    "B",
    "Client",
    "Fakes",
    "connect",
    "ended",
    "fakes",
    "get_json",
    "graph",
    "multi_proxy",
    "place",
    "post",
    "receive_until",
    "relayed",
    "requests_to",
    "saving_graph",
]
