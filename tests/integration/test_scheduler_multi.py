"""The gateway queue with several ComfyUI instances: each is fed up to its room, and
capability-aware placement picks among the held prompts the ones an instance can run (an
instance lacking a node class never gets a prompt that uses it) (``docs/scheduler.md``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient

from proxy.app import create_app
from proxy.scheduler.gate import Gate
from proxy.scheduler.keys import GATE
from tests.conftest import bearer, make_settings
from tests.fakes.comfyui import FakeComfyUI

Client = TestClient[Any, Any]
ALICE, BOB = bearer("alice"), bearer("bob")
NO_BLUR = {"EmptyImage", "SaveImage", "PreviewImage", "LoadImage"}
QUIET = {
    "health": {"interval_seconds": 3600},
    "placement": {"capabilities_refresh_seconds": 3600},
}


@pytest.fixture
async def gpus(tmp_path: Path) -> AsyncIterator[dict[str, FakeComfyUI]]:
    """gpu-full (every node) and gpu-small (no ImageBlur), both stopped at their first node
    until released, so that what each was fed can be read."""
    out = {
        "gpu-full": FakeComfyUI(root=tmp_path / "full"),
        "gpu-small": FakeComfyUI(root=tmp_path / "small", nodes=NO_BLUR),
    }
    for fake in out.values():
        await fake.start()
        fake.hold()
    yield out
    for fake in out.values():
        fake.release()
        await fake.stop()


@pytest.fixture
def start(
    aiohttp_client: AiohttpClient, gpus: dict[str, FakeComfyUI]
) -> Callable[[], Awaitable[Client]]:
    async def run() -> Client:
        upstream = {
            **QUIET,
            "urls": [],
            "instances": [{"url": f.url, "name": n} for n, f in gpus.items()],
        }
        settings = make_settings(
            "http://127.0.0.1:9",
            upstream=upstream,
            scheduler={"enabled": True, "pull_back": False},
            rate_limits={"enabled": False},
        )
        client: Client = await aiohttp_client(create_app(settings, registry=CollectorRegistry()))
        return client

    return run


def graph(seed: int, *, blur: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": seed},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "m"}},
    }
    if blur:
        out["2"] = {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
        }
        out["9"]["inputs"]["images"] = ["2", 0]
    return out


def posted(fake: FakeComfyUI) -> list[str]:
    return [
        str(orjson.loads(r.body).get("prompt_id"))
        for r in fake.received
        if r.method == "POST" and r.path.endswith("/prompt")
    ]


def listed(fake: FakeComfyUI) -> list[str]:
    running, pending = fake.queue.current_queue()
    return [i[1] for i in [*running, *pending]]


async def until(gate: Gate, condition: Callable[[], bool], rounds: int = 300) -> None:
    for _ in range(rounds):
        if condition():
            return
        gate.wake()
        await gate.wait_ticks(1)
    raise AssertionError("condition not reached")


async def submit(client: Client, who: dict[str, str], seed: int, *, blur: bool) -> str:
    async with client.post("/prompt", json={"prompt": graph(seed, blur=blur)}, headers=who) as r:
        answer = await r.json()
        assert r.status == 200, answer
        return str(answer["prompt_id"])


async def test_each_instance_fed_only_prompts_it_can_run(
    start: Callable[[], Awaitable[Client]], gpus: dict[str, FakeComfyUI]
) -> None:
    client = await start()
    gate: Gate = client.app[GATE]
    # Alice's backlog needs ImageBlur (gpu-full only); Bob's runs anywhere.
    blurred = [await submit(client, ALICE, i, blur=True) for i in range(4)]
    plain = [await submit(client, BOB, 100 + i, blur=False) for i in range(4)]
    full, small = gpus["gpu-full"], gpus["gpu-small"]
    # Both instances get their room (one running + one pending), though Alice's prompts come
    # first in fair order for gpu-full and cannot run on gpu-small at all.
    await until(gate, lambda: len(listed(full)) == 2 and len(listed(small)) == 2)
    assert set(listed(small)) <= set(plain)
    assert set(listed(full)) & set(blurred)

    for fake in gpus.values():
        fake.release()
    everything = {*blurred, *plain}
    await until(gate, lambda: everything <= {*full.queue.history, *small.queue.history})
    assert not set(posted(small)) & set(blurred)  # never offered a prompt it cannot run
    ran = Counter(p for f in gpus.values() for p, _ in f.queue.started)
    assert set(ran) == everything
    assert all(n == 1 for n in ran.values()), ran  # nothing ran twice, on either instance
    assert {p for p, _ in small.queue.started}  # the small instance did work too
    assert await gate.store.held(None) == []  # nothing left held


async def test_no_instance_able_keeps_nothing_waiting_forever(
    start: Callable[[], Awaitable[Client]], gpus: dict[str, FakeComfyUI]
) -> None:
    """A held prompt only gpu-full can run waits while gpu-small, idle, takes the next one
    that it can run: the head of a queue it cannot run does not block it."""
    client = await start()
    gate: Gate = client.app[GATE]
    first = [await submit(client, ALICE, i, blur=True) for i in range(3)]
    later = await submit(client, ALICE, 50, blur=False)
    small = gpus["gpu-small"]
    await until(gate, lambda: listed(small) == [later])
    assert len(listed(gpus["gpu-full"])) == 2
    held = [h.prompt_id for h in await gate.store.held(None)]
    assert held == first[2:]
