"""The login page end to end: a small aiohttp app with ``setup_login``, a real SessionCodec, the
real token verifier and revocation list, a users file and an injected throttle clock."""

from __future__ import annotations

import re
from dataclasses import dataclass
from http.cookies import Morsel, SimpleCookie
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from argon2 import PasswordHasher
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from proxy.auth.login import CSRF_COOKIE, GENERIC_FAILURE, setup_login
from proxy.auth.revocation import MemoryRevocationList
from proxy.auth.sessions import SessionCodec
from proxy.auth.throttle import LoginThrottle
from proxy.auth.tokens import build_verifier, issue_token
from proxy.auth.users import UsersFile
from proxy.settings.auth import DEFAULT_ROLES, AuthSettings, JwtSettings, LoginSettings

SECRET = "j" * 40
PASSWORD = "correct horse battery"
MAX_FAILURES = 3
WINDOW = 300.0
SESSION_COOKIE = "comfygate_session"
ABSOLUTE = 7 * 24 * 3600


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    client: TestClient[Any, Any]
    codec: SessionCodec
    revocations: MemoryRevocationList
    clock: Clock
    jwt: JwtSettings
    base: str

    async def csrf(self, path: str = "/login") -> str:
        """GET the page (which sets the CSRF cookie) and return the hidden field's value."""
        resp = await self.client.get(self.base + path)
        return csrf_field(await resp.text())

    async def login(self, **fields: str) -> ClientResponse:
        data = {"csrf": await self.csrf(), **fields}
        return await self.client.post(f"{self.base}/login", data=data, allow_redirects=False)


