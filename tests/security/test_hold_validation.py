"""Hold-time validation under attack (``proxy.scheduler.validate``): user B's invalid prompts
are refused before they are held, in ComfyUI's shape, without touching user A's held prompts
(ids, order), A's quota count or A's ownership records, and nothing of B's reaches ComfyUI.
B cannot use a refusal to free or take over A's prompt id either.

The README's deployment: JWT, isolation, the workflow policy, Redis; the gateway queue on with
one prompt in ComfyUI at a time (the fake holds it running), so A's others stay held.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.limits.quota.service import QUEUE_QUOTA
from proxy.principal import comfy_user_id
from proxy.scheduler.gate import Gate
from proxy.scheduler.keys import GATE
from proxy.tenancy.ownership import OWNERSHIP
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.security.prompt_support import B, image, node, policy_sections, saved
from tests.security.test_scheduler import a_held

Client = TestClient[Any, Any]
ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
INVALID = {"1": image(width=0), "9": node("SaveImage", images=["1", 0], filename_prefix="b")}


@pytest.fixture
async def client(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any, redis_url: str
) -> Client:
    fake_comfy.hold()
    return await make_proxy(
        fake_comfy.url,
        token=None,
        **policy_sections(tmp_path),
        redis={"url": redis_url},
        scheduler={"enabled": True, "max_pending": 0},
    )


def gate_of(client: Client) -> Gate:
    gate: Gate = client.app[GATE]
    return gate


def prompts_received(fake: FakeComfyUI) -> list[bytes]:
    return [r.body for r in fake.received if r.method == "POST" and r.path.endswith("/prompt")]


async def state(client: Client) -> tuple[list[str], int, int]:
    """The held ids in order, A's and B's quota counts."""
    quota = client.app[QUEUE_QUOTA]
    held = [h.prompt_id for h in await gate_of(client).store.held(None)]
    return held, await quota.store.in_use(f"u:{ALICE}"), await quota.store.in_use(f"u:{BOB}")


async def test_b_invalid_prompt_is_refused_without_touching_a(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    ids = await a_held(client, fake_comfy)
    before, received = await state(client), len(prompts_received(fake_comfy))
    assert before[0] == ids[1:]
    for extra in ({}, {"front": True}, {"number": -1}):
        body = {"prompt": INVALID, "client_id": "b-tab", **extra}
        async with client.post("/prompt", json=body, headers=B) as resp:
            assert resp.status == 400
            answer = await resp.json()
        assert set(answer) == {"error", "node_errors"}
        assert answer["error"]["type"] == "prompt_outputs_failed_validation"
        assert set(answer["node_errors"]) == {"1"}  # B's own node, nothing of A's
        assert answer["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min"
        assert not any(pid in str(answer) for pid in ids)
    assert await state(client) == before  # A's held prompts, order and count; B counts 0
    assert len(prompts_received(fake_comfy)) == received  # nothing of B's reached ComfyUI
    fake_comfy.release()


async def test_b_refused_prompt_id_is_forgotten_not_kept(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """The id of B's refused prompt is not recorded (it was never queued): B may use it again,
    and no one else's record was made or removed."""
    fake_comfy.release()
    pid = str(uuid.uuid4())
    body = {"prompt": INVALID, "prompt_id": pid, "client_id": "b-tab"}
    async with client.post("/prompt", json=body, headers=B) as resp:
        assert resp.status == 400
    assert await client.app[OWNERSHIP].prompt(pid) is None
    assert await state(client) == ([], 0, 0)
    assert not any(pid.encode() in b for b in prompts_received(fake_comfy))
    body = {"prompt": saved(image()), "prompt_id": pid, "client_id": "b-tab"}
    async with client.post("/prompt", json=body, headers=B) as resp:
        assert resp.status == 200
        assert (await resp.json())["prompt_id"] == pid
    record = await client.app[OWNERSHIP].prompt(pid)
    assert record is not None
    assert record.owner == BOB


async def test_b_invalid_prompt_with_a_held_id_cannot_drop_a_records(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """B names A's held prompt id in an invalid prompt: refused as a taken id before any
    validation, and the refusal undoes nothing of A's (record, queue entry, count)."""
    ids = await a_held(client, fake_comfy)
    before, received = await state(client), len(prompts_received(fake_comfy))
    for pid in ids:
        body = {"prompt": INVALID, "prompt_id": pid, "client_id": "b-tab"}
        async with client.post("/prompt", json=body, headers=B) as resp:
            assert resp.status == 400
            answer = await resp.json()
        assert answer["error"]["type"] != "prompt_outputs_failed_validation"
        record = await client.app[OWNERSHIP].prompt(pid)
        assert record is not None
        assert record.owner == ALICE
    assert await state(client) == before
    assert len(prompts_received(fake_comfy)) == received
    fake_comfy.release()
