"""Differential test of hold-time validation (``proxy.scheduler.validate``): every prompt of the
corpus (tests/support/validation_corpus.py) sent through comfygate with the gateway queue ON
and OFF, in front of the same fake ComfyUI, gets the same answer: with it OFF, ComfyUI (the
fake) answers; with it ON, comfygate answers before holding. A prompt refused with the queue
ON never reached the fake. With and without isolation (which types the graph before it is
read, and rewrites it).

The prompts the proxy cannot judge (``DEFERRED``) are the one documented difference: held
(200, ``node_errors`` empty), refused by ComfyUI at release.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.observability.metrics import METRICS
from proxy.policy.catalog.upstream import CATALOG
from proxy.scheduler import validate
from proxy.scheduler.gate import Gate
from proxy.scheduler.keys import GATE
from proxy.upstream.pool import POOL
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.support import validation_corpus as corpus

Client = TestClient[Any, Any]
USER = bearer("carol")
SECRET = "hold-validation-folder-secret-0123456789abcdef"
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"rate_limits": {"enabled": False}, "isolation": {"enabled": False}},
    "isolation": {"rate_limits": {"enabled": False}, "isolation": {"folder_secret": SECRET}},
}


def prepare(fake: FakeComfyUI) -> None:
    """The checkpoint and the input image the corpus names."""
    checkpoint = Path(fake.paths.model_dirs("checkpoints")[0]) / corpus.CHECKPOINT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"x")
    Path(fake.paths.input, corpus.INPUT_IMAGE).write_bytes(b"png")


def tagged(prompt: dict[str, Any], tag: str) -> dict[str, Any]:
    """``prompt`` with ``tag`` as every node's title (``_meta`` is forwarded as sent): what
    the fake received of this submission can be found."""
    return {k: {**v, "_meta": {"title": tag}} for k, v in prompt.items()}


def received_tags(fake: FakeComfyUI) -> str:
    return "\n".join(
        r.body.decode() for r in fake.received if r.method == "POST" and r.path.endswith("prompt")
    )


async def submit(client: Client, prompt: dict[str, Any]) -> tuple[int, Any]:
    body = {"prompt": prompt, "client_id": "tab"}
    async with client.post("/prompt", json=body, headers=USER) as resp:
        return resp.status, await resp.json()


async def pair(make_proxy: ProxyFactory, fake: FakeComfyUI, config: str) -> tuple[Client, Client]:
    """Two proxies in front of ``fake``: the gateway queue off, and on."""
    prepare(fake)
    sections: dict[str, Any] = CONFIGS[config]
    # Off explicitly: the gateway queue is on by default.
    off = await make_proxy(fake.url, token=None, **sections, scheduler={"enabled": False})
    on = await make_proxy(fake.url, token=None, **sections, scheduler={"enabled": True})
    return off, on


@pytest.fixture(params=sorted(CONFIGS))
async def proxies(
    request: pytest.FixtureRequest, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> tuple[Client, Client]:
    return await pair(make_proxy, fake_comfy, request.param)


@pytest.mark.parametrize(
    ("name", "prompt"),
    corpus.INVALID + corpus.PARTIAL + corpus.VALID,
    ids=[n for n, _ in corpus.INVALID + corpus.PARTIAL + corpus.VALID],
)
async def test_the_answer_is_the_same_with_the_queue_on_and_off(
    proxies: tuple[Client, Client], fake_comfy: FakeComfyUI, name: str, prompt: dict[str, Any]
) -> None:
    off, on = proxies
    off_status, off_answer = await submit(off, tagged(prompt, f"off-{name}"))
    on_status, on_answer = await submit(on, tagged(prompt, f"on-{name}"))
    assert on_status == off_status, (off_answer, on_answer)
    if off_status == 200:
        assert on_answer["node_errors"] == off_answer["node_errors"]
        assert set(on_answer) == set(off_answer)
        return
    assert on_answer == off_answer
    # ComfyUI's own refusal, not one of the proxy's checks before (isolation: files)
    judged_before = on_answer["error"]["type"] not in corpus.COMFYUI_ERRORS
    assert (f"off-{name}" in received_tags(fake_comfy)) is not judged_before
    # Refused before holding: nothing of it reached ComfyUI (ComfyUI refused the OFF one).
    assert f"on-{name}" not in received_tags(fake_comfy)
    assert await on.app[GATE].store.held(None) == []


@pytest.mark.parametrize(("name", "prompt"), corpus.DEFERRED, ids=[n for n, _ in corpus.DEFERRED])
async def test_what_only_comfyui_can_judge_is_held_and_refused_at_release(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, name: str, prompt: dict[str, Any]
) -> None:
    # Without isolation: with it, a file not in the user's folder is refused before (alike).
    off, on = await pair(make_proxy, fake_comfy, "plain")
    off_status, off_answer = await submit(off, tagged(prompt, f"off-{name}"))
    assert off_status == 400
    gate: Gate = on.app[GATE]
    # ComfyUI has room and nothing waits: straight through, ComfyUI's own answer.
    assert await submit(on, tagged(prompt, f"straight-{name}")) == (400, off_answer)
    assert f"straight-{name}" in received_tags(fake_comfy)
    # ComfyUI busy (one running, one pending: the room the gate gives it): held.
    fake_comfy.hold()
    for i in range(2):
        status, _ = await submit(on, tagged(corpus.VALID[0][1], f"busy-{name}-{i}"))
        assert status == 200
    on_status, on_answer = await submit(on, tagged(prompt, f"on-{name}"))
    assert on_status == 200, on_answer
    assert on_answer["node_errors"] == {}
    assert f"on-{name}" not in received_tags(fake_comfy)
    fake_comfy.release()
    pid = on_answer["prompt_id"]
    for _ in range(200):
        if pid in await gate.store.failed(None):
            break
        gate.wake()
        await gate.wait_ticks(1)
    assert pid in await gate.store.failed(None)  # ComfyUI refused it at release
    assert f"on-{name}" in received_tags(fake_comfy)


async def test_a_refusal_is_counted_and_gives_its_quota_count_back(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """The quota count taken for the refused prompt is given back (a quota of one would
    refuse the next prompt otherwise), and the refusal metric carries ComfyUI's error type."""
    on = await make_proxy(
        fake_comfy.url,
        token=None,
        rate_limits={"queue_quota": 1, "default": {"submit": {"rate": "unlimited"}}},
        isolation={"folder_secret": SECRET},
        scheduler={"enabled": True},
    )
    invalid = {"1": corpus.empty(width=0), "9": corpus.save(["1", 0])}
    for _ in range(3):
        status, answer = await submit(on, invalid)
        assert status == 400
        assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    status, answer = await submit(on, {"1": corpus.empty(), "9": corpus.save(["1", 0])})
    assert status == 200, answer
    refusals = on.app[METRICS].prompt_refusals.labels("prompt_outputs_failed_validation")
    assert refusals._value.get() == 3
    assert received_tags(fake_comfy).count('"width":0') == 0