def csrf_field(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match is not None, html
    return match.group(1)


def set_cookie(resp: ClientResponse, name: str) -> Morsel[str]:
    for header in resp.headers.getall("Set-Cookie", ()):
        parsed: SimpleCookie = SimpleCookie()
        parsed.load(header)
        if name in parsed:
            return parsed[name]
    raise AssertionError(f"no Set-Cookie for {name}: {resp.headers.getall('Set-Cookie', ())}")


def flags(header_value: str) -> set[str]:
    return {p.strip().lower() for p in header_value.split(";")}


def raw_set_cookie(resp: ClientResponse, name: str) -> str:
    for header in resp.headers.getall("Set-Cookie", ()):
        if header.startswith(f"{name}="):
            return header
    raise AssertionError(f"no Set-Cookie for {name}")


@pytest.fixture
def make_login(aiohttp_client: AiohttpClient, tmp_path: Path) -> Any:
    async def factory(
        *,
        base_path: str = "",
        users: bool = True,
        allow_token_login: bool = True,
        secure: bool = False,
        templates_dir: str = "",
        throttle_redis: redis.Redis | None = None,
    ) -> Harness:
        jwt = JwtSettings(secret=SECRET)
        settings = AuthSettings(
            jwt=jwt,
            login=LoginSettings(
                allow_token_login=allow_token_login,
                max_failures=MAX_FAILURES,
                failure_window_seconds=WINDOW,
                templates_dir=templates_dir,
            ),
        )
        clock = Clock()
        revocations = MemoryRevocationList()
        codec = SessionCodec(settings.session, b"k" * 32)
        users_file = None
        if users:
            cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
            users_file = UsersFile(tmp_path / "users.toml", hasher=cheap)
            users_file.add("alice", PASSWORD, ["user"])
            users_file.add("ghost", PASSWORD, ["retired-role"])
        app = web.Application()
        setup_login(
            app,
            base_path=base_path,
            settings=settings,
            roles=DEFAULT_ROLES,
            sessions=codec,
            verifier=build_verifier(jwt, DEFAULT_ROLES, session=None, revocations=revocations),
            revocations=revocations,
            throttle=LoginThrottle(MAX_FAILURES, WINDOW, throttle_redis, clock=clock),
            users=users_file,
            cookie_secure=lambda request: secure,
        )
        client = await aiohttp_client(app)
        return Harness(client, codec, revocations, clock, jwt, base_path)

    return factory


@pytest.fixture
async def harness(make_login: Any) -> Harness:
    h: Harness = await make_login()
    return h


# --------------------------------------------------------------------------------- the page


async def test_get_renders_an_accessible_no_js_form_with_csrf(harness: Harness) -> None:
    resp = await harness.client.get("/login")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert '<html lang="en">' in html
    assert "<script" not in html
    assert '<form method="post" action="/login"' in html
    assert '<label for="username">' in html
    assert 'id="username"' in html
    assert '<label for="password">' in html
    assert 'type="password"' in html
    assert '<label for="token">' in html  # token login on
    assert 'role="alert"' not in html  # no error yet
    assert 'href="/comfygate/static/login.css"' in html
    cookie = raw_set_cookie(resp, CSRF_COOKIE)
    assert csrf_field(html) == set_cookie(resp, CSRF_COOKIE).value
    assert {"httponly", "samesite=strict", "path=/"} <= flags(cookie)
    assert resp.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY"
    # A second visit keeps the same CSRF value (several tabs keep working).
    again = await harness.client.get("/login")
    assert CSRF_COOKIE not in again.cookies
    assert csrf_field(await again.text()) == csrf_field(html)


async def test_stylesheet_is_served(harness: Harness) -> None:
    resp = await harness.client.get("/comfygate/static/login.css")
    assert resp.status == 200
    assert resp.content_type == "text/css"
    assert "color-scheme: dark" in await resp.text()


async def test_user_input_is_escaped(harness: Harness) -> None:
    resp = await harness.login(username='<script>alert("x")</script>', password="wrong-password")
    html = await resp.text()
    assert resp.status == 401
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    resp = await harness.client.get('/login?next=/"><script>x</script>')
    html = await resp.text()
    assert "<script>" not in html


async def test_next_is_carried_in_the_form(harness: Harness) -> None:
    html = await (await harness.client.get("/login?next=/history%3Fmax_items%3D1")).text()
    assert 'name="next" value="/history?max_items=1"' in html
    html = await (await harness.client.get("/login?next=%2F%2Fevil.com")).text()
    assert 'name="next" value="/"' in html


async def test_templates_dir_overrides_the_page(make_login: Any, tmp_path: Path) -> None:
    custom = tmp_path / "templates"
    custom.mkdir()
    (custom / "login.html").write_text(
        '{% extends "base.html" %}{% block content %}<h1>Our portal</h1>'
        '<input name="csrf" value="{{ csrf }}">{{ error }}{% endblock %}'
    )
    h: Harness = await make_login(templates_dir=str(custom))
    html = await (await h.client.get("/login")).text()
    assert "<h1>Our portal</h1>" in html
    assert "login.css" in html  # the built-in base.html is still used


# -------------------------------------------------------------------------- password login


async def test_wrong_password_is_401_with_the_generic_message(harness: Harness) -> None:
    with capture_logs() as logs:
        resp = await harness.login(username="alice", password="wrong-password")
    html = await resp.text()
    assert resp.status == 401
    assert GENERIC_FAILURE == "Invalid username, password or token."
    assert f'<p class="error" role="alert" id="login-error">{GENERIC_FAILURE}</p>' in html
    assert 'aria-invalid="true"' in html
    assert 'value="alice"' in html  # the name is kept, the password is not
    assert "wrong-password" not in html
    assert SESSION_COOKIE not in resp.cookies
    failed = [e for e in logs if e["event"] == "login_failed"]
    assert failed == [
        {
            "event": "login_failed",
            "user": "alice",
            "client": "127.0.0.1",
            "method": "password",
            "reason": "bad_credentials",
            "log_level": "info",
        }
    ]
    assert "wrong-password" not in repr(logs)


async def test_unknown_user_and_roleless_user_look_the_same(harness: Harness) -> None:
    wrong = await harness.login(username="alice", password="wrong-password")
    unknown = await harness.login(username="mallory", password=PASSWORD)
    roleless = await harness.login(username="ghost", password=PASSWORD)
    assert wrong.status == unknown.status == roleless.status == 401
    for resp in (unknown, roleless):
        assert GENERIC_FAILURE in await resp.text()


async def test_right_password_sets_the_session_cookie_and_redirects(harness: Harness) -> None:
    with capture_logs() as logs:
        resp = await harness.login(username="Alice", password=PASSWORD, next="/history?x=1")
    assert resp.status == 303
    assert resp.headers["Location"] == "/history?x=1"
    cookie = raw_set_cookie(resp, SESSION_COOKIE)
    assert {"httponly", "samesite=lax", "path=/", f"max-age={ABSOLUTE}"} <= flags(cookie)
    assert "secure" not in flags(cookie)
    session = harness.codec.verify(set_cookie(resp, SESSION_COOKIE).value)
    assert (session.subject, session.roles) == ("alice", ("user",))
    assert [e["event"] for e in logs] == ["login_succeeded"]
    assert logs[0]["user"] == "alice"
    assert PASSWORD not in repr(logs)
    assert set_cookie(resp, SESSION_COOKIE).value not in repr(logs)


async def test_session_cookie_is_secure_when_the_request_is(make_login: Any) -> None:
    h: Harness = await make_login(secure=True)
    resp = await h.client.get("/login")
    assert "secure" in flags(raw_set_cookie(resp, CSRF_COOKIE))
    # The jar will not send a Secure cookie over http: submit the CSRF value explicitly.
    csrf = set_cookie(resp, CSRF_COOKIE).value
    resp = await h.client.post(
        "/login",
        data={"csrf": csrf, "username": "alice", "password": PASSWORD},
        cookies={CSRF_COOKIE: csrf},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert "secure" in flags(raw_set_cookie(resp, SESSION_COOKIE))


async def test_base_path_scopes_routes_cookies_and_next(make_login: Any) -> None:
    h: Harness = await make_login(base_path="/comfy")
    assert (await h.client.get("/login")).status == 404
    page = await h.client.get("/comfy/login")
    html = await page.text()
    assert 'action="/comfy/login"' in html
    assert 'href="/comfy/comfygate/static/login.css"' in html
    assert "path=/comfy" in flags(raw_set_cookie(page, CSRF_COOKIE))
    assert (await h.client.get("/comfy/comfygate/static/login.css")).status == 200
    resp = await h.login(username="alice", password=PASSWORD, next="/comfy/queue")
    assert resp.headers["Location"] == "/comfy/queue"
    assert "path=/comfy" in flags(raw_set_cookie(resp, SESSION_COOKIE))
    resp = await h.login(username="alice", password=PASSWORD, next="/elsewhere")
    assert resp.headers["Location"] == "/comfy/"
    resp = await h.login(username="alice", password=PASSWORD)
    assert resp.headers["Location"] == "/comfy/"


@pytest.mark.parametrize(
    "target",
    [
        "//evil.com",
        "https://evil.com",
        "/\\evil.com",
        "\\\\evil.com",
        "%2F%2Fevil.com",
        "/\t/evil.com",
        "/\r\nLocation: https://evil.com",
        "javascript:alert(1)",
        " /history",
        "history",
        "/" + "a" * 3000,
        "/caf\u00e9",
    ],
)
async def test_open_redirects_go_to_the_root(harness: Harness, target: str) -> None:
    resp = await harness.login(username="alice", password=PASSWORD, next=target)
    assert resp.status == 303
    assert resp.headers["Location"] == "/"


async def test_open_redirect_via_the_query_string(harness: Harness) -> None:
    csrf = await harness.csrf("/login?next=%2F%2Fevil.com")
    resp = await harness.client.post(
        "/login",
        data={"csrf": csrf, "username": "alice", "password": PASSWORD, "next": "//evil.com"},
        allow_redirects=False,
    )
    assert resp.headers["Location"] == "/"


# ------------------------------------------------------------------------------------ CSRF


async def test_missing_csrf_field_is_403(harness: Harness) -> None:
    await harness.client.get("/login")  # has the cookie
    resp = await harness.client.post(
        "/login", data={"username": "alice", "password": PASSWORD}, allow_redirects=False
    )
    assert resp.status == 403
    assert SESSION_COOKIE not in resp.cookies
    assert 'role="alert"' in await resp.text()


async def test_mismatched_csrf_is_403(harness: Harness) -> None:
    await harness.client.get("/login")
    forged = "A" * 43
    resp = await harness.client.post(
        "/login",
        data={"csrf": forged, "username": "alice", "password": PASSWORD},
        allow_redirects=False,
    )
    assert resp.status == 403


async def test_missing_csrf_cookie_is_403_and_a_new_one_is_issued(harness: Harness) -> None:
    csrf = await harness.csrf()
    harness.client.session.cookie_jar.clear()
    resp = await harness.client.post(
        "/login",
        data={"csrf": csrf, "username": "alice", "password": PASSWORD},
        allow_redirects=False,
    )
    assert resp.status == 403
    # The re-rendered page carries a fresh pair, so simply submitting again works.
    retry = csrf_field(await resp.text())
    assert retry == set_cookie(resp, CSRF_COOKIE).value
    resp = await harness.client.post(
        "/login",
        data={"csrf": retry, "username": "alice", "password": PASSWORD},
        allow_redirects=False,
    )
    assert resp.status == 303


async def test_foreign_origin_is_403_even_with_the_token(harness: Harness) -> None:
    csrf = await harness.csrf()
    data = {"csrf": csrf, "username": "alice", "password": PASSWORD}
    resp = await harness.client.post(
        "/login", data=data, headers={"Origin": "https://evil.com"}, allow_redirects=False
    )
    assert resp.status == 403
    own = f"http://{harness.client.server.host}:{harness.client.server.port}"
    resp = await harness.client.post(
        "/login", data=data, headers={"Origin": own}, allow_redirects=False
    )
    assert resp.status == 303


# ------------------------------------------------------------------------------ throttling


async def test_throttled_after_max_failures_with_retry_after(harness: Harness) -> None:
    for _ in range(MAX_FAILURES):
        assert (await harness.login(username="alice", password="wrong-password")).status == 401
    resp = await harness.login(username="alice", password=PASSWORD)  # even the right one
    assert resp.status == 429
    assert resp.headers["Retry-After"] == str(int(WINDOW))
    assert "Too many failed sign-in attempts" in await resp.text()
    assert SESSION_COOKIE not in resp.cookies
    harness.clock.now += 100
    resp = await harness.login(username="bob", password=PASSWORD)  # per IP as well
    assert resp.status == 429
    assert resp.headers["Retry-After"] == str(int(WINDOW - 100))
    harness.clock.now += WINDOW
    assert (await harness.login(username="alice", password=PASSWORD)).status == 303


async def test_token_login_is_throttled_per_ip(harness: Harness) -> None:
    for _ in range(MAX_FAILURES):
        assert (await harness.login(token="not-a-token")).status == 401
    token, _ = issue_token(harness.jwt, subject="carol", roles=["user"], ttl_seconds=3600)
    resp = await harness.login(token=token)
    assert resp.status == 429


async def test_redis_down_fails_closed_with_503(make_login: Any) -> None:
    # Nothing listens on port 1: every throttle call fails at once (no timeout to wait for).
    down = redis.Redis.from_url("redis://127.0.0.1:1")
    try:
        h: Harness = await make_login(throttle_redis=down)
        resp = await h.login(username="alice", password=PASSWORD)
        assert resp.status == 503
        assert SESSION_COOKIE not in resp.cookies
        assert "temporarily unavailable" in await resp.text()
    finally:
        await down.aclose()


async def test_throttle_shared_through_real_redis(make_login: Any, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        h: Harness = await make_login(throttle_redis=client)
        for _ in range(MAX_FAILURES):
            assert (await h.login(username="alice", password="wrong-password")).status == 401
        resp = await h.login(username="alice", password=PASSWORD)
        assert resp.status == 429
        assert resp.headers["Retry-After"] == str(int(WINDOW))
    finally:
        await client.aclose()


# ----------------------------------------------------------------------------- token login


async def test_token_login_creates_a_session_bounded_by_the_token(harness: Harness) -> None:
    token, _ = issue_token(harness.jwt, subject="carol", roles=["admin"], ttl_seconds=3600)
    with capture_logs() as logs:
        resp = await harness.login(token=token, next="/queue")
    assert resp.status == 303
    assert resp.headers["Location"] == "/queue"
    value = set_cookie(resp, SESSION_COOKIE).value
    session = harness.codec.verify(value)
    assert (session.subject, session.roles) == ("carol", ("admin",))
    # The session does not outlive the token it was made from.
    max_age = int(set_cookie(resp, SESSION_COOKIE)["max-age"])
    assert 3590 <= max_age <= 3600
    assert session.absolute_expires_at <= session.issued_at + 3600 + 1
    assert token not in repr(logs)
    assert logs[-1]["event"] == "login_succeeded"
    assert logs[-1]["method"] == "token"


async def test_invalid_expired_and_revoked_tokens_are_refused(harness: Harness) -> None:
    other = JwtSettings(secret="x" * 40)
    forged, _ = issue_token(other, subject="carol", roles=["admin"], ttl_seconds=3600)
    expired, _ = issue_token(
        harness.jwt, subject="carol", roles=["user"], ttl_seconds=60, clock=lambda: 1_000_000.0
    )
    revoked, jti = issue_token(harness.jwt, subject="carol", roles=["user"], ttl_seconds=3600)
    await harness.revocations.revoke(jti, None)
    roleless, _ = issue_token(harness.jwt, subject="carol", roles=["nobody"], ttl_seconds=3600)
    harness.clock.now = 0  # the throttle would stop the fourth attempt; this test is not about it
    with capture_logs() as logs:
        for token in (forged, expired, revoked, roleless):
            resp = await harness.login(token=token)
            assert resp.status == 401
            assert GENERIC_FAILURE in await resp.text()
            harness.clock.now += WINDOW
    reasons = [e["reason"] for e in logs if e["event"] == "login_failed"]
    assert reasons[2] == "token_revoked"
    assert reasons[3] == "no_known_role"


async def test_token_login_disabled_hides_the_form_and_refuses(make_login: Any) -> None:
    h: Harness = await make_login(allow_token_login=False)
    html = await (await h.client.get("/login")).text()
    assert 'name="token"' not in html
    token, _ = issue_token(h.jwt, subject="carol", roles=["user"], ttl_seconds=3600)
    assert (await h.login(token=token)).status == 401


async def test_a_failed_token_login_reopens_the_token_form(harness: Harness) -> None:
    html = await (await harness.login(token="not-a-token")).text()
    assert "<details open>" in html
    assert 'aria-describedby="token-hint login-error"' in html


async def test_no_login_method_says_so(make_login: Any) -> None:
    h: Harness = await make_login(users=False, allow_token_login=False)
    html = await (await h.client.get("/login")).text()
    assert "<form" not in html
    assert "No sign-in method is enabled" in html


async def test_without_users_file_only_the_token_form_is_shown(make_login: Any) -> None:
    h: Harness = await make_login(users=False)
    html = await (await h.client.get("/login")).text()
    assert 'name="password"' not in html
    assert 'name="token"' in html
    assert (await h.login(username="alice", password=PASSWORD)).status == 401


# ---------------------------------------------------------------------------------- logout


async def test_logout_revokes_the_session_and_clears_the_cookie(harness: Harness) -> None:
    resp = await harness.login(username="alice", password=PASSWORD)
    session = harness.codec.verify(set_cookie(resp, SESSION_COOKIE).value)
    page = await (await harness.client.get("/login")).text()
    assert "signed in as <strong>alice</strong>" in page
    assert 'action="/logout"' in page
    resp = await harness.client.post(
        "/logout", data={"csrf": csrf_field(page)}, allow_redirects=False
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/login"
    cleared = raw_set_cookie(resp, SESSION_COOKIE)
    assert {"max-age=0", "path=/", "httponly"} <= flags(cleared)
    assert await harness.revocations.is_revoked(session.session_id)
    page = await (await harness.client.get("/login")).text()
    assert "signed in as" not in page


async def test_logout_with_a_same_origin_header_and_no_token(harness: Harness) -> None:
    resp = await harness.login(username="alice", password=PASSWORD)
    session = harness.codec.verify(set_cookie(resp, SESSION_COOKIE).value)
    own = f"http://{harness.client.server.host}:{harness.client.server.port}"
    resp = await harness.client.post("/logout", headers={"Origin": own}, allow_redirects=False)
    assert resp.status == 303
    assert await harness.revocations.is_revoked(session.session_id)


async def test_cross_site_logout_is_refused(harness: Harness) -> None:
    resp = await harness.login(username="alice", password=PASSWORD)
    session = harness.codec.verify(set_cookie(resp, SESSION_COOKIE).value)
    for headers in ({}, {"Origin": "https://evil.com"}):
        resp = await harness.client.post("/logout", headers=headers, allow_redirects=False)
        assert resp.status == 403
    assert not await harness.revocations.is_revoked(session.session_id)
    # The CSRF token alone is not enough with a foreign Origin either.
    csrf = await harness.csrf()
    resp = await harness.client.post(
        "/logout",
        data={"csrf": csrf},
        headers={"Origin": "https://evil.com"},
        allow_redirects=False,
    )
    assert resp.status == 403


async def test_logout_without_a_session_just_redirects(harness: Harness) -> None:
    csrf = await harness.csrf()
    resp = await harness.client.post("/logout", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/login"
