"""Differential test of the prompt model: for generated workflows (literals wrapped or not,
numbers as text, primitive chains of any depth, file names of either user), what the proxy
decided (allow/deny, the rewritten prompt) agrees with what the fake ComfyUI received and what
it ran, and both agree with an oracle written here from ComfyUI's rules (unwrap once, convert
with ``int()``, primitives pass their value on).

The proxy and the fake run on an event loop of their own (a thread) for the whole module:
Hypothesis drives synchronous examples against one stack.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from tests.conftest import make_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.security.prompt_support import (
    ALICE,
    BOB,
    FOLDER_SECRET,
    MAX_BATCH,
    POLICY_TEXT,
    B,
    node,
    prompt_posts,
    user_file,
)

T = TypeVar("T")


@dataclass
class Stack:
    loop: asyncio.AbstractEventLoop
    fake: FakeComfyUI
    client: TestClient[Any, Any]
    files: dict[str, str]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("differential")
    policy = root / "policy.toml"
    policy.write_text(POLICY_TEXT)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="differential-loop", daemon=True)
    thread.start()
    fake = FakeComfyUI(root=root / "comfy")

    async def start() -> TestClient[Any, Any]:
        await fake.start()
        settings_ = make_settings(
            fake.url,
            policy={"files": [str(policy)]},
            isolation={"folder_secret": FOLDER_SECRET},  # user_file names the same folders
            rate_limits={"enabled": False},  # many examples in seconds: not what is tested
        )
        client = TestClient(TestServer(create_app(settings_, registry=CollectorRegistry())))
        await client.start_server()
        return client

    client = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=60)
    files = {
        "bob": user_file(fake, BOB, "mine.aiff"),
        "alice": user_file(fake, ALICE, "hers.aiff"),
    }
    stack = Stack(loop, fake, client, files)
    yield stack
    stack.run(client.close())
    stack.run(fake.stop())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


# -- generated workflows -------------------------------------------------------------------------

REFUSED = object()
"""The oracle's verdict for a literal ComfyUI would not read as the proxy does."""


@dataclass(frozen=True)
class Literal:
    """A literal and how it is written: its wire form and the value ComfyUI runs."""

    wire: object
    value: object  # an int, or REFUSED


def _converted(raw: object) -> object:
    try:
        value = int(raw)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return REFUSED  # ComfyUI refuses it, or the proxy does: nothing runs either way
    return value if -(2**63) <= value < 2**64 else REFUSED


plain_numbers = st.one_of(
    st.integers(min_value=-2, max_value=6),
    st.integers(min_value=-2, max_value=6).map(str),
    st.integers(min_value=-2, max_value=6).map(lambda n: f" {n} "),
    st.floats(min_value=-1.5, max_value=6.5, allow_nan=False),
    st.booleans(),
    st.sampled_from(["2.0", "two", "", "0x2", "1_0", "9" * 25]),
)


@st.composite
def literals(draw: st.DrawFn) -> Literal:
    raw = draw(plain_numbers)
    wraps = draw(st.sampled_from([0, 0, 1, 1, 2]))
    wire: object = raw
    for _ in range(wraps):
        wire = {"__value__": wire}
    if wraps > 1:
        return Literal(wire, REFUSED)  # a wrapper in a wrapper: unsupported
    if isinstance(raw, float) and str(raw) in ("inf", "-inf", "nan"):
        return Literal(wire, REFUSED)
    return Literal(wire, _converted(raw))


@st.composite
def workflows(draw: st.DrawFn) -> tuple[dict[str, Any], object, str | None]:
    """``(graph, the batch size ComfyUI would run or REFUSED, the file it would read)``."""
    literal = draw(literals())
    depth = draw(st.integers(min_value=0, max_value=5))
    graph: dict[str, Any] = {}
    if depth == 0:
        batch: object = literal.wire
    else:
        batch = ["100", 0]
        for i in range(depth):
            last = i == depth - 1
            value = literal.wire if last else [str(101 + i), 0]
            graph[str(100 + i)] = node("PrimitiveInt", value=value)
    graph["1"] = node("EmptyImage", width=8, height=8, batch_size=batch, color=0x102030)
    graph["8"] = node("SaveImage", images=["1", 0], filename_prefix="diff")
    reads: str | None = None
    if draw(st.booleans()):
        reads = draw(st.sampled_from(["bob", "alice"]))
        wrapped = draw(st.booleans())
        name = {"__value__": reads} if wrapped else reads
        graph["2"] = node("LoadAudio", audio=name)  # the owner's key, replaced below
        graph["9"] = node("PreviewAny", source=["2", 0])
    return graph, literal.value, reads


def _with_files(graph: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    if "2" not in graph:
        return graph
    owner = graph["2"]["inputs"]["audio"]
    audio = {"__value__": files[owner["__value__"]]} if isinstance(owner, dict) else files[owner]
    return {**graph, "2": node("LoadAudio", audio=audio)}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(workflow=workflows())
def test_the_proxys_decision_is_what_comfyui_runs(
    stack: Stack, workflow: tuple[dict[str, Any], object, str | None]
) -> None:
    graph, expected, reads = workflow
    graph = _with_files(graph, stack.files)
    fake = stack.fake
    fake.reset()
    # Every example runs every node (as ComfyUI started with --cache-none): a node cached from
    # an earlier example would not show what it runs with.
    fake.executor.cache = type(fake.executor.cache)()

    async def post() -> tuple[int, Any]:
        async with stack.client.post("/prompt", json={"prompt": graph}, headers=B) as resp:
            return resp.status, await resp.json()

    status, answer = stack.run(post())
    forwarded = prompt_posts(fake)
    # ComfyUI checks EmptyImage's minimum (1) on a literal only: a linked value is not checked.
    linked = isinstance(graph["1"]["inputs"]["batch_size"], list)
    runs = isinstance(expected, int) and (expected >= 1 or linked)
    within = isinstance(expected, int) and expected <= MAX_BATCH and reads in (None, "bob")
    if not forwarded:
        # The proxy refused: ComfyUI would have run something outside the policy (or refused
        # it too); never a workflow it would run within the policy.
        assert status == 400, answer
        assert not (runs and within), (graph, answer)
        return
    # Forwarded once, as the proxy serialised what it decided on: never another user's file,
    # never a value past the bound.
    assert len(forwarded) == 1
    assert reads in (None, "bob"), (graph, forwarded)
    sent = forwarded[0]["prompt"]
    head = sent["1"]["inputs"]["batch_size"]
    if isinstance(head, list):  # through primitives: the chain's end holds the typed value
        end = max(int(k) for k in sent if int(k) >= 100)
        carried = sent[str(end)]["inputs"]["value"]
    else:
        carried = head
    if expected is not REFUSED:
        assert carried == expected  # typed exactly as ComfyUI converts it
    if status != 200:
        # ComfyUI refused, on its own, what the policy let through (a value it cannot
        # convert, or a literal below EmptyImage's minimum of 1).
        assert status == 400, answer
        assert not runs, (graph, answer)
        return
    # Accepted: ComfyUI runs the outputs that validated (its node_errors name the others).
    stack.run(fake.wait_idle())
    ran = fake.executor.ran.get(answer["prompt_id"], {})
    if "1" in ran:
        assert runs, (graph, answer)
        assert within, (graph, answer)
        assert ran["1"]["batch_size"] == expected  # what ComfyUI ran: what the proxy judged
    else:
        assert not runs, (graph, answer)
        assert answer["node_errors"]  # node 1 or its primitive source failed validation
    if "2" in ran:
        assert ran["2"]["audio"] == stack.files["bob"]
