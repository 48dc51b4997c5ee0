"""Unit tests of the multi-instance guards built with their collaborators: idempotency
(``proxy.multi.idempotency``, on the in-memory store) and upload replication
(``proxy.multi.replication``)."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.errors import BadRequest, ProxyError
from proxy.multi.idempotency import (
    CLAIM,
    HEADER,
    IdempotencyGuard,
    MemoryIdempotencyStore,
    Replay,
    StoredAnswer,
)
from proxy.multi.replication import ReplicationGuard
from proxy.observability.metrics import Metrics
from proxy.principal import Principal
from proxy.settings import Settings
from proxy.state import RequestContext
from proxy.upstream.pool import UpstreamPool
from tests.support.graphs import save_graph
from tests.unit.guards.support import principal, prompt_reader, request, settings

CONFIGURED = settings()
ALICE, BOB = principal("alice"), principal("bob")
GRAPH = {"prompt": save_graph()}


def idempotency_guard(store: MemoryIdempotencyStore) -> IdempotencyGuard:
    reader = prompt_reader(CONFIGURED)
    return IdempotencyGuard(store, CONFIGURED.upstream, reader.metrics, reader)


def submit(
    who: Principal, key: str | None, body: object = GRAPH
) -> tuple[web.Request, RequestContext]:
    headers = {HEADER: key} if key is not None else {}
    return request(
        "POST",
        "/prompt",
        rule="prompt",
        who=who,
        headers=headers,
        payload=orjson.dumps(body),
    )


async def test_without_a_key_nothing_is_claimed() -> None:
    guard = idempotency_guard(MemoryIdempotencyStore())
    req, ctx = request("POST", "/prompt", rule="prompt", who=ALICE, payload=orjson.dumps(GRAPH))
    await guard.check(req, ctx)
    assert req.get(CLAIM) is None
    assert ctx.body is None  # not even read: the prompt guard reads it


@pytest.mark.parametrize("key", ["", "x" * 256, "clé"])
async def test_a_malformed_key_is_refused(key: str) -> None:
    guard = idempotency_guard(MemoryIdempotencyStore())
    req, ctx = submit(ALICE, key)
    with pytest.raises(BadRequest) as refused:
        await guard.check(req, ctx)
    assert refused.value.error_type == "bad_idempotency_key"


async def test_first_claims_then_a_repeat_is_refused_until_answered_then_replayed() -> None:
    store = MemoryIdempotencyStore()
    guard = idempotency_guard(store)
    req, ctx = submit(ALICE, "k1")
    await guard.check(req, ctx)
    claim = req.get(CLAIM)
    assert claim is not None
    req, ctx = submit(ALICE, "k1")
    with pytest.raises(ProxyError) as refused:
        await guard.check(req, ctx)
    assert (refused.value.status, refused.value.error_type) == (409, "idempotency_key_in_use")
    answer = StoredAnswer(200, b'{"prompt_id": "p"}', "application/json")
    await store.complete(claim.key, claim.fingerprint, answer, 60)
    req, ctx = submit(ALICE, "k1")
    with pytest.raises(Replay) as replay:
        await guard.check(req, ctx)
    assert replay.value.answer == answer


async def test_a_key_is_the_callers_own() -> None:
    guard = idempotency_guard(MemoryIdempotencyStore())
    req, ctx = submit(ALICE, "k1")
    await guard.check(req, ctx)
    req, ctx = submit(BOB, "k1")  # the same key, another user: a first request of theirs
    await guard.check(req, ctx)
    assert req.get(CLAIM) is not None


async def test_a_key_reused_with_another_body_is_refused() -> None:
    guard = idempotency_guard(MemoryIdempotencyStore())
    req, ctx = submit(ALICE, "k1")
    await guard.check(req, ctx)
    req, ctx = submit(ALICE, "k1", {"prompt": save_graph()})
    with pytest.raises(ProxyError) as refused:
        await guard.check(req, ctx)
    assert (refused.value.status, refused.value.error_type) == (422, "idempotency_key_reused")


# -- ReplicationGuard --------------------------------------------------------------------------

TWO = settings(upstream={"urls": ("http://127.0.0.1:8188", "http://127.0.0.1:8189")})


def replication_guard(configured: Settings = TWO, **placement: object) -> ReplicationGuard:
    if placement:
        configured = settings(upstream={"urls": TWO.upstream.urls, "placement": placement})
    upstream = configured.upstream
    return ReplicationGuard(
        UpstreamPool(upstream), upstream.placement, Metrics(CollectorRegistry())
    )


async def test_an_upload_goes_to_one_instance_then_to_the_others() -> None:
    guard = replication_guard()
    req, ctx = request("POST", "/upload/image", rule="upload", who=ALICE)
    await guard.check(req, ctx)
    assert ctx.target is not None
    assert ctx.target.name == "127.0.0.1:8188"  # the home instance, healthy
    assert ctx.body_stream is not None  # spooled while it streams
    assert len(ctx.response_filters) == 1  # copies it once ComfyUI stored it
    assert await ctx.response_filters[0](400, b"{}") == b"{}"  # nothing stored: no copy


@pytest.mark.parametrize(
    ("guard", "method"),
    [
        (replication_guard(CONFIGURED), "POST"),  # one instance
        (replication_guard(replicate_uploads=False), "POST"),
        (replication_guard(), "GET"),
    ],
)
async def test_replication_leaves_alone(guard: ReplicationGuard, method: str) -> None:
    req, ctx = request(method, "/upload/image", rule="upload", who=ALICE)
    await guard.check(req, ctx)
    assert ctx.target is None
    assert ctx.response_filters == []
