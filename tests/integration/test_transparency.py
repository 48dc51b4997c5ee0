"""Transparency: the recorded ComfyUI traffic, replayed through the proxy and directly, matches.

Two identical fake ComfyUIs start empty; one is reached through comfygate, the other directly.
Every recorded request is sent to both, in the recorded order, and the answers must agree:
status, the headers a client relies on, and the body (byte-exact, or the same JSON shape where
the value is random, such as prompt ids and timestamps).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.captures import load, shape

COMPARED_HEADERS = ("Content-Type", "Content-Disposition", "Cache-Control", "Content-Encoding")


@pytest.fixture
async def twins(tmp_path: Path) -> AsyncIterator[tuple[FakeComfyUI, FakeComfyUI]]:
    behind, direct = (
        FakeComfyUI(root=tmp_path / "behind", frontend=True),
        FakeComfyUI(root=tmp_path / "direct", frontend=True),
    )
    await behind.start()
    await direct.start()
    yield behind, direct
    await behind.stop()
    await direct.stop()


def replayable(capture: str) -> list[dict[str, Any]]:
    """Recorded requests with a body the recording kept (uploads are tested on their own)."""
    out = []
    for exchange in load(capture)["exchanges"]:
        request = exchange["request"]
        if "upload" in request["path"] and not ({"json", "text"} & set(request)):
            continue  # multipart bodies were not recorded
        out.append(request)
    return out


async def send(
    session: aiohttp.ClientSession | TestClient[Any, Any], base: str, request: dict[str, Any]
) -> tuple[int, dict[str, str], bytes]:
    body: bytes | None = None
    headers = {}
    if "json" in request:
        body = json.dumps(request["json"]).encode()
        headers["Content-Type"] = "application/json"
    elif "text" in request:
        body = request["text"].encode()
    async with session.request(
        request["method"], base + request["path"], data=body, headers=headers
    ) as resp:
        kept = {h: resp.headers[h] for h in COMPARED_HEADERS if h in resp.headers}
        return resp.status, kept, await resp.read()


UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def without_ids(value: Any) -> Any:
    """Prompt ids are minted per server: keyed by id, only the entries' shapes can agree."""
    if isinstance(value, dict):
        return sorted(
            ((UUID_RE.sub("<id>", k), without_ids(v)) for k, v in value.items()), key=repr
        )
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


def comparable(body: bytes) -> Any:
    try:
        return without_ids(shape(json.loads(body)))
    except ValueError:
        return body


@pytest.mark.parametrize("capture", ["http-basic", "api-prefix", "interrupt-and-queue"])
async def test_recorded_traffic_is_identical_through_the_proxy(
    capture: str, twins: tuple[FakeComfyUI, FakeComfyUI], make_proxy: ProxyFactory
) -> None:
    behind, direct = twins
    proxy = await make_proxy(behind.url)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for request in replayable(capture):
            via = await send(proxy, "", request)
            ref = await send(session, direct.url, request)
            where = f"{request['method']} {request['path']}"
            assert via[0] == ref[0], where
            assert via[1] == ref[1], where
            assert comparable(via[2]) == comparable(ref[2]), where
            await behind.wait_idle()
            await direct.wait_idle()
    # The upstream behind the proxy received the same paths, byte for byte (but /users, which
    # the proxy answers itself: ComfyUI users are its business; and /object_info, which it
    # answers from its own copy of ComfyUI's catalog, fetched when it decides: at a miss, a
    # refresh, or before it validates a prompt for the gateway queue).
    sent = [r["path"] for r in replayable(capture) if not is_proxys_own(r["path"])]
    relayed = [r for r in behind.received if "X-Request-ID" in r.headers]
    assert [r.raw_path for r in relayed if not is_proxys_own(r.path)] == sent
    # Whatever else it received is the proxy's own reads (no request id: no client's): the
    # catalog, and ComfyUI's queue, read by the gateway queue's feeder until it has seen the
    # prompts it let through end.
    own = {(r.method, r.path.removeprefix("/api")) for r in behind.received if r not in relayed}
    assert own <= {("GET", "/queue"), ("GET", "/object_info"), ("GET", "/ws")}


def is_proxys_own(path: str) -> bool:
    """Requests the proxy answers itself (or relays as a socket)."""
    return path.endswith(("/users", "/ws")) or path.removeprefix("/api").startswith("/object_info")
