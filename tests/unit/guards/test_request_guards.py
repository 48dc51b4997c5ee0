"""Unit tests of the guards every request meets before the families' own: the origin check
(``proxy.origin``), the inspected-body reader (``proxy.request.bodies``), the ``POST /prompt``
reader (``proxy.request.prompt``) and the frontend's guards (``proxy.frontend``). Each is
built with its collaborators; no app keys."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web

from proxy.auth.origin_guard import OriginGuard
from proxy.comfy.submission import Submission
from proxy.comfy.violations import PromptRejected
from proxy.errors import BadRequest, Forbidden, PayloadTooLarge, RateLimited, ServiceUnavailable
from proxy.frontend import (
    EXTENSION_URL,
    AdminStubGuard,
    ExtensionListGuard,
    LocalAnswer,
    add_extension,
)
from proxy.request.bodies import MB, BodyBudget, BodyGuard, BodyReader
from proxy.request.prompt import CATALOG_UNAVAILABLE, PromptGuard
from tests.support.graphs import save_graph
from tests.unit.guards.support import principal, prompt_reader, request, settings

CONFIGURED = settings()
ALICE, ADMIN = principal("alice"), principal("root", "admin")

# -- OriginGuard -------------------------------------------------------------------------------

COOKIE = CONFIGURED.auth.session.cookie_name


def origin_guard() -> OriginGuard:
    allowed = settings(server={"allowed_origins": ["https://app.example"]})
    return OriginGuard(allowed.server, allowed.auth)


@pytest.mark.parametrize(
    "headers",
    [
        {},  # not a browser's cross-origin request
        {"Origin": "null"},
        {"Origin": "http://comfy.local:8080", "Host": "comfy.local:8080"},  # its own origin
        {"Origin": "https://app.example", "Cookie": f"{COOKIE}=s"},  # allowed
        # A bearer token: a foreign page cannot make a browser send it.
        {"Origin": "https://evil.example", "Authorization": "Bearer t"},
        # No credential: authentication refuses it, the origin tells nothing more.
        {"Origin": "https://evil.example", "Host": "comfy.local"},
    ],
)
async def test_origin_passes(headers: dict[str, str]) -> None:
    req, ctx = request("POST", "/prompt", rule="prompt", headers=headers)
    await origin_guard().check(req, ctx)


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example", "Cookie": f"{COOKIE}=s"},  # ambient credential
        {"Origin": "https://evil.example", "Authorization": "Basic YTpi"},
        {"Origin": "//comfy.local", "Host": "comfy.local", "Cookie": f"{COOKIE}=s"},
    ],
)
async def test_origin_refuses_foreign_sites_using_ambient_credentials(
    headers: dict[str, str],
) -> None:
    req, ctx = request("POST", "/prompt", rule="prompt", headers=headers)
    with pytest.raises(Forbidden) as refused:
        await origin_guard().check(req, ctx)
    assert refused.value.error_type == "origin_not_allowed"


async def test_origin_refuses_any_foreign_site_with_auth_off() -> None:
    off = settings(auth={"enabled": False})
    guard = OriginGuard(off.server, off.auth)
    req, ctx = request(
        "POST", "/prompt", headers={"Origin": "https://evil.example", "Authorization": "Bearer t"}
    )
    with pytest.raises(Forbidden):
        await guard.check(req, ctx)


# -- BodyGuard ---------------------------------------------------------------------------------


def body_guard(*, limit_mb: float = 1, per_principal_mb: float = 1) -> tuple[BodyGuard, BodyReader]:
    reader = prompt_reader(CONFIGURED).bodies
    budget = BodyBudget(
        total=int(4 * MB), per_principal=int(per_principal_mb * MB), metrics=reader.metrics
    )
    reader = BodyReader(budget, int(limit_mb * MB), reader.metrics)
    return BodyGuard(reader), reader


async def test_body_is_read_once_into_the_proxys_serialisation() -> None:
    guard, reader = body_guard()
    req, ctx = request("POST", "/queue", rule="queue", who=ALICE, payload=b'{ "clear" :true }')
    await guard.check(req, ctx)
    assert ctx.body == b'{"clear":true}'
    assert ctx.parsed_body == (ctx.body, {"clear": True})
    assert ctx.upstream_headers["Content-Type"] == "application/json"
    assert reader.budget.in_flight == len(b'{ "clear" :true }')  # until the request ends


async def test_body_guard_leaves_uninspected_requests_streaming() -> None:
    guard, _ = body_guard()
    req, ctx = request("GET", "/queue", rule="queue", who=ALICE)
    await guard.check(req, ctx)
    req, ctx = request("POST", "/jobs/x/cancel", rule="jobs", who=ALICE, payload=b"not json")
    await guard.check(req, ctx)
    assert ctx.body is None


async def test_interrupt_with_an_empty_body_reads_as_an_object() -> None:
    guard, _ = body_guard()
    req, ctx = request("POST", "/interrupt", rule="interrupt", who=ALICE, payload=b"")
    await guard.check(req, ctx)
    assert ctx.body == b"{}"


@pytest.mark.parametrize(
    ("payload", "headers", "reason"),
    [
        (b"[1, 2]", {}, "wrong_type"),
        (b"{'a': 1}", {}, "not_json"),
        (b"{}", {"Content-Encoding": "gzip"}, "content_encoding"),
        (b"{}", {"Content-Type": "application/json; charset=nope"}, "charset"),
    ],
)
async def test_body_guard_refuses_what_cannot_be_read(
    payload: bytes, headers: dict[str, str], reason: str
) -> None:
    guard, reader = body_guard()
    req, ctx = request(
        "POST", "/history", rule="history", who=ALICE, payload=payload, headers=headers
    )
    with pytest.raises(BadRequest) as refused:
        await guard.check(req, ctx)
    assert refused.value.error_type == "invalid_body"
    counted = reader.metrics.registry.get_sample_value(
        "comfygate_inspected_body_refusals_total", {"reason": reason}
    )
    assert counted == 1


async def test_body_guard_refuses_bodies_over_the_bounds() -> None:
    guard, reader = body_guard(limit_mb=0.001)
    req, ctx = request("POST", "/queue", rule="queue", who=ALICE, payload=b"{}" * 1000)
    with pytest.raises(PayloadTooLarge):
        await guard.check(req, ctx)
    assert ctx.body is None  # refused on its Content-Length, unread
    guard, reader = body_guard(per_principal_mb=0.001)
    req, ctx = request("POST", "/queue", rule="queue", who=ALICE, payload=b"{}" * 1000)
    with pytest.raises(RateLimited):
        await guard.check(req, ctx)
    assert reader.budget.in_flight == 0


# -- PromptGuard -------------------------------------------------------------------------------


async def test_prompt_guard_reads_every_submission_into_the_model() -> None:
    guard = PromptGuard(prompt_reader(CONFIGURED))
    body = orjson.dumps({"prompt": save_graph(), "extra_data": {"x": 1}})
    req, ctx = request("POST", "/prompt", rule="prompt", who=ALICE, payload=body)
    await guard.check(req, ctx)
    parsed = ctx.current_parse()  # serialised on the first read of ctx.body, not before
    assert isinstance(parsed, Submission)
    assert orjson.loads(ctx.body or b"") == orjson.loads(body)
    assert ctx.parsed_body == (ctx.body, parsed)
    req, ctx = request("GET", "/prompt", rule="prompt", who=ALICE)
    await guard.check(req, ctx)  # a read of the queue's state: nothing read
    assert ctx.body is None


async def test_prompt_guard_refuses_a_malformed_graph() -> None:
    guard = PromptGuard(prompt_reader(CONFIGURED))
    graph = {"1": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}}}  # no node 9
    req, ctx = request(
        "POST", "/prompt", rule="prompt", who=ALICE, payload=orjson.dumps({"prompt": graph})
    )
    with pytest.raises(PromptRejected):
        await guard.check(req, ctx)


async def test_prompt_guard_refuses_unknown_nodes_of_confined_users() -> None:
    isolated = settings(isolation={"enabled": True})
    guard = PromptGuard(prompt_reader(isolated))
    graph = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    payload = orjson.dumps({"prompt": graph})
    req, ctx = request("POST", "/prompt", rule="prompt", who=ALICE, payload=payload)
    with pytest.raises(PromptRejected) as refused:
        await guard.check(req, ctx)
    assert refused.value.status == 400
    req, ctx = request("POST", "/prompt", rule="prompt", who=ADMIN, payload=payload)
    await guard.check(req, ctx)  # an admin's prompt: ComfyUI judges it


async def test_prompt_guard_without_schemas_refuses_confined_users() -> None:
    # Nothing listens on port 9 (discard): the catalog cannot be fetched.
    isolated = settings(isolation={"enabled": True}, upstream={"urls": ("http://127.0.0.1:9",)})
    reader = prompt_reader(isolated, schemas=False)
    guard = PromptGuard(reader)
    payload = orjson.dumps({"prompt": save_graph()})
    req, ctx = request("POST", "/prompt", rule="prompt", who=ALICE, payload=payload)
    with pytest.raises(ServiceUnavailable) as refused:
        await guard.check(req, ctx)
    assert refused.value.error_type == CATALOG_UNAVAILABLE


# -- the frontend's guards ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "stubbed"),
    [
        ("GET", "/internal/logs", b'""'),
        ("GET", "/internal/folder_paths", b"{}"),
        ("PATCH", "/internal/logs/subscribe", b""),
    ],
)
async def test_admin_stub_answers_the_frontends_own_calls_for_users(
    method: str, path: str, stubbed: bytes
) -> None:
    guard = AdminStubGuard(CONFIGURED.roles)
    req, ctx = request(method, path, rule="internal", who=ALICE)
    with pytest.raises(LocalAnswer) as answer:
        await guard.check(req, ctx)
    response = answer.value.response
    assert isinstance(response, web.Response)
    assert response.status == 200
    assert (response.body or b"") == stubbed


@pytest.mark.parametrize(
    ("who", "path"), [(ADMIN, "/internal/logs"), (ALICE, "/internal/files/output")]
)
async def test_admin_stub_passes_admins_and_other_internal_routes(who: object, path: str) -> None:
    guard = AdminStubGuard(CONFIGURED.roles)
    req, ctx = request("GET", path, rule="internal", who=who)  # type: ignore[arg-type]
    await guard.check(req, ctx)  # ComfyUI's answer for admins; the role guard refuses the rest


async def test_extension_list_gets_the_account_extension() -> None:
    guard = ExtensionListGuard()
    req, ctx = request("GET", "/extensions", rule="static", who=ALICE)
    await guard.check(req, ctx)
    assert ctx.response_filters == [add_extension]
    listed = await ctx.response_filters[0](200, b'["/extensions/core/a.js"]')
    assert orjson.loads(listed) == ["/extensions/core/a.js", EXTENSION_URL]
    assert await add_extension(500, b"oops") == b"oops"
    req, ctx = request("GET", "/extensions/core/a.js", rule="static", who=ALICE)
    await guard.check(req, ctx)
    assert ctx.response_filters == []
