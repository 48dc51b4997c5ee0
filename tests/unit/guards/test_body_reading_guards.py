"""Unit tests of the guards that read an inspected body through the shared readers
(``read_json_body``, ``read_prompt``): isolation's history, queue and prompt guards and the
queue quota on ``POST /prompt``. The readers find their collaborators on a mocked app
(``support.body_app``); the stores are the in-memory ones."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.comfy.records import PromptRecord
from proxy.comfy.violations import PromptRejected
from proxy.errors import BadRequest
from proxy.isolation.read_guard import HistoryGuard, LocalAnswer, QueueGuard, ReadGuard
from proxy.isolation.submit_guard import PromptSubmitGuard
from proxy.limits.quota.guard import QueueQuotaGuard
from proxy.limits.quota.model import MemoryQuotaStore
from proxy.limits.quota.service import QueueFull, QueueQuota
from proxy.observability.metrics import Metrics
from proxy.tenancy.namespaces import FolderNames, upstream_client_id
from proxy.tenancy.ownership import MemoryOwnershipStore
from proxy.upstream.pool import UpstreamPool
from tests.support.graphs import save_graph
from tests.unit.guards.support import body_app, principal, prompt_reader, request, settings

ISOLATED = settings(isolation={"enabled": True})
NEW_ID, ALICES_ID = "0b5e4b1e-3f7c-4d21-9a57-6c1f0e2d8a11", "9d0c2a64-51f3-4b8e-8c7a-2e6b1d4f3a90"
ALICE, BOB, ADMIN = principal("alice"), principal("bob"), principal("root", "admin")


async def _never(request: web.Request) -> web.StreamResponse:
    raise AssertionError("no full read expected")


def isolated_app() -> web.Application:
    return body_app(prompt_reader(ISOLATED))


def read_guard(kind: type[ReadGuard], store: MemoryOwnershipStore) -> ReadGuard:
    return kind(
        roles=ISOLATED.roles,
        isolation=ISOLATED.isolation,
        ownership=store,
        metrics=Metrics(CollectorRegistry()),
        forward=_never,
    )


async def owned_by(owner: str, *prompt_ids: str) -> MemoryOwnershipStore:
    store = MemoryOwnershipStore(3600)
    for prompt_id in prompt_ids:
        assert await store.record_prompt(PromptRecord(prompt_id, owner, "u", "c", time.time()))
    return store


def post(path: str, rule: str, who: object, body: dict[str, Any]) -> Any:
    return request(
        "POST",
        path,
        rule=rule,  # type: ignore[arg-type]
        who=who,  # type: ignore[arg-type]
        payload=orjson.dumps(body),
        headers={"Content-Type": "application/json"},
        app=isolated_app(),
    )


# -- HistoryGuard ------------------------------------------------------------------------------


async def test_history_delete_keeps_only_the_callers_ids() -> None:
    guard = read_guard(HistoryGuard, await owned_by(ALICE.comfy_user, "p-alice"))
    req, ctx = post("/history", "history", ALICE, {"delete": ["p-alice", "p-bob"]})
    await guard.check(req, ctx)
    assert orjson.loads(ctx.body or b"") == {"delete": ["p-alice"]}


async def test_history_delete_of_only_others_ids_never_reaches_comfyui() -> None:
    guard = read_guard(HistoryGuard, await owned_by(ALICE.comfy_user, "p-alice"))
    req, ctx = post("/history", "history", BOB, {"delete": ["p-alice"]})
    with pytest.raises(LocalAnswer) as answer:
        await guard.check(req, ctx)
    assert answer.value.status == 200
    assert ctx.rejected_by == "isolation"


async def test_history_of_an_admin_is_untouched() -> None:
    guard = read_guard(HistoryGuard, await owned_by(ALICE.comfy_user, "p-alice"))
    req, ctx = post("/history", "history", ADMIN, {"delete": ["p-alice"]})
    await guard.check(req, ctx)
    assert ctx.body is None  # not even read: the body guard reads it
    assert ctx.response_filters == []


async def test_history_refuses_an_unreadable_body() -> None:
    guard = read_guard(HistoryGuard, MemoryOwnershipStore(60))
    req, ctx = request(
        "POST", "/history", rule="history", who=BOB, payload=b"[1]", app=isolated_app()
    )
    with pytest.raises(BadRequest) as refused:
        await guard.check(req, ctx)
    assert refused.value.error_type == "invalid_body"


# -- QueueGuard --------------------------------------------------------------------------------


async def test_queue_delete_keeps_only_the_callers_ids() -> None:
    guard = read_guard(QueueGuard, await owned_by(BOB.comfy_user, "p-bob"))
    req, ctx = post("/queue", "queue", BOB, {"delete": ["p-bob", "p-other"]})
    await guard.check(req, ctx)
    assert orjson.loads(ctx.body or b"") == {"delete": ["p-bob"]}


async def test_queue_delete_of_others_ids_is_answered_locally() -> None:
    guard = read_guard(QueueGuard, await owned_by(ALICE.comfy_user, "p-alice"))
    req, ctx = post("/queue", "queue", BOB, {"delete": ["p-alice"]})
    with pytest.raises(LocalAnswer):
        await guard.check(req, ctx)


async def test_queue_reads_get_the_redacting_filter() -> None:
    guard = read_guard(QueueGuard, await owned_by(ALICE.comfy_user, "p-alice"))
    req, ctx = request("GET", "/queue", rule="queue", who=BOB)
    await guard.check(req, ctx)
    assert len(ctx.response_filters) == 1
    queue = {"queue_running": [], "queue_pending": [[0, "p-alice", {}, {}, []]]}
    shown = orjson.loads(await ctx.response_filters[0](200, orjson.dumps(queue)))
    assert shown["queue_pending"][0][1] != "p-alice"  # someone else's: a placeholder


# -- PromptSubmitGuard -------------------------------------------------------------------------


def prompt_guard(store: MemoryOwnershipStore) -> PromptSubmitGuard:
    return PromptSubmitGuard(
        roles=ISOLATED.roles,
        isolation=ISOLATED.isolation,
        ownership=store,
        folders=FolderNames(b"k" * 32),
        pool=UpstreamPool(ISOLATED.upstream),
    )


async def test_prompt_is_recorded_as_the_callers_with_a_namespaced_client_id() -> None:
    store = MemoryOwnershipStore(3600)
    guard = prompt_guard(store)
    body = {"prompt": save_graph(), "client_id": "tab-1", "prompt_id": NEW_ID}
    req, ctx = post("/prompt", "prompt", BOB, body)
    await guard.check(req, ctx)
    sent = orjson.loads(ctx.body or b"")
    assert sent["prompt_id"] == NEW_ID
    assert sent["client_id"] == upstream_client_id(BOB.comfy_user, "tab-1")
    record = await store.prompt(NEW_ID)
    assert record is not None
    assert record.owner == BOB.comfy_user
    assert record.sent_client_id == "tab-1"
    assert len(ctx.response_filters) == 1  # forgets the record if ComfyUI refuses it


async def test_prompt_with_someone_elses_id_is_refused() -> None:
    store = await owned_by(ALICE.comfy_user, ALICES_ID)
    guard = prompt_guard(store)
    req, ctx = post("/prompt", "prompt", BOB, {"prompt": save_graph(), "prompt_id": ALICES_ID})
    with pytest.raises(BadRequest) as refused:
        await guard.check(req, ctx)
    assert refused.value.error_type == "prompt_id_taken"
    record = await store.prompt(ALICES_ID)
    assert record is not None
    assert record.owner == ALICE.comfy_user


async def test_prompt_reading_another_users_input_is_refused() -> None:
    guard = prompt_guard(MemoryOwnershipStore(60))
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "users/alice-x/secret.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
    }
    req, ctx = post("/prompt", "prompt", BOB, {"prompt": graph})
    with pytest.raises(PromptRejected):
        await guard.check(req, ctx)


# -- QueueQuotaGuard on POST /prompt -------------------------------------------------------------

LIMITED = settings(rate_limits={"enabled": True, "queue_quota": 1})


async def test_prompt_quota_counts_each_prompt_and_refuses_over_the_quota() -> None:
    quota = QueueQuota(LIMITED, MemoryQuotaStore(60), Metrics(CollectorRegistry()))
    guard = QueueQuotaGuard(quota, UpstreamPool(LIMITED.upstream))
    app = body_app(prompt_reader(LIMITED))

    def submit() -> Any:
        return request(
            "POST",
            "/prompt",
            rule="prompt",
            who=BOB,
            payload=orjson.dumps({"prompt": save_graph()}),
            app=app,
        )

    req, ctx = submit()
    await guard.check(req, ctx)
    minted = orjson.loads(ctx.body or b"")["prompt_id"]  # added so its end can be recognised
    assert minted
    assert len(ctx.response_filters) == 1  # follows ComfyUI's answer
    req, ctx = submit()
    with pytest.raises(QueueFull):
        await guard.check(req, ctx)
    # Another user has a quota of their own.
    req, ctx = request(
        "POST",
        "/prompt",
        rule="prompt",
        who=ALICE,
        payload=orjson.dumps({"prompt": save_graph()}),
        app=app,
    )
    await guard.check(req, ctx)
