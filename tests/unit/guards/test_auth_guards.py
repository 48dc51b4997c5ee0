"""Unit tests of the identity and role guards (``proxy.auth.guard``, ``proxy.auth.admin_guard``)."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest

from proxy.auth.admin_guard import AdminGuard
from proxy.auth.authenticator import Authenticator
from proxy.auth.guard import (
    PUBLIC,
    AuthGuard,
    ClearRoleGuard,
    CsrfGuard,
    RedactArgvGuard,
    RoleGuard,
    SubmitRoleGuard,
    UsersReadOnlyGuard,
)
from proxy.errors import Forbidden, Unauthenticated
from proxy.principal import Principal
from proxy.settings.auth import DEFAULT_ROLES
from tests.unit.guards.support import principal, request, rule_named, settings

ADMIN = principal("root", "admin")
USER = principal("alice", "user")
VIEWER = principal("vic", "viewer")


class FakeAuthenticator:
    """Answers with a fixed principal, or refuses (the real one is tested in test_auth_*)."""

    def __init__(self, who: Principal | None) -> None:
        self.who = who
        self.seen: list[dict[str, Any]] = []

    async def authenticate(self, request: object, **flags: Any) -> tuple[Principal, None]:
        self.seen.append(flags)
        if self.who is None:
            raise Unauthenticated("no credentials", error_type="missing_credentials")
        return self.who, None


def auth_guard(who: Principal | None, rule: str = "history") -> tuple[AuthGuard, FakeAuthenticator]:
    fake = FakeAuthenticator(who)
    guard = AuthGuard(rule_named(rule), cast(Authenticator, fake), settings())  # type: ignore[arg-type]
    return guard, fake


async def test_auth_sets_the_principal_and_drops_query_tokens() -> None:
    guard, fake = auth_guard(USER)
    req, ctx = request("GET", "/history?token=secret&max_items=1", rule="history")
    await guard.check(req, ctx)
    assert ctx.principal is USER
    assert ctx.upstream_path == "/history?max_items=1"
    assert fake.seen == [{"websocket": False, "api_route": True}]


async def test_auth_refuses_without_credentials() -> None:
    guard, _ = auth_guard(None)
    req, ctx = request("GET", "/history", rule="history")
    with pytest.raises(Unauthenticated):
        await guard.check(req, ctx)
    assert ctx.principal is None


async def test_auth_lets_public_frontend_files_through_anonymously() -> None:
    guard, _ = auth_guard(None, "static")
    req, ctx = request("GET", "/assets/index-abc.js", rule="static")
    await guard.check(req, ctx)
    assert ctx.principal is PUBLIC


async def test_websocket_flag_only_on_a_real_handshake() -> None:
    guard, fake = auth_guard(USER, "ws")
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    req, ctx = request("GET", "/ws", rule="ws", headers=headers)
    await guard.check(req, ctx)
    req, ctx = request("GET", "/ws", rule="ws", headers={"Upgrade": "websocket"})
    await guard.check(req, ctx)
    assert [s["websocket"] for s in fake.seen] == [True, False]


CSRF = CsrfGuard(settings().server)


@pytest.mark.parametrize(
    ("method", "source", "headers", "passes"),
    [
        ("POST", "bearer", {}, True),  # not ambient
        ("GET", "cookie", {}, True),  # not a state change
        ("POST", "cookie", {"Origin": "http://elsewhere.example"}, True),  # origin guard's
        ("POST", "basic", {}, True),  # an API client
        ("POST", "cookie", {}, False),
        ("POST", "cookie", {"Origin": "null"}, False),
        ("POST", "basic", {"Origin": "null"}, False),
        ("POST", "cookie", {"Referer": "http://elsewhere.example/page"}, False),
    ],
)
async def test_csrf(method: str, source: str, headers: dict[str, str], passes: bool) -> None:
    req, ctx = request(method, "/prompt", rule="prompt", who=principal("a", source=source))
    req, ctx = request(method, "/prompt", rule="prompt", who=ctx.principal, headers=headers)
    if passes:
        await CSRF.check(req, ctx)
    else:
        with pytest.raises(Forbidden) as refused:
            await CSRF.check(req, ctx)
        assert refused.value.error_type == "csrf_failed"


async def test_csrf_accepts_our_own_referer() -> None:
    req, ctx = request(
        "POST",
        "/prompt",
        rule="prompt",
        who=principal("a", source="cookie"),
        headers={"Host": "proxy.example", "Referer": "http://proxy.example/"},
    )
    await CSRF.check(req, ctx)


@pytest.mark.parametrize(
    ("rule", "who", "passes"),
    [
        ("manager", ADMIN, True),
        ("manager", USER, False),
        ("internal", USER, False),
        ("free", USER, False),
        ("assets_admin", USER, False),
        ("history", USER, True),
        ("other", VIEWER, True),
    ],
)
async def test_role_guard_admin_families(rule: Any, who: Principal, passes: bool) -> None:
    guard = RoleGuard(rule_named(rule), DEFAULT_ROLES)
    req, ctx = request("GET", "/x", rule=rule, who=who)
    if passes:
        await guard.check(req, ctx)
    else:
        with pytest.raises(Forbidden) as refused:
            await guard.check(req, ctx)
        assert refused.value.error_type == "forbidden_role"


@pytest.mark.parametrize(("method", "passes"), [("GET", True), ("HEAD", True), ("POST", False)])
async def test_users_are_read_only(method: str, passes: bool) -> None:
    req, ctx = request(method, "/users", rule="users", who=ADMIN)
    if passes:
        await UsersReadOnlyGuard().check(req, ctx)
    else:
        with pytest.raises(Forbidden):
            await UsersReadOnlyGuard().check(req, ctx)


@pytest.mark.parametrize(
    ("method", "who", "passes"),
    [("POST", USER, True), ("POST", ADMIN, True), ("GET", VIEWER, True), ("POST", VIEWER, False)],
)
async def test_submit_role(method: str, who: Principal, passes: bool) -> None:
    guard = SubmitRoleGuard(DEFAULT_ROLES)
    req, ctx = request(method, "/prompt", rule="prompt", who=who)
    if passes:
        await guard.check(req, ctx)
    else:
        with pytest.raises(Forbidden):
            await guard.check(req, ctx)


@pytest.mark.parametrize(
    ("body", "who", "passes"),
    [
        ({"delete": ["p"]}, USER, True),
        ({"clear": True}, ADMIN, True),
        ({"clear": True}, USER, False),
    ],
)
async def test_clearing_everyones_queue(body: dict[str, Any], who: Principal, passes: bool) -> None:
    guard = ClearRoleGuard(rule_named("queue"), DEFAULT_ROLES)
    req, ctx = request("POST", "/queue", rule="queue", who=who, body=orjson.dumps(body))
    ctx.parsed_body = (ctx.body or b"", body)
    if passes:
        await guard.check(req, ctx)
    else:
        with pytest.raises(Forbidden):
            await guard.check(req, ctx)


async def test_argv_redacted_for_users_only() -> None:
    guard = RedactArgvGuard(DEFAULT_ROLES)
    req, ctx = request("GET", "/system_stats", rule="system_stats", who=USER)
    await guard.check(req, ctx)
    stats = orjson.dumps({"system": {"argv": ["main.py", "--listen"]}})
    assert orjson.loads(await ctx.filter_response(200, stats)) == {"system": {"argv": []}}
    req, ctx = request("GET", "/system_stats", rule="system_stats", who=ADMIN)
    await guard.check(req, ctx)
    assert ctx.response_filters == []


@pytest.mark.parametrize(
    ("who", "passes"),
    [(ADMIN, True), (USER, False), (None, False), (principal("op", "operator"), True)],
)
async def test_admin_guard(who: Principal | None, passes: bool) -> None:
    roles = {
        **DEFAULT_ROLES,
        "operator": DEFAULT_ROLES["user"].model_copy(
            update={"allow_routes": frozenset({"admin_reload"})}
        ),
    }
    guard = AdminGuard("admin_reload", "reloading the policy", roles)
    req, ctx = request("POST", "/admin/reload", who=who)
    if passes:
        await guard.check(req, ctx)
    else:
        with pytest.raises(Forbidden) as refused:
            await guard.check(req, ctx)
        assert refused.value.message == "reloading the policy is for admins"
