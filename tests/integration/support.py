"""Helpers shared by the integration tests: workflows, JSON requests, events, metric samples.

Fixtures live in ``tests/conftest.py``; the multi-instance helpers in ``multi_support.py``
(which re-exports these).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from proxy.observability.metrics import METRICS

Client = TestClient[Any, Any]
_colors = itertools.count(0x200000, 7919)  # a new graph every time: nothing is cached


def _empty_image() -> dict[str, Any]:
    color = next(_colors) % 0xFFFFFF
    return {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
    }


def graph() -> dict[str, Any]:
    """EmptyImage -> PreviewImage: a temp output file, distinct every time."""
    preview = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    return {"1": _empty_image(), "2": preview}


def saving_graph(prefix: str) -> dict[str, Any]:
    """EmptyImage -> SaveImage: an output file named after ``prefix``, distinct every time."""
    return {
        "1": _empty_image(),
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


async def get_json(client: Client, path: str, headers: dict[str, str]) -> Any:
    """``GET path``, which must answer 200; its JSON."""
    async with client.get(path, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def post(
    client: Client, path: str, headers: dict[str, str], body: Any = None
) -> tuple[int, bytes]:
    """``POST path`` with a JSON body; status and raw body."""
    async with client.post(path, headers=headers, json=body) as resp:
        return resp.status, await resp.read()


async def run_until_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str) -> list[Any]:
    """JSON events on ``ws`` up to the end of ``prompt_id`` (``executing`` with node null)."""
    events = []
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type is aiohttp.WSMsgType.TEXT:
            data = json.loads(msg.data)
            events.append(data)
            inner = data.get("data", {})
            done = data["type"] == "executing" and inner.get("node") is None
            if done and inner.get("prompt_id") == prompt_id:
                return events


def sample(client: Client, name: str, **labels: str) -> float:
    """A metric's current value in the app's registry (0 when never set)."""
    return client.app[METRICS].registry.get_sample_value(name, labels) or 0.0


__all__ = [
    "Client",
    "get_json",
    "graph",
    "post",
    "run_until_done",
    "sample",
    "saving_graph",
]
