"""Clients other than the proxy's own pages (issue 15): API consumers on other origins, HTTP
Basic and query-token clients, and what the stock frontend does by itself.

- The origin check applies to credentials a browser attaches by itself (the session cookie,
  HTTP Basic) and to nothing else: a bearer token with a foreign ``Origin`` is served.
- CORS (``server.cors_origins``): preflights answered by the proxy, ``Access-Control-Allow-Origin``
  for listed origins, never ``Access-Control-Allow-Credentials``.
- HTTP Basic with the API token as the password (``auth.basic_auth``), on HTTP and on the
  socket, with the cookie's origin/CSRF checks; ``WWW-Authenticate: Basic`` is never sent.
- ``?token=`` on HTTP API routes only when opted in (``auth.query_token_on_http``), stripped
  before ComfyUI and never logged.
- The frontend's own calls to admin-only ``/internal`` routes: an empty answer for a regular
  user, nothing forwarded; everything else admin-only stays refused.
- The frontend's bundled files load without credentials (the manifest); nothing else does.
- The account extension: listed in ``/extensions``, served by the proxy; ``whoami``; logout.

Each attack asserts on the answer (status and ``error.type``) and on what ComfyUI received.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from proxy.auth.authenticator import AUTH
from proxy.frontend import EXTENSION_URL
from proxy.limits.enforce import in_words
from proxy.settings import SETTINGS
from tests.conftest import ProxyFactory, make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.security.raw_http import exchange
from tests.support.gateway_queue import settled

Client = TestClient[Any, Any]
SESSION, CSRF_COOKIE = "comfygate_session", "comfygate_csrf"
EVIL = "https://evil.example"
APP = "https://app.example"  # an API consumer's web app, listed in server.cors_origins
GRAPH = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7},
    },
    "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
}
JSON = ("Content-Type", "application/json")


def basic(token: str, user: str = "anyone") -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def bearer_of(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def prompt_body() -> bytes:
    return json.dumps({"prompt": GRAPH}).encode()


def no_credentials_in(fake: FakeComfyUI, *secrets: str) -> None:
    """Nothing the fake received carries a credential: headers, cookies, target."""
    for got in fake.received:
        text = got.raw_path + "\n" + "\n".join(f"{k}: {v}" for k, v in got.headers.items())
        for secret in (*secrets, SESSION, "Authorization"):
            assert secret not in text, (secret, text)
        assert "token" not in got.query


def session_of(client: Client, subject: str, roles: tuple[str, ...] = ("user",)) -> str:
    value, _ = client.app[AUTH].sessions.issue(
        subject,
        list(roles),
        source="token",
        token_id=f"jti-{subject}",
        not_after=time.time() + 3600,
    )
    return str(value)


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> Client:
    return await make_proxy(fake_comfy.url, token=None, server={"cors_origins": [APP]})


A_TOKEN, B_TOKEN = make_token("alice", ("user",)), make_token("bob", ("user",))
ADMIN_TOKEN = make_token("root", ("admin",))


# -- the origin check: ambient credentials only ---------------------------------------------------


async def test_bearer_with_a_foreign_origin_is_served(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    headers = [bearer_of(A_TOKEN), ("Origin", EVIL), JSON]
    answer = await exchange(client, "POST", "/api/prompt", headers, prompt_body())
    assert answer.status == 200, answer.body
    [got] = [r for r in fake_comfy.received if r.method == "POST"]
    # ComfyUI gets a consistent Host/Origin pair, never the foreign origin.
    assert got.headers["Origin"] != EVIL
    no_credentials_in(fake_comfy, A_TOKEN)


async def test_query_token_socket_from_a_foreign_origin_is_served(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    url = client.make_url(f"/ws?clientId=tab&token={B_TOKEN}")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Origin": EVIL}) as ws,
    ):
        assert (await ws.receive_json(timeout=10))["type"] == "status"
    no_credentials_in(fake_comfy, B_TOKEN)


@pytest.mark.parametrize("credential", ["cookie", "basic"])
async def test_ambient_credentials_from_a_foreign_origin_are_refused(
    credential: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    """A page on another site makes B's browser send B's cookie or cached Basic credentials."""
    auth = (
        ("Cookie", f"{SESSION}={session_of(client, 'bob')}")
        if credential == "cookie"
        else ("Authorization", basic(B_TOKEN))
    )
    for origin in (EVIL, APP):  # a CORS origin is for bearer tokens only
        answer = await exchange(
            client, "POST", "/api/prompt", [auth, ("Origin", origin), JSON], prompt_body()
        )
        assert answer.status == 403, answer.body
        assert answer.error_type == "origin_not_allowed"
        assert "Access-Control-Allow-Credentials" not in answer.headers
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws?clientId=x", headers=dict([auth, ("Origin", EVIL)]))
    assert info.value.status == 403
    assert fake_comfy.received == []


async def test_no_credentials_and_a_foreign_origin_is_401_and_not_forwarded(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    answer = await exchange(client, "GET", "/api/history", [("Origin", EVIL)])
    assert answer.status == 401
    assert answer.error_type == "unauthenticated"
    assert fake_comfy.received == []


async def test_without_auth_every_foreign_origin_is_refused(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """auth.enabled = false: being on the network is the credential, and it is ambient."""
    client = await make_proxy(fake_comfy.url, token=None, auth={"enabled": False})
    answer = await exchange(client, "POST", "/api/interrupt", [("Origin", EVIL)], b"")
    assert answer.status == 403
    assert answer.error_type == "origin_not_allowed"
    assert fake_comfy.received == []


# -- CORS ------------------------------------------------------------------------------------------


async def test_preflight_of_a_listed_origin_is_answered_by_the_proxy(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    headers = [
        ("Origin", APP),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "authorization, content-type, x-evil"),
    ]
    answer = await exchange(client, "OPTIONS", "/api/prompt", headers)
    assert answer.status == 204
    assert answer.headers["Access-Control-Allow-Origin"] == APP
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    assert answer.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "Access-Control-Allow-Credentials" not in answer.headers
    assert fake_comfy.received == []


async def test_preflight_of_another_origin_is_refused(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    headers = [("Origin", EVIL), ("Access-Control-Request-Method", "POST")]
    answer = await exchange(client, "OPTIONS", "/api/prompt", headers)
    assert answer.status == 403
    assert answer.error_type == "cors_origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in answer.headers
    assert fake_comfy.received == []


async def test_answers_to_a_listed_origin_are_readable_with_a_bearer_only(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    ok = await exchange(client, "GET", "/api/queue", [bearer_of(A_TOKEN), ("Origin", APP)])
    assert ok.status == 200
    assert ok.headers["Access-Control-Allow-Origin"] == APP
    assert "Retry-After" in ok.headers["Access-Control-Expose-Headers"]
    assert "Origin" in ok.headers.getall("Vary")
    refused = await exchange(client, "GET", "/api/queue", [("Origin", APP)])
    assert refused.status == 401  # readable too: the page learns it must authenticate
    assert refused.headers["Access-Control-Allow-Origin"] == APP
    other = await exchange(client, "GET", "/api/queue", [bearer_of(A_TOKEN), ("Origin", EVIL)])
    assert other.status == 200
    assert "Access-Control-Allow-Origin" not in other.headers  # not readable by that page
    for answer in (ok, refused, other):
        assert "Access-Control-Allow-Credentials" not in answer.headers


async def test_comfyui_cors_grants_never_pass(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """Without cors_origins no page elsewhere may read anything, whatever ComfyUI says."""
    client = await make_proxy(fake_comfy.url, token=None)
    answer = await exchange(client, "GET", "/api/queue", [bearer_of(A_TOKEN), ("Origin", APP)])
    assert answer.status == 200
    assert not [h for h in answer.headers if h.lower().startswith("access-control-")]
    preflight = await exchange(
        client,
        "OPTIONS",
        "/api/prompt",
        [("Origin", APP), ("Access-Control-Request-Method", "PUT")],
    )
    assert preflight.status == 401  # not answered: no origin is listed
    assert fake_comfy.received == [r for r in fake_comfy.received if r.method == "GET"]


# -- HTTP Basic ------------------------------------------------------------------------------------


async def test_basic_token_as_password_authenticates_as_its_subject(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    answer = await exchange(client, "POST", "/prompt", [bearer_of(A_TOKEN), JSON], prompt_body())
    a_prompt = answer.json()["prompt_id"]
    await settled(client, fake_comfy)
    fake_comfy.reset()
    # B with Basic (no Origin: an API client) sees only B's own history.
    seen = await exchange(client, "GET", "/api/history", [("Authorization", basic(B_TOKEN))])
    assert seen.status == 200
    assert a_prompt not in seen.body.decode()
    mine = await exchange(client, "GET", "/api/history", [("Authorization", basic(A_TOKEN))])
    assert a_prompt in mine.body.decode()
    no_credentials_in(fake_comfy, A_TOKEN, B_TOKEN)


async def test_basic_post_without_origin_is_an_api_client(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    answer = await exchange(
        client, "POST", "/api/prompt", [("Authorization", basic(B_TOKEN, "")), JSON], prompt_body()
    )
    assert answer.status == 200, answer.body
    no_credentials_in(fake_comfy, B_TOKEN)


async def test_basic_with_an_opaque_origin_needs_our_referer(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """``Origin: null`` is a browser (a sandboxed frame): the cookie's rule applies."""
    headers = [("Authorization", basic(B_TOKEN)), ("Origin", "null"), JSON]
    answer = await exchange(client, "POST", "/api/prompt", headers, prompt_body())
    assert answer.status == 403
    assert answer.error_type == "csrf_failed"
    assert fake_comfy.received == []