@pytest.mark.parametrize(("name", "prompt"), corpus.RAISING, ids=[n for n, _ in corpus.RAISING])
async def test_what_comfyui_raises_on_is_refused_by_the_proxy_or_held(
    proxies: tuple[Client, Client], fake_comfy: FakeComfyUI, name: str, prompt: dict[str, Any]
) -> None:
    """Refused by comfygate's graph reader (the same answer either way), or, when it reads the
    graph without schemas, held and refused by ComfyUI at release: never a 500, never lost."""
    off, on = proxies
    off_status, _ = await submit(off, tagged(prompt, f"off-{name}"))
    assert off_status == 400
    on_status, on_answer = await submit(on, tagged(prompt, f"on-{name}"))
    if on_status == 400:
        assert on_answer["error"]["type"] not in corpus.COMFYUI_ERRORS  # the proxy's own
        assert f"on-{name}" not in received_tags(fake_comfy)
        return
    assert on_status == 200
    assert on_answer["node_errors"] == {}
    gate: Gate = on.app[GATE]
    for _ in range(200):
        if on_answer["prompt_id"] in await gate.store.failed(None):
            break
        gate.wake()
        await gate.wait_ticks(1)
    assert on_answer["prompt_id"] in await gate.store.failed(None)


# -- freshness and several instances ------------------------------------------------------------


