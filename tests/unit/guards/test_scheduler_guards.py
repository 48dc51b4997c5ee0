"""Unit tests of the gateway queue's guards (``proxy.scheduler.hook``), built with the gate
(not started: no feeder) on the in-memory scheduler store and ownership store."""

from __future__ import annotations

import time

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import build_header_policy
from proxy.comfy.records import PromptRecord
from proxy.errors import BadRequest
from proxy.principal import Principal
from proxy.request.prompt import PromptReader
from proxy.scheduler import gate as gate_module
from proxy.scheduler.gate import Gate
from proxy.scheduler.hook import WAIT_HEADER, CancelGuard, HoldGuard, ViewGuard
from proxy.scheduler.metrics import SchedulerMetrics
from proxy.scheduler.store import MemoryStore
from proxy.settings import Settings
from proxy.state import HEADER_POLICY, RequestContext
from proxy.tenancy.ownership import MemoryOwnershipStore
from proxy.upstream.pool import Upstream, UpstreamPool
from tests.support.graphs import save_graph
from tests.unit.guards.support import body_app, principal, prompt_reader, request, settings

ISOLATED = settings(isolation={"enabled": True}, scheduler={"enabled": True})
ALICE, BOB, ADMIN = principal("alice"), principal("bob"), principal("root", "admin")


def gate_of(configured: Settings, reader: PromptReader) -> Gate:
    metrics = SchedulerMetrics(CollectorRegistry(), configured.scheduler.fairness_window_seconds)
    ownership = MemoryOwnershipStore(3600) if configured.isolation.enabled else None
    pool = UpstreamPool(configured.upstream)
    gate = Gate(configured.scheduler, MemoryStore(), pool, metrics, ownership=ownership)
    # ComfyUI has no room (see comfyui_is_busy): every prompt is held. One it has room for
    # goes straight through (tests/integration/test_scheduler.py).
    gate.capacity = 0
    return gate


@pytest.fixture(autouse=True)
def comfyui_is_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI's queue, as the gate reads it to count an instance's room: one running, one
    pending (no server here)."""

    async def busy(pool: UpstreamPool, upstream: Upstream) -> tuple[list[str], list[str]]:
        return ["running"], ["pending"]

    monkeypatch.setattr(gate_module, "read_queue", busy)


def forwarding_app(reader: PromptReader) -> web.Application:
    """What the held request's headers are built with (``build_upstream_headers``: the
    transport's, looked up on the app as the forwarder does)."""
    app = body_app(reader)
    app[HEADER_POLICY] = build_header_policy(reader.settings)
    return app


def submit(
    who: Principal, body: object, reader: PromptReader
) -> tuple[web.Request, RequestContext]:
    payload = orjson.dumps(body)
    app = forwarding_app(reader)
    return request("POST", "/prompt", rule="prompt", who=who, payload=payload, app=app)


async def hold(gate: Gate, reader: PromptReader, who: Principal) -> str:
    """``who`` submits a prompt; it is held. Its id."""
    guard = HoldGuard(gate, reader)
    req, ctx = submit(who, {"prompt": save_graph(), "client_id": "tab"}, reader)
    await guard.check(req, ctx)
    assert ctx.answer is not None
    response = await ctx.answer(req)
    assert isinstance(response, web.Response)
    assert WAIT_HEADER in response.headers
    answer = orjson.loads(response.body)  # type: ignore[arg-type]
    assert answer["node_errors"] == {}
    prompt_id: str = answer["prompt_id"]
    return prompt_id


async def test_hold_keeps_the_prompt_and_answers_in_comfyuis_shape() -> None:
    reader = prompt_reader(ISOLATED)
    gate = gate_of(ISOLATED, reader)
    prompt_id = await hold(gate, reader, ALICE)
    entry = await gate.store.entry(prompt_id)
    assert entry is not None
    assert entry.held.owner == ALICE.comfy_user
    assert orjson.loads(entry.body)["prompt_id"] == prompt_id  # minted into what is sent


