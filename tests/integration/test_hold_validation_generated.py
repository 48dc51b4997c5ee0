"""Generated differential test of hold-time validation: graphs from
tests/support/validation_graphs.py sent through comfygate with the gateway queue ON and OFF in
front of one fake ComfyUI, with and without isolation. The answers are the same, except where
the proxy must leave the judgement to ComfyUI (a node's own validation, what ComfyUI's
validation raises on): then the prompt is held (200) and the OFF answer shows why. A prompt
refused with the queue ON never reached the fake, and one the fake accepts is never refused.

The stack runs on an event loop of its own (a thread) for the whole module: Hypothesis drives
synchronous examples against it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from tests.conftest import bearer, make_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.support import validation_corpus as corpus
from tests.support.validation_graphs import graphs

T = TypeVar("T")
Client = TestClient[Any, Any]
USER = bearer("erin")
SECRET = "hold-validation-generated-secret-0123456789abcdef"
ONLY_COMFYUI = frozenset(
    {"custom_validation_failed", "exception_during_validation", "exception_during_inner_validation"}
)
"""Error types the proxy cannot predict (it holds such prompts; ComfyUI decides at release)."""
_TAGS = itertools.count()


@dataclass
class Stack:
    loop: asyncio.AbstractEventLoop
    fake: FakeComfyUI
    proxies: dict[tuple[str, bool], Client]
    info: dict[str, Any]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("hold-generated")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="hold-generated", daemon=True)
    thread.start()
    fake = FakeComfyUI(root=root / "comfy")
    checkpoint = Path(fake.paths.model_dirs("checkpoints")[0]) / corpus.CHECKPOINT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"x")
    Path(fake.paths.input, corpus.INPUT_IMAGE).write_bytes(b"png")

    async def start() -> dict[tuple[str, bool], Client]:
        await fake.start()
        out = {}
        for config, scheduler in itertools.product(("plain", "isolation"), (False, True)):
            isolation = {"enabled": False} if config == "plain" else {"folder_secret": SECRET}
            built = make_settings(
                fake.url,
                isolation=isolation,
                rate_limits={"enabled": False},
                scheduler={"enabled": scheduler},
            )
            client = TestClient(TestServer(create_app(built, registry=CollectorRegistry())))
            await client.start_server()
            out[(config, scheduler)] = client
        return out

    proxies = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=60)
    info = json.loads(json.dumps(fake.registry.object_info()))
    yield Stack(loop, fake, proxies, info)

    async def stop() -> None:
        for client in proxies.values():
            await client.close()
        await fake.stop()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


async def submit(client: Client, prompt: dict[str, Any], tag: str) -> tuple[int, Any]:
    tagged = {k: {**v, "_meta": {"title": tag}} for k, v in prompt.items()}
    async with client.post("/prompt", json={"prompt": tagged}, headers=USER) as resp:
        return resp.status, await resp.json()


def reached(fake: FakeComfyUI, tag: str) -> bool:
    return any(
        tag.encode() in r.body
        for r in fake.received
        if r.method == "POST" and r.path.endswith("prompt")
    )


def only_comfyui(answer: Any) -> bool:
    """ComfyUI's answer names an error the proxy cannot predict."""
    return any(
        e["type"] in ONLY_COMFYUI
        for entry in answer.get("node_errors", {}).values()
        for e in entry["errors"]
    )


# The proxies' own loop thread (the gateway queue's feeder) may use ``random`` while an
# example is drawn here: Hypothesis cannot tell that from the strategy's own use.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@settings(
    max_examples=int(os.environ.get("HOLD_VALIDATION_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), config=st.sampled_from(["plain", "isolation"]))
def test_generated_graphs_get_the_same_answer(
    stack: Stack, data: st.DataObject, config: str
) -> None:
    prompt = data.draw(graphs(stack.info))
    n = next(_TAGS)
    off_status, off = stack.run(submit(stack.proxies[(config, False)], prompt, f"off-{n}-"))
    on_status, on = stack.run(submit(stack.proxies[(config, True)], prompt, f"on-{n}-"))
    if on_status == 400:
        # Never a refusal of what ComfyUI accepts; the same body. Refused before holding:
        # nothing reached ComfyUI. Sent straight through (ComfyUI had room, nothing waited):
        # only what ComfyUI alone can judge, and its own answer is the client's.
        assert off_status == 400, (off, on)
        assert on == off
        if reached(stack.fake, f"on-{n}-"):
            assert only_comfyui(on), on
            event("refused by ComfyUI, straight through")
        else:
            event(f"refused alike: {on['error']['type']}")
        return
    assert on_status == 200, on
    if off_status == 200 and on["node_errors"] == off["node_errors"]:
        event("accepted alike")
        return
    # Held where only ComfyUI can judge: its answer says why.
    assert on["node_errors"] == {}
    assert only_comfyui(off), (off, on)
    event("held for ComfyUI")