async def test_a_model_added_since_the_copy_is_not_refused(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """A combo's options are re-read by ComfyUI on every request: a refusal on them waits for
    a fresh copy of ``/object_info`` (refetched once), so a model installed after the proxy's
    copy was taken is accepted, and one that does not exist is still refused."""
    _, on = await pair(make_proxy, fake_comfy, "plain")
    status, _ = await submit(on, corpus.VALID[0][1])  # the copy is taken now
    assert status == 200
    catalog = on.app[CATALOG]
    cache = catalog.cache(on.app[POOL].home())
    assert cache.snapshot is not None
    fetches = cache.fetches
    added = Path(fake_comfy.paths.model_dirs("checkpoints")[0]) / "sd15" / "added.safetensors"
    added.write_bytes(b"x")
    later = cache.clock() + validate.FRESH_SECONDS + 1
    cache.clock = lambda: later  # the copy is now older than FRESH_SECONDS
    named_new = corpus.VALID[7][1] | {
        "4": corpus.node("CheckpointLoaderSimple", ckpt_name="sd15/added.safetensors")
    }
    assert corpus.VALID[7][0] == "txt2img"
    status, answer = await submit(on, named_new)
    assert status == 200, answer
    assert cache.fetches == fetches + 1  # refetched once for it
    missing = dict(corpus.INVALID)["model_not_in_list"]
    status, answer = await submit(on, missing)
    assert status == 400
    assert answer["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
    assert cache.fetches == fetches + 1  # the copy is fresh: no second fetch


@pytest.fixture
async def gpus(tmp_path: Path) -> AsyncIterator[dict[str, FakeComfyUI]]:
    """gpu-full (every node, a checkpoint) and gpu-small (no ImageBlur, no checkpoint)."""
    out = {
        "gpu-full": FakeComfyUI(root=tmp_path / "full"),
        "gpu-small": FakeComfyUI(
            root=tmp_path / "small", nodes={"EmptyImage", "SaveImage", "PreviewImage"}
        ),
    }
    prepare(out["gpu-full"])
    for fake in out.values():
        await fake.start()
        fake.hold()
    yield out
    for fake in out.values():
        fake.release()
        await fake.stop()


async def test_several_instances_refuse_only_what_all_candidates_refuse(
    make_proxy: ProxyFactory, gpus: dict[str, FakeComfyUI]
) -> None:
    on = await make_proxy(
        "http://127.0.0.1:9",
        token=None,
        upstream={
            "urls": [],
            "instances": [{"url": f.url, "name": n} for n, f in gpus.items()],
            "health": {"interval_seconds": 3600},
            "placement": {"capabilities_refresh_seconds": 3600},
        },
        scheduler={"enabled": True, "pull_back": False},
        rate_limits={"enabled": False},
        isolation={"enabled": False},
    )
    # Invalid on every instance (instance-independent): refused at once, as each would.
    status, answer = await submit(on, dict(corpus.INVALID)["below_min"])
    assert status == 400
    assert answer["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min"
    # Only gpu-full can run ImageBlur: judged on its copy alone.
    status, answer = await submit(on, dict(corpus.INVALID)["float_below_min"])
    assert status == 400
    assert answer["node_errors"]["1"]["class_type"] == "ImageBlur"
    assert [received_tags(fake) for fake in gpus.values()] == ["", ""]  # nothing reached them
    # The checkpoint is only on gpu-full: whatever placement decides, never refused.
    status, answer = await submit(on, dict(corpus.VALID)["txt2img"])
    assert status == 200, answer
