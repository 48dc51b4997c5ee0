"""Unit tests of the per-operation isolation guards (``proxy.isolation.read_guard``,
``proxy.isolation.submit_guard``), on the in-memory ownership store."""

from __future__ import annotations

import time

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.comfy.records import PromptRecord
from proxy.errors import BadRequest
from proxy.isolation.read_guard import (
    InterruptGuard,
    JobsGuard,
    LocalAnswer,
    ReadGuard,
    SocketGuard,
)
from proxy.isolation.submit_guard import HiddenNotFound, SubmitGuard, UploadGuard, ViewGuard
from proxy.observability.metrics import Metrics
from proxy.tenancy.events import SocketEventFilter
from proxy.tenancy.namespaces import FolderNames, upstream_client_id
from proxy.tenancy.ownership import MemoryOwnershipStore
from proxy.upstream.pool import UpstreamPool
from tests.unit.guards.support import principal, request, settings

ISOLATED = settings(isolation={"enabled": True})
ALICE, BOB, ADMIN = principal("alice"), principal("bob"), principal("root", "admin")


async def _never(request: web.Request) -> web.StreamResponse:
    raise AssertionError("no full read expected")


def read_guard(kind: type[ReadGuard], store: MemoryOwnershipStore) -> ReadGuard:
    return kind(
        roles=ISOLATED.roles,
        isolation=ISOLATED.isolation,
        ownership=store,
        metrics=Metrics(CollectorRegistry()),
        forward=_never,
    )


def submit_guard(kind: type[SubmitGuard], store: MemoryOwnershipStore) -> SubmitGuard:
    return kind(
        roles=ISOLATED.roles,
        isolation=ISOLATED.isolation,
        ownership=store,
        folders=FolderNames(b"k" * 32),
        pool=UpstreamPool(ISOLATED.upstream),
    )


async def store_with_alices_prompt() -> MemoryOwnershipStore:
    store = MemoryOwnershipStore(3600)
    record = PromptRecord("p-alice", ALICE.comfy_user, "u", "c", time.time())
    assert await store.record_prompt(record)
    return store


@pytest.mark.parametrize(("who", "answered"), [(ALICE, False), (BOB, True), (ADMIN, False)])
async def test_interrupt_of_a_prompt_id(who: object, answered: bool) -> None:
    guard = read_guard(InterruptGuard, await store_with_alices_prompt())
    body = {"prompt_id": "p-alice"}
    req, ctx = request("POST", "/interrupt", rule="interrupt", who=who, body=orjson.dumps(body))  # type: ignore[arg-type]
    ctx.parsed_body = (ctx.body or b"", body)
    if answered:  # someone else's prompt: ComfyUI's no-op answer, ComfyUI never asked
        with pytest.raises(LocalAnswer) as answer:
            await guard.check(req, ctx)
        assert answer.value.status == 200
        assert ctx.rejected_by == "isolation"
    else:
        await guard.check(req, ctx)


@pytest.mark.parametrize(
    ("path", "method", "who", "status"),
    [
        ("/jobs/p-alice", "GET", BOB, 404),
        ("/jobs/p-alice/cancel", "POST", BOB, 200),
        ("/jobs/p-alice", "GET", ALICE, None),
        ("/jobs/p-alice", "GET", ADMIN, None),
    ],
)
async def test_jobs_of_others_look_unknown(
    path: str, method: str, who: object, status: int | None
) -> None:
    guard = read_guard(JobsGuard, await store_with_alices_prompt())
    req, ctx = request(method, path, rule="jobs", who=who)  # type: ignore[arg-type]
    if status is None:
        await guard.check(req, ctx)
    else:
        with pytest.raises(LocalAnswer) as answer:
            await guard.check(req, ctx)
        assert answer.value.status == status


async def test_socket_client_ids_are_namespaced_and_frames_filtered() -> None:
    guard = read_guard(SocketGuard, MemoryOwnershipStore(60))
    req, ctx = request("GET", "/ws?clientId=mine", rule="ws", who=BOB)
    await guard.check(req, ctx)
    assert ctx.upstream_path == f"/ws?clientId={upstream_client_id(BOB.comfy_user, 'mine')}"
    assert [type(f) for f in ctx.frame_filters] == [SocketEventFilter]


async def test_guards_do_nothing_with_isolation_off() -> None:
    off = settings(isolation={"enabled": False})
    guard = SocketGuard(
        roles=off.roles,
        isolation=off.isolation,
        ownership=MemoryOwnershipStore(60),
        metrics=Metrics(CollectorRegistry()),
        forward=_never,
    )
    req, ctx = request("GET", "/ws?clientId=mine", rule="ws", who=BOB)
    await guard.check(req, ctx)
    assert ctx.upstream_path == "/ws?clientId=mine"
    assert ctx.frame_filters == []


async def test_view_hides_other_users_files() -> None:
    guard = submit_guard(ViewGuard, MemoryOwnershipStore(60))
    req, ctx = request("GET", "/view?filename=a.png&type=output&subfolder=x", rule="view", who=BOB)
    with pytest.raises(HiddenNotFound):
        await guard.check(req, ctx)
    req, ctx = request(
        "GET", "/view?filename=a.png&type=output&subfolder=x", rule="view", who=ADMIN
    )
    await guard.check(req, ctx)


async def test_view_of_an_own_recorded_file_passes() -> None:
    store = MemoryOwnershipStore(60)
    await store.record_files(BOB.comfy_user, [("output", "x", "a.png")])
    guard = submit_guard(ViewGuard, store)
    req, ctx = request("GET", "/view?filename=a.png&type=output&subfolder=x", rule="view", who=BOB)
    await guard.check(req, ctx)


async def test_upload_must_be_multipart() -> None:
    guard = submit_guard(UploadGuard, MemoryOwnershipStore(60))
    req, ctx = request("POST", "/upload/image", rule="upload", who=BOB)
    with pytest.raises(BadRequest) as refused:
        await guard.check(req, ctx)
    assert refused.value.error_type == "bad_upload"