async def test_url_credentials_are_basic(client: Client, fake_comfy: FakeComfyUI) -> None:
    """``http://user:token@host``: what such a client sends is the Basic header."""
    url = client.make_url("/api/queue").with_user("me").with_password(B_TOKEN)
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
    no_credentials_in(fake_comfy, B_TOKEN)


async def test_basic_on_the_socket_handshake(client: Client, fake_comfy: FakeComfyUI) -> None:
    url = client.make_url("/ws?clientId=tab")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": basic(B_TOKEN, "x")}) as ws,
    ):
        assert (await ws.receive_json(timeout=10))["type"] == "status"
    no_credentials_in(fake_comfy, B_TOKEN)


@pytest.mark.parametrize(
    "authorization",
    [
        basic("not-a-token"),
        basic(""),  # no password
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"u:\xff\xfe").decode(),  # not UTF-8
    ],
)
async def test_bad_basic_is_401_with_no_basic_challenge(
    authorization: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    answer = await exchange(client, "GET", "/api/queue", [("Authorization", authorization)])
    assert answer.status == 401
    assert answer.error_type in ("invalid_token", "token_malformed"), answer.body
    challenges = answer.headers.getall("WWW-Authenticate", [])
    assert challenges
    assert all(c.startswith("Bearer") for c in challenges), challenges
    assert fake_comfy.received == []


async def test_basic_off_refuses_it(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    client = await make_proxy(fake_comfy.url, token=None, auth={"basic_auth": False})
    answer = await exchange(client, "GET", "/api/queue", [("Authorization", basic(B_TOKEN))])
    assert answer.status == 401
    assert answer.error_type == "token_malformed"
    assert not any("basic" in c.lower() for c in answer.headers.getall("WWW-Authenticate"))
    assert fake_comfy.received == []


async def test_two_authorization_headers_are_refused(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """Which one a reader takes must not be left open: B's and A's together are refused."""
    headers = [bearer_of(B_TOKEN), ("Authorization", basic(A_TOKEN))]
    answer = await exchange(client, "GET", "/api/history", headers)
    assert answer.status == 401
    assert answer.error_type == "token_malformed"
    assert fake_comfy.received == []


# -- ?token= on HTTP (opt-in) ----------------------------------------------------------------------


async def test_query_token_on_http_is_opt_in(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    off = await make_proxy(fake_comfy.url, token=None)
    answer = await exchange(off, "GET", f"/api/queue?token={B_TOKEN}")
    assert answer.status == 401
    assert fake_comfy.received == []

    on = await make_proxy(fake_comfy.url, token=None, auth={"query_token_on_http": True})
    with capture_logs() as logs:
        answer = await exchange(on, "GET", f"/api/system_stats?%74oken={B_TOKEN}")
    assert answer.status == 200, answer.body
    [got] = fake_comfy.received
    assert "token" not in got.raw_path
    no_credentials_in(fake_comfy, B_TOKEN)
    assert B_TOKEN not in repr(logs)
    # Not a credential for the frontend's files or pages.
    page = await exchange(on, "GET", f"/?token={B_TOKEN}")
    assert page.status == 401
    assert len(fake_comfy.received) == 1


async def test_query_token_does_not_override_the_cookie(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    on = await make_proxy(fake_comfy.url, token=None, auth={"query_token_on_http": True})
    cookie = ("Cookie", f"{SESSION}={session_of(on, 'bob')}")
    answer = await exchange(on, "GET", f"/comfygate/whoami?token={A_TOKEN}", [cookie])
    assert answer.json()["user"] == "bob"


# -- the frontend's own admin-only calls -----------------------------------------------------------


STUBS = [
    ("GET", "/internal/logs", ""),
    ("GET", "/api/internal/logs", ""),
    ("GET", "/internal/logs/raw", {"entries": [], "size": {"cols": 80, "rows": 24}}),
    ("GET", "/internal/folder_paths", {}),
]


@pytest.mark.parametrize(("method", "path", "expected"), STUBS)
async def test_regular_user_gets_an_empty_answer(
    method: str, path: str, expected: object, client: Client, fake_comfy: FakeComfyUI
) -> None:
    answer = await exchange(client, method, path, [bearer_of(B_TOKEN)])
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json() == expected
    assert fake_comfy.received == []


async def test_log_subscription_is_a_no_op_for_a_regular_user(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    body = json.dumps({"enabled": True, "clientId": "sdk"}).encode()
    answer = await exchange(
        client, "PATCH", "/internal/logs/subscribe", [bearer_of(B_TOKEN), JSON], body
    )
    assert answer.status == 200
    assert answer.body == b""
    assert fake_comfy.received == []
    assert fake_comfy.log_subscribers == set()


async def test_stub_keeps_the_csrf_check(client: Client, fake_comfy: FakeComfyUI) -> None:
    cookie = ("Cookie", f"{SESSION}={session_of(client, 'bob')}")
    answer = await exchange(client, "PATCH", "/internal/logs/subscribe", [cookie, JSON], b"{}")
    assert answer.status == 403
    assert answer.error_type == "csrf_failed"
    assert fake_comfy.received == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/internal/files/output"),
        ("GET", "/internal/files?directory=user"),
        ("POST", "/internal/logs"),
        ("GET", "/api/free"),
        ("POST", "/api/free"),
        ("GET", "/api/manager/queue/status"),
    ],
)
async def test_other_admin_routes_stay_refused(
    method: str, path: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    answer = await exchange(client, method, path, [bearer_of(B_TOKEN)])
    assert answer.status == 403
    assert answer.error_type == "forbidden_role"
    assert fake_comfy.received == []


async def test_admin_gets_comfyuis_real_logs(client: Client, fake_comfy: FakeComfyUI) -> None:
    fake_comfy.logs.append(("t", "a line only admins may read\n"))
    answer = await exchange(client, "GET", "/internal/logs", [bearer_of(ADMIN_TOKEN)])
    assert answer.status == 200
    assert "a line only admins may read" in answer.json()
    assert [r.raw_path for r in fake_comfy.received] == ["/internal/logs"]


async def test_stubs_need_authentication(client: Client, fake_comfy: FakeComfyUI) -> None:
    answer = await exchange(client, "GET", "/internal/logs")
    assert answer.status == 401
    assert fake_comfy.received == []


# -- the frontend's public files -------------------------------------------------------------------


@pytest.fixture
async def frontend_comfy(tmp_path: Path) -> AsyncIterator[FakeComfyUI]:
    """A fake ComfyUI serving the stock frontend package as its web root."""
    fake = FakeComfyUI(root=tmp_path / "comfyui-frontend", frontend=True)
    await fake.start()
    yield fake
    await fake.stop()


def manifest_path(fake: FakeComfyUI) -> str:
    index = (Path(fake.web_root) / "index.html").read_text()
    match = re.search(r'href="\./(assets/manifest-[\w-]+\.json)"', index)
    assert match, "the frontend's index.html links no manifest"
    return "/" + match.group(1)


async def test_bundled_files_load_without_credentials(
    make_proxy: ProxyFactory, frontend_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(frontend_comfy.url, token=None)
    paths = [
        manifest_path(frontend_comfy),
        "/assets/favicon.ico",
        "/assets/lib/vue/dist/vue.esm-browser.prod.js",
        "/fonts/inter-latin-normal.woff2",
        "/materialdesignicons.min.css",
    ]
    for path in paths:
        answer = await exchange(client, "GET", path)
        assert answer.status == 200, (path, answer.status)
    # An invalid credential does not stand in the way of a public file either.
    answer = await exchange(client, "GET", paths[0], [bearer_of("garbage")])
    assert answer.status == 200
    assert [r.path for r in frontend_comfy.received] == [*paths, paths[0]]
    for got in frontend_comfy.received:
        assert "Comfy-User" not in got.headers  # nobody's identity


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/"),
        ("GET", "/index.html"),
        ("GET", "/extensions/core/groupNode.js"),  # extensions: custom nodes' scripts live there
        ("GET", "/scripts/app.js"),
        ("GET", "/templates/index.json"),
        ("GET", "/user.css"),
        ("GET", "/api/userdata/user.css"),
        ("GET", "/assets/favicon.ico?v=1"),  # with a query
        ("GET", "/api/assets/favicon.ico"),  # ComfyUI's asset API, not the web root
        ("GET", "/api/assets"),
        ("GET", "/assets/.hidden.js"),
        ("GET", "/assets/lib"),  # a directory
        ("GET", "/assets/notes.txt"),  # not a static asset type
        ("POST", "/assets/favicon.ico"),
        ("GET", "/fonts/../index.html"),
        ("GET", "/object_info"),
    ],
)
async def test_nothing_else_loads_without_credentials(
    method: str, target: str, make_proxy: ProxyFactory, frontend_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(frontend_comfy.url, token=None)
    answer = await exchange(client, method, target, body=b"" if method == "GET" else b"x")
    assert answer.status in (400, 401), (target, answer.status)
    assert frontend_comfy.received == []


# -- the account extension, whoami, logout ---------------------------------------------------------


async def test_extension_is_listed_and_served_by_the_proxy(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    listed = await exchange(client, "GET", "/api/extensions", [bearer_of(B_TOKEN)])
    assert listed.status == 200
    assert listed.json()[-1] == EXTENSION_URL
    assert [r.path for r in fake_comfy.received] == ["/api/extensions"]
    script = await exchange(client, "GET", EXTENSION_URL)
    assert script.status == 200
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert b"registerExtension" in script.body
    assert len(fake_comfy.received) == 1  # the script never reached ComfyUI


async def test_no_extension_without_accounts(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, auth={"enabled": False})
    listed = await exchange(client, "GET", "/api/extensions")
    assert EXTENSION_URL not in listed.json()


async def test_whoami(client: Client, fake_comfy: FakeComfyUI) -> None:
    cookie = ("Cookie", f"{SESSION}={session_of(client, 'bob')}")
    mine = await exchange(client, "GET", "/comfygate/whoami", [cookie])
    assert mine.status == 200
    assert mine.headers["Cache-Control"] == "no-store"
    me = mine.json()
    assert (me["user"], me["roles"], me["admin"], me["credential"]) == (
        "bob",
        ["user"],
        False,
        "cookie",
    )
    assert me["sign_out"]["url"] == "/logout"
    set_cookie = " ".join(mine.headers.getall("Set-Cookie"))
    assert f"{CSRF_COOKIE}={me['sign_out']['csrf']}" in set_cookie
    assert "SameSite=Strict" in set_cookie

    token = await exchange(client, "GET", "/comfygate/whoami", [bearer_of(A_TOKEN)])
    assert token.json()["user"] == "alice"
    assert token.json()["sign_out"] is None  # a token cannot be signed out of
    assert (await exchange(client, "GET", "/comfygate/whoami")).status == 401
    foreign = await exchange(client, "GET", "/comfygate/whoami", [cookie, ("Origin", EVIL)])
    assert foreign.status == 403
    assert foreign.error_type == "origin_not_allowed"
    assert fake_comfy.received == []


async def test_sign_out_with_whoamis_form(client: Client, fake_comfy: FakeComfyUI) -> None:
    session = session_of(client, "bob")
    cookie = f"{SESSION}={session}"
    me = (await exchange(client, "GET", "/comfygate/whoami", [("Cookie", cookie)])).json()
    csrf = me["sign_out"]["csrf"]
    both = ("Cookie", f"{cookie}; {CSRF_COOKIE}={csrf}")
    form = ("Content-Type", "application/x-www-form-urlencoded")
    # The form posted from another site is refused even with the right value.
    evil = await exchange(
        client, "POST", "/logout", [both, form, ("Origin", EVIL)], f"csrf={csrf}".encode()
    )
    assert evil.status == 403
    assert (await exchange(client, "GET", "/api/queue", [("Cookie", cookie)])).status == 200
    # From our page (no Origin needed: the double-submit value proves it).
    done = await exchange(client, "POST", "/logout", [both, form], f"csrf={csrf}".encode())
    assert done.status == 303
    assert done.headers["Location"] == "/login"
    gone = await exchange(client, "GET", "/api/queue", [("Cookie", cookie)])
    assert gone.status == 401
    assert [r.path for r in fake_comfy.received] == ["/api/queue"]


async def test_get_logout_is_a_page_not_a_sign_out(client: Client, fake_comfy: FakeComfyUI) -> None:
    cookie = ("Cookie", f"{SESSION}={session_of(client, 'bob')}")
    page = await exchange(client, "GET", "/logout", [cookie, ("Accept", "text/html")])
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert b"Sign out of ComfyUI?" in page.body
    assert b"bob" in page.body
    assert (await exchange(client, "GET", "/api/queue", [cookie])).status == 200
    assert [r.path for r in fake_comfy.received] == ["/api/queue"]


# -- submit limits ---------------------------------------------------------------------------------


async def test_one_prompt_at_a_time_loop_is_not_limited(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """A client without a socket waiting for each prompt before the next: the old default
    (30/minute, burst 10) refused the 11th. The fake runs a prompt in no time, faster than any
    model: the loop runs through the burst; a real one (a fast model: >= 0.2 s a prompt) stays
    under the rate of 5 a second for good. The queue quota (10) does not stop it either: its
    ended prompts are noticed when the quota would refuse."""
    limit = client.app[SETTINGS].rate_limits.default["submit"]
    assert limit.count / limit.period_seconds >= 5
    for _ in range(limit.burst):
        answer = await exchange(
            client, "POST", "/prompt", [bearer_of(B_TOKEN), JSON], prompt_body()
        )
        assert answer.status == 200, answer.body
        await fake_comfy.wait_idle()


async def test_submit_refusal_says_when_in_words(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        rate_limits={"default": {"submit": {"rate": "1/10minutes", "burst": 1}}},
    )
    ok = await exchange(client, "POST", "/prompt", [bearer_of(B_TOKEN), JSON], prompt_body())
    assert ok.status == 200
    await settled(client, fake_comfy)
    fake_comfy.reset()
    answer = await exchange(client, "POST", "/prompt", [bearer_of(B_TOKEN), JSON], prompt_body())
    assert answer.status == 429
    body = answer.json()
    assert body["node_errors"] == {}
    wait = int(answer.headers["Retry-After"])
    assert body["error"]["retry_after"] == wait
    assert body["error"]["message"].endswith(f"Try again in {in_words(wait)}.")
    assert re.search(r"Try again in (9|10) minutes", body["error"]["message"]), body
    assert fake_comfy.received == []


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (1, "1 second"),
        (59, "59 seconds"),
        (119, "119 seconds"),
        (120, "2 minutes"),
        (150, "2 minutes 30 seconds"),
        (3600, "1 hour"),
        (3661, "1 hour 2 minutes"),
        (7199, "2 hours"),
    ],
)
def test_in_words(seconds: int, words: str) -> None:
    assert in_words(seconds) == words
