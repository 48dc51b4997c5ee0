"""Cross-site request forgery, cross-site WebSocket hijacking and open redirects (issue 13,
family "sessions/CSRF").

The attacker is a foreign web site that a signed-in user (alice) visits: it can make her
browser send requests carrying her session cookie (``SameSite=Lax`` keeps it off cross-site
subrequests in current browsers, but not in every browser nor for top-level navigations), with
a foreign ``Origin``, with ``Origin: null`` (sandboxed frames, cross-origin redirects), or
with no ``Origin``/``Referer`` at all (older browsers, referrer policies). None of these may
change anything: the proxy's origin guard refuses a foreign ``Origin`` for every request, and
its CSRF guard refuses a cookie-authenticated state change (or WebSocket handshake) that does
not positively name this site in ``Origin`` or ``Referer``. The login form has its own
double-submit token; ``next=`` after sign-in only ever leads to a path of this site.

Every case asserts on the attacker's answer and on what the fake ComfyUI received: nothing.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.support.users import write_users

Client = TestClient[Any, Any]
COOKIE = "comfygate_session"
CSRF_COOKIE = "comfygate_csrf"
PASSWORD = "correct horse battery"
EVIL = "http://evil.test"


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice and mallory have passwords (hashed once: argon2 is slow on purpose)."""
    path = tmp_path_factory.mktemp("csrf") / "users.toml"
    return write_users(path, {"alice": ["user"], "mallory": ["user"]}, PASSWORD)


@pytest.fixture
async def client(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str, users_file: Path
) -> Client:
    """The README's deployment with the login page."""
    return await make_proxy(
        fake_comfy.url,
        token=None,
        redis={"url": redis_url},
        auth={"login": {"users_file": str(users_file)}},
        # Many refused sign-ins from one address in a row: the login rate limit (tested
        # elsewhere) would answer 429 before the CSRF check under test.
        rate_limits={"default": {"login": {"rate": "1000/minute", "burst": 1000}}},
    )


def port_of(client: Client) -> int:
    port = client.server.port
    assert port is not None
    return port


def own(client: Client) -> str:
    return f"http://{client.server.host}:{client.server.port}"


async def login_form(client: Client) -> str:
    """Load the login page (sets the CSRF cookie in the jar); the form's CSRF value."""
    page = await client.get("/login")
    found = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert found is not None
    return found.group(1)