async def test_hold_lets_reads_and_empty_prompts_through() -> None:
    reader = prompt_reader(ISOLATED)
    gate = gate_of(ISOLATED, reader)
    guard = HoldGuard(gate, reader)
    req, ctx = request("GET", "/prompt", rule="prompt", who=ALICE)
    await guard.check(req, ctx)
    req, ctx = submit(ALICE, {"client_id": "tab"}, reader)  # no prompt: ComfyUI answers no_prompt
    await guard.check(req, ctx)
    assert ctx.answer is None
    assert await gate.store.held(None) == []


async def test_a_prompt_id_held_already_is_refused() -> None:
    reader = prompt_reader(settings(scheduler={"enabled": True}))
    gate = gate_of(reader.settings, reader)
    prompt_id = await hold(gate, reader, ALICE)
    req, ctx = submit(BOB, {"prompt": save_graph(), "prompt_id": prompt_id}, reader)
    with pytest.raises(BadRequest) as refused:
        await HoldGuard(gate, reader).check(req, ctx)
    assert refused.value.error_type == "prompt_id_taken"


async def test_cancel_removes_only_the_callers_held_prompts() -> None:
    reader = prompt_reader(ISOLATED)
    gate = gate_of(ISOLATED, reader)
    alices, bobs = await hold(gate, reader, ALICE), await hold(gate, reader, BOB)
    guard = CancelGuard(gate, ISOLATED, reader.bodies)
    req, ctx = request(
        "POST", "/queue", rule="queue", who=BOB, payload=orjson.dumps({"delete": [alices]})
    )
    await guard.check(req, ctx)
    assert [h.prompt_id for h in await gate.store.held(None)] == [alices, bobs]
    req, ctx = request(
        "POST", "/queue", rule="queue", who=BOB, payload=orjson.dumps({"clear": True})
    )
    await guard.check(req, ctx)
    assert [h.prompt_id for h in await gate.store.held(None)] == [alices]
    req, ctx = request(
        "POST", "/queue", rule="queue", who=ADMIN, payload=orjson.dumps({"delete": [alices]})
    )
    await guard.check(req, ctx)  # an admin's cancel reaches everyone's
    assert await gate.store.held(None) == []


async def test_queue_view_shows_the_callers_held_prompts_only() -> None:
    reader = prompt_reader(ISOLATED)
    gate = gate_of(ISOLATED, reader)
    assert gate.ownership is not None
    alices = await hold(gate, reader, ALICE)
    await gate.ownership.record_prompt(
        PromptRecord(alices, ALICE.comfy_user, "u", "c", time.time())
    )
    guard = ViewGuard(gate, ISOLATED)
    empty = orjson.dumps({"queue_running": [], "queue_pending": []})
    for who, shown in ((ALICE, [alices]), (BOB, []), (ADMIN, [alices])):
        req, ctx = request("GET", "/queue", rule="queue", who=who)
        await guard.check(req, ctx)
        assert len(ctx.response_filters) == 1
        queue = orjson.loads(await ctx.response_filters[0](200, empty))
        assert [item[1] for item in queue["queue_pending"]] == shown


async def test_job_detail_of_someone_elses_held_prompt_is_not_answered() -> None:
    reader = prompt_reader(ISOLATED)
    gate = gate_of(ISOLATED, reader)
    alices = await hold(gate, reader, ALICE)
    guard = ViewGuard(gate, ISOLATED)
    req, ctx = request("GET", f"/jobs/{alices}", rule="jobs", who=BOB)
    await guard.check(req, ctx)
    assert ctx.answer is None  # left to isolation: "Job not found"
    req, ctx = request("GET", f"/jobs/{alices}", rule="jobs", who=ALICE)
    await guard.check(req, ctx)
    assert ctx.answer is not None
    job = orjson.loads((await ctx.answer(req)).body)  # type: ignore[attr-defined]
    assert (job["id"], job["status"]) == (alices, "pending")