async def sign_in(client: Client, user: str = "alice") -> str:
    """Alice signs in from the login page; her session cookie's value (the jar is then
    emptied: every request below carries exactly the cookie it names)."""
    csrf = await login_form(client)
    resp = await client.post(
        "/login",
        data={"csrf": csrf, "next": "/", "username": user, "password": PASSWORD},
        headers={"Origin": own(client)},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    value = resp.cookies[COOKIE].value
    client.session.cookie_jar.clear()
    return value


def with_cookie(session: str, **headers: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={session}", **headers}


async def error_type(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json()
    assert isinstance(body, dict)
    return str(body["error"]["type"])


STATE_CHANGES = [
    ("POST", "/api/prompt", {"prompt": {}}),
    ("POST", "/prompt", {"prompt": {}}),
    ("POST", "/api/queue", {"clear": True}),
    ("POST", "/api/history", {"clear": True}),
    ("POST", "/api/interrupt", {}),
    ("POST", "/api/jobs/cancel", {"job_ids": []}),
    ("POST", "/api/userdata/workflows%2Fx.json", {"nodes": []}),
    ("DELETE", "/api/userdata/workflows%2Fx.json", None),
    ("POST", "/api/settings/Comfy.Locale", "en"),
    ("POST", "/api/upload/image", None),
]
IDS = [f"{m} {p}" for m, p, _ in STATE_CHANGES]


def sibling_origins(client: Client) -> list[str]:
    """Origins that look like this site's and are not (host, port, scheme, parser tricks)."""
    host, port = client.server.host, port_of(client)
    return [
        EVIL,
        f"http://{host}:{port + 1}",  # a sibling port
        f"http://{host}",  # the default port
        f"https://{host}",  # another scheme on its default port
        f"http://localhost:{port}",  # another name of the same machine
        f"http://{host}.evil.test:{port}",
        f"http://evil.test:{port}",
        f"http://{host}:{port}@evil.test",
        f"http://evil.test#{host}:{port}",
        f"http://{host}%2Eevil.test:{port}",
    ]


# ---------------------------------------------------------------- cookie state changes


@pytest.mark.parametrize(("method", "path", "body"), STATE_CHANGES, ids=IDS)
async def test_state_change_from_a_foreign_origin_is_refused(
    method: str, path: str, body: Any, client: Client, fake_comfy: FakeComfyUI
) -> None:
    session = await sign_in(client)
    for origin in sibling_origins(client):
        resp = await client.request(
            method, path, json=body, headers=with_cookie(session, Origin=origin)
        )
        assert resp.status in (400, 403), (origin, await resp.text())
        if resp.status == 403:
            assert await error_type(resp) == "origin_not_allowed", origin
        else:  # the sibling is not even a readable origin
            assert await error_type(resp) in ("origin_not_allowed", "bad_request"), origin
    assert fake_comfy.received == []


@pytest.mark.parametrize(("method", "path", "body"), STATE_CHANGES, ids=IDS)
async def test_state_change_without_a_positive_origin_is_refused(
    method: str, path: str, body: Any, client: Client, fake_comfy: FakeComfyUI
) -> None:
    """No Origin and no Referer, ``Origin: null``, or a Referer that is not this site's: the
    cookie alone proves nothing."""
    session = await sign_in(client)
    variants: list[dict[str, str]] = [
        {},
        {"Origin": "null"},
        {"Origin": "null", "Referer": f"{EVIL}/page"},
        {"Referer": ""},
        {"Referer": "about:blank"},
        {"Referer": "null"},
    ]
    variants += [{"Referer": f"{o}/ComfyUI/"} for o in sibling_origins(client)]
    variants += [
        {"Referer": f"{EVIL}/{own(client)}/"},
        {"Referer": f"{EVIL}/?r={own(client)}/"},
        {"Referer": f"{own(client)}.evil.test/"},
        {"Referer": f"//{client.server.host}:{client.server.port}/"},
        {"Referer": f"/{own(client)}"},
    ]
    for headers in variants:
        resp = await client.request(
            method, path, json=body, headers=with_cookie(session, **headers)
        )
        assert resp.status == 403, (headers, await resp.text())
        assert await error_type(resp) == "csrf_failed", headers
    assert fake_comfy.received == []


async def test_own_origin_or_referer_lets_the_same_change_through(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """The control: the same cookie from this site's own pages works, by Origin or Referer."""
    session = await sign_in(client)
    for headers in (
        {"Origin": own(client)},
        {"Referer": f"{own(client)}/"},
        {"Origin": "null", "Referer": f"{own(client)}/?x=1"},
    ):
        resp = await client.post("/api/interrupt", json={}, headers=with_cookie(session, **headers))
        assert resp.status == 200, (headers, await resp.text())


async def test_bearer_requests_are_not_csrf_even_from_a_foreign_origin(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """A browser never attaches a bearer token by itself, so a request carrying one is the
    token holder's own (issue 15: API consumers on other origins, with CORS for reading): a
    foreign Origin does not make it a cross-site forgery. The cookie stays origin-checked
    (tests above), and nothing the cookie grants rides along."""
    resp = await client.post("/api/interrupt", json={}, headers=bearer("alice"))
    assert resp.status == 200
    fake_comfy.reset()
    resp = await client.post("/api/interrupt", json={}, headers={**bearer("alice"), "Origin": EVIL})
    assert resp.status == 200  # decided as alice's own (isolation read the queue: nothing hers)
    assert {r.path for r in fake_comfy.received} <= {"/queue", "/api/interrupt"}
    assert "Access-Control-Allow-Origin" not in resp.headers  # not a listed CORS origin


async def test_reads_with_the_cookie_from_a_foreign_origin_are_refused(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """A cross-origin ``fetch`` with credentials: the read is refused, not just unreadable."""
    session = await sign_in(client)
    for path in ("/api/queue", "/api/history", "/api/userdata?dir=workflows", "/api/settings"):
        resp = await client.get(path, headers=with_cookie(session, Origin=EVIL))
        assert resp.status == 403, path
        assert await error_type(resp) == "origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert fake_comfy.received == []


# ------------------------------------------------------- cross-site WebSocket hijacking


async def test_cross_site_websocket_hijacking_is_refused(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    session = await sign_in(client)
    refused: list[tuple[dict[str, str], str]] = [
        ({"Origin": EVIL}, "origin_not_allowed"),
        ({"Origin": f"http://{client.server.host}:{port_of(client) + 1}"}, "origin_not_allowed"),
        ({"Origin": f"http://localhost:{client.server.port}"}, "origin_not_allowed"),
        ({}, "csrf_failed"),
        ({"Origin": "null"}, "csrf_failed"),
        ({"Origin": "null", "Referer": f"{EVIL}/"}, "csrf_failed"),
    ]
    for path in ("/ws?clientId=tab", "/api/ws?clientId=tab"):
        for headers, expected in refused:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await client.ws_connect(path, headers=with_cookie(session, **headers))
            assert caught.value.status == 403, headers
            assert expected  # the type is in the body aiohttp's client does not keep
            resp = await client.get(
                path,
                headers=with_cookie(
                    session,
                    Upgrade="websocket",
                    Connection="Upgrade",
                    **{
                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                        "Sec-WebSocket-Version": "13",
                    },
                    **headers,
                ),
            )
            assert resp.status == 403
            assert await error_type(resp) == expected, headers
    assert fake_comfy.received == []
    assert fake_comfy.sockets == {}
    # The control: from this site's page the same cookie opens the socket.
    ws = await client.ws_connect(
        "/ws?clientId=tab", headers=with_cookie(session, Origin=own(client))
    )
    assert (await ws.receive_json())["type"] == "status"
    await ws.close()


async def test_a_foreign_origin_socket_needs_a_token_not_the_cookie(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """Cross-site WebSocket hijacking rides on the cookie: refused (above). A page on another
    origin that holds the user's token is the token holder (not ambient): its socket is
    served like a bearer request, as the user's own."""
    token = bearer("alice")["Authorization"].removeprefix("Bearer ")
    async with client.ws_connect(f"/ws?clientId=tab&token={token}", headers={"Origin": EVIL}) as ws:
        assert not ws.closed
    assert all("token" not in r.raw_path for r in fake_comfy.received)


# -------------------------------------------------------------------- login and logout


async def test_login_csrf_is_refused(client: Client, fake_comfy: FakeComfyUI) -> None:
    """The attacker signs the victim's browser into the attacker's account (so her work lands
    in it): without the page's token pair, or from a foreign origin with it, no session."""
    csrf = await login_form(client)
    fields = {"username": "mallory", "password": PASSWORD, "next": "/"}
    attempts: list[tuple[dict[str, str], dict[str, str], bool]] = [
        # (form fields, headers, keep the page's CSRF cookie)
        (fields, {"Origin": EVIL}, False),
        (fields, {}, False),
        ({**fields, "csrf": csrf}, {"Origin": EVIL}, True),
        ({**fields, "csrf": csrf}, {"Origin": f"http://localhost:{client.server.port}"}, True),
        ({**fields, "csrf": "x" * 43}, {"Origin": own(client)}, True),
        ({**fields, "csrf": csrf}, {"Origin": own(client)}, False),
        ({**fields, "csrf": ""}, {"Origin": own(client)}, True),
    ]
    for form, headers, keep in attempts:
        if not keep:
            client.session.cookie_jar.clear()
        resp = await client.post("/login", data=form, headers=headers, allow_redirects=False)
        assert resp.status == 403, (form, headers)
        assert COOKIE not in resp.cookies
        assert "signed in" not in (await resp.text()).lower()
        await login_form(client)
    # JSON instead of the form: no token in it, so no session either.
    resp = await client.post(
        "/login", json={**fields, "csrf": csrf}, headers={"Origin": EVIL}, allow_redirects=False
    )
    assert resp.status == 403
    assert COOKIE not in resp.cookies
    assert fake_comfy.received == []


async def test_logout_csrf_is_refused(client: Client, fake_comfy: FakeComfyUI) -> None:
    session = await sign_in(client)
    for headers in ({"Origin": EVIL}, {}, {"Origin": "null"}, {"Referer": f"{EVIL}/"}):
        resp = await client.post(
            "/logout", data={}, headers=with_cookie(session, **headers), allow_redirects=False
        )
        assert resp.status == 403, headers
        assert resp.cookies.get(COOKIE) is None or resp.cookies[COOKIE].value != ""
    resp = await client.get("/api/queue", headers=with_cookie(session))
    assert resp.status == 200  # still signed in
    assert [r.path for r in fake_comfy.received] == ["/api/queue"]
    resp = await client.post(
        "/logout", data={}, headers=with_cookie(session, Origin=own(client)), allow_redirects=False
    )
    assert resp.status == 303
    resp = await client.get("/api/queue", headers=with_cookie(session))
    assert resp.status == 401
    assert len(fake_comfy.received) == 1


# ---------------------------------------------------------------------- open redirects

OPEN_REDIRECTS = [
    "//evil.test",
    "//evil.test/ComfyUI",
    "///evil.test",
    "/\\evil.test",
    "\\/evil.test",
    "\\\\evil.test",
    "/\\/evil.test",
    "https:evil.test",
    "https://evil.test",
    "http:/evil.test",
    "HTTP://evil.test",
    "javascript:alert(1)",
    "data:text/html,x",
    "%2F%2Fevil.test",
    "%2f%2fevil.test",
    " //evil.test",
    "/\t/evil.test",
    "/\n/evil.test",
    "/\r/evil.test",
    "\t//evil.test",
    "/ /evil.test",
    "/\x00/evil.test",
    "/\u3000/evil.test",
    "/\uff0f/evil.test",
    "evil.test",
    "@evil.test",
    "/" + "a" * 3000,
]
SAFE_NEXT = ["/", "/ComfyUI?x=1", "/%2F%2Fevil.test", "/%5Cevil.test", "/.//evil.test", "/#//evil"]


async def post_login(client: Client, next_value: str) -> aiohttp.ClientResponse:
    csrf = await login_form(client)
    return await client.post(
        "/login",
        data={"csrf": csrf, "next": next_value, "username": "alice", "password": PASSWORD},
        headers={"Origin": own(client)},
        allow_redirects=False,
    )


@pytest.mark.parametrize("next_value", OPEN_REDIRECTS)
async def test_next_never_leaves_the_site(
    next_value: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    resp = await post_login(client, next_value)
    assert resp.status == 303
    assert resp.headers["Location"] == "/"
    # The page itself carries only the safe value in its form.
    client.session.cookie_jar.clear()
    page = await client.get("/login", params={"next": next_value})
    assert 'name="next" value="/"' in await page.text()
    assert fake_comfy.received == []


@pytest.mark.parametrize("next_value", SAFE_NEXT)
async def test_same_site_paths_are_followed(
    next_value: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    """What is followed is a path-absolute reference: whatever a browser makes of it, the
    authority stays this site's (``/.//x`` resolves to the path ``//x`` of this host)."""
    resp = await post_login(client, next_value)
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location == next_value
    assert location.startswith("/")
    assert not location.startswith(("//", "/\\"))


async def test_next_is_escaped_in_the_page(client: Client) -> None:
    payload = '/"><script>alert(1)</script>'
    page = await (await client.get("/login", params={"next": payload})).text()
    assert "<script>alert(1)" not in page


async def test_the_login_redirect_of_a_page_names_only_a_path(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """A signed-out browser sent to the login page keeps where it was going as a path of this
    site, however the target was written (absolute-form, repeated slashes)."""
    for target in ("//evil.test/x", "/api//evil.test", "///evil.test"):
        status, location = await raw_redirect(client, target)
        assert status == 302, target
        assert location.startswith("/login?next=%2F"), location
        assert "%2F%2F" not in location
    assert fake_comfy.received == []


async def raw_redirect(client: Client, target: str) -> tuple[int, str]:
    """A browser page request for ``target`` exactly as written (a client library would read
    ``//host/x`` as a URL of another host); its status and ``Location``."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {client.server.host}:{client.server.port}\r\n"
            "Accept: text/html\r\nConnection: close\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    location = next(
        (h.split(":", 1)[1].strip() for h in head if h.lower().startswith("location:")), ""
    )
    return int(head[0].split(" ")[1]), location
